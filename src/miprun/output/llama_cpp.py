"""GGUF from a transformers folder, through llama.cpp's own converter (``convert_hf_to_gguf.py``).

The converter is not rewritten or patched here: it is the one llama.cpp ships (commit 0c1e57098, MIT),
vendored unmodified in the ``llama-cpp-python==0.3.36`` source archive. On first use miprun fetches that
archive with pip (77 MB, about a minute), keeps only the converter (``convert_hf_to_gguf.py``, its
``conversion/`` modules, its own ``gguf-py`` and the license, about 2 MB) under
``cache_dir()/tools/llama-cpp-python-0.3.36`` and deletes the rest. Set ``MIPRUN_LLAMA_CPP_ARCHIVE`` to
that archive already on disk to skip the download.

The script runs in a subprocess of this interpreter with its vendored ``gguf-py`` first on its path (the
script puts it there itself; ``PYTHONPATH`` holds only that folder), so it never sees the ``gguf``
package miprun imports, nor can it change it. It needs torch, transformers, numpy and sentencepiece,
which miprun installs.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miprun.errors import GgufError, MissingDependencyError
from miprun.options.groups import GGUF_TYPES

log = logging.getLogger(__name__)

REQUIREMENT = "llama-cpp-python==0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098"
DEFAULT_GGUF_TYPE = "f16"
SCRIPT = "convert_hf_to_gguf.py"
ARCHIVE_ENV = "MIPRUN_LLAMA_CPP_ARCHIVE"
_FOLDER = "llama-cpp-python-0.3.36"
_PREFIX = "vendor/llama.cpp/"
_MEMBERS = (
    SCRIPT,
    "LICENSE",
    "conversion/*.py",
    "gguf-py/LICENSE",
    "gguf-py/gguf/*.py",
    "gguf-py/gguf/py.typed",
)
# Hugging Face model_type -> llama.cpp's architecture name, for the families whose layers take a role
# (sliding or global attention, RoPE or not) from their position alone; see miprun.output.gguf.


@dataclass(frozen=True)
class ConvertedGguf:
    """What :func:`convert_folder` wrote: the file, its type, how long it took, each tensor's GGML type."""

    out: Path
    gguf_type: str
    seconds: float
    tensor_types: dict[str, str]
    tokenizer_problem: str | None = None  # why transformers cannot read its tokenizer back, if it cannot

    @property
    def type_counts(self) -> dict[str, int]:
        """How many tensors have each GGML type, most common first (e.g. {"F16": 40, "F32": 17})."""
        return dict(Counter(self.tensor_types.values()).most_common())


def converter_dir() -> Path:
    """The folder holding llama.cpp's converter, fetching it with pip on first use (see module docstring)."""
    from miprun.assets import cache_dir

    root = cache_dir() / "tools" / _FOLDER
    if (root / SCRIPT).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{_FOLDER}-", dir=root.parent) as tmp:
        archive = _archive(Path(tmp))
        staging = Path(tmp) / "tree"
        count = _extract(archive, staging)
        if not (staging / SCRIPT).is_file():
            raise GgufError(
                f"the {REQUIREMENT} source archive ({archive.name}) holds no vendor/llama.cpp/{SCRIPT}; "
                f"expected llama.cpp's converter there. Delete {root.parent} and try again."
            )
        if root.exists() and not (root / SCRIPT).is_file():
            shutil.rmtree(root)  # a leftover without the script in it (a complete one is kept below)
        try:
            os.replace(staging, root)
        except OSError:
            if not (root / SCRIPT).is_file():
                raise
    log.info(
        "Kept llama.cpp's converter (%d files) under %s in %.1f s", count, root, time.perf_counter() - start
    )
    return root


def _archive(tmp: Path) -> Path:
    """The ``llama-cpp-python`` source archive: ``$MIPRUN_LLAMA_CPP_ARCHIVE``, else downloaded into ``tmp``."""
    from miprun.assets import pip_download

    given = os.environ.get(ARCHIVE_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise GgufError(f"{ARCHIVE_ENV} points at {path}, which is not a file; unset it to download")
        return path
    what = f"Downloading llama.cpp's converter ({REQUIREMENT} source archive, 77 MB, once)"
    return pip_download(REQUIREMENT, tmp / "archive", what, source=True)


def _extract(archive: Path, dest: Path) -> int:
    """Copy the converter's files (:data:`_MEMBERS`) out of ``archive`` into ``dest``; how many."""
    count = 0
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            _, sep, rel = member.name.partition(_PREFIX)
            if not (sep and member.isfile()) or ".." in rel.split("/"):
                continue
            if not any(fnmatch.fnmatch(rel, pattern) for pattern in _MEMBERS) or rel.count("/") > 2:
                continue
            src = tar.extractfile(member)
            if src is None:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            count += 1
    return count


def supported_architectures(root: Path | None = None) -> frozenset[str]:
    """The Hugging Face architecture names (``LlamaForCausalLM`` ...) the converter writes as text models.

    Read from the converter's own table (``TEXT_MODEL_MAP`` in ``conversion/__init__.py``) without
    importing it.
    """
    source = ((root or converter_dir()) / "conversion" / "__init__.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        target: ast.expr
        if isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and value is not None:
            return frozenset(ast.literal_eval(value))
    raise GgufError(f"llama.cpp's converter under {root} has no TEXT_MODEL_MAP; delete that folder and retry")


def check_convertible(config: Mapping[str, Any], name: str) -> Path:
    """Refuse, before any work, a model llama.cpp's converter cannot write; return the converter's folder.

    ``config`` is the model's ``config.json`` as a dict; ``name`` is what the user passed, for messages.
    """
    if importlib.util.find_spec("sentencepiece") is None:
        raise MissingDependencyError(
            "--out-format gguf from a transformers model runs llama.cpp's converter, which imports "
            "sentencepiece, and it is not installed; run `pip install sentencepiece`"
        )
    root = converter_dir()
    architectures = list(config.get("architectures") or [])
    known = supported_architectures(root)
    if not architectures or architectures[0] not in known:
        found = architectures[0] if architectures else "no `architectures` entry"
        raise GgufError(
            f"{name}: llama.cpp's converter ({REQUIREMENT}, llama.cpp {LLAMA_CPP_COMMIT}) cannot write "
            f"{found} as GGUF; it knows {len(known)} architectures, e.g. LlamaForCausalLM, "
            "Qwen2ForCausalLM, Gemma3ForCausalLM. Save as transformers (--out-format transformers)."
        )
    return root


def check_layer_roles(config: Mapping[str, Any], removed: Sequence[int]) -> None:
    """Refuse a cut after which llama.cpp would give kept layers other roles than they had.

    llama.cpp derives some layers' role from their position (gemma3: every sixth layer is global
    attention) and the converter writes no key to say otherwise, so removing blocks can silently change
    the model llama.cpp runs. ``config`` is the dense model's (text) config.
    """
    from miprun.model.layouts import LAYOUTS
    from miprun.output.gguf import _pattern_message, pattern_changes

    layout = LAYOUTS.get(str(config.get("model_type")))
    facts = layout.gguf if layout is not None else None
    period = facts.period if facts is not None else None
    if facts is None or period is None:
        return
    arch = facts.arch
    total = int(config["num_hidden_layers"])
    kept = [i for i in range(total) if i not in set(removed)]
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == total:  # compare the roles the model really has
        shifted = [
            new
            for new, old in enumerate(kept)
            if (types[old] == "full_attention") != ((new + 1) % period == 0)
        ]
    else:
        shifted = pattern_changes(kept, period)
    if shifted:
        raise GgufError(_pattern_message(arch, period, sorted(removed), shifted))


def convert_folder(
    folder: Path, out: Path, gguf_type: str, root: Path | None = None, progress: bool = False
) -> ConvertedGguf:
    """Run llama.cpp's converter on the Hugging Face ``folder``, writing ``out`` as ``gguf_type`` (a spinner
    on a terminal with ``progress``: it runs about 10 s for a 135M model)."""
    from miprun.assets.packages import status

    if gguf_type not in GGUF_TYPES:
        raise GgufError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    root = root or converter_dir()
    cmd = [sys.executable, str(root / SCRIPT), str(folder), "--outfile", str(out), "--outtype", gguf_type]
    env = {k: v for k, v in os.environ.items() if k not in ("NO_LOCAL_GGUF", "PYTHONPATH")}
    env["PYTHONPATH"] = str(root / "gguf-py")
    start = time.perf_counter()
    with status(f"llama.cpp's converter: writing {out.name} ({gguf_type})", show=progress):
        proc = subprocess.run(
            cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
        )
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join(proc.stdout.strip().splitlines()[-12:])
        tail = tail.replace(str(out.parent), "<output folder>")  # a temporary folder, gone by now
        raise GgufError(
            f"llama.cpp's converter ({REQUIREMENT}) could not write the pruned model as {gguf_type} GGUF "
            f"(exit code {proc.returncode}); its last lines:\n{tail}\n"
            "Save as transformers (--out-format transformers), or report this with the lines above."
        )
    log.info("llama.cpp's converter wrote %s (%s) in %.1f s", out.name, gguf_type, seconds)
    return ConvertedGguf(out, gguf_type, round(seconds, 2), _tensor_types(out))


def _tensor_types(path: Path) -> dict[str, str]:
    """``{tensor name: ggml type name}`` from the file's tensor table. transformers' own header reader reads
    only the table (0.2 s for Gemma-3-270M); gguf's GGUFReader parses all 262k vocabulary strings first (25 s)."""
    from gguf import GGMLQuantizationType

    try:
        from transformers.integrations.gguf.reader import GgufHeader
    except ImportError:  # a transformers without its own GGUF reader
        from gguf import GGUFReader

        return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    return {t.name: GGMLQuantizationType(t.ggml_type).name for t in GgufHeader.from_file(str(path)).tensors}


def tokenizer_problem(
    out: Path, tokenizer: Any, sample: str = "The history of the city began in 1850."
) -> str | None:
    """Why transformers cannot read the tokenizer of the GGUF ``out`` back as ``tokenizer``, or None.

    The file is read with ``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` and must encode
    ``sample`` to the same ids as the model's own tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
        got = loaded(sample, add_special_tokens=False)["input_ids"]
    except Exception as error:  # any failure of transformers' GGUF tokenizer reader is the finding
        return f"transformers cannot load it ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
    want = tokenizer(sample, add_special_tokens=False)["input_ids"]
    if list(got) != list(want):
        return f"transformers reads it back but encodes {sample!r} as {list(got)[:12]} instead of {list(want)[:12]}"
    return None
