"""A model's identity as the files record it, and cheap content fingerprints, so that scores are never reused
for another model or other text."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from miprun.model.layouts import model_config

_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"}


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a loaded model, as manifests and scores files record it."""

    name: str
    path: str | None
    model_type: str
    num_blocks: int
    fingerprint: str
    revision: str | None = None  # the hub revision it was loaded at, when one was asked for

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        if self.revision is None:
            del record["revision"]  # the files name a revision only when one was asked for
        return record

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(**data)


def tensor_fingerprint(t: torch.Tensor) -> str:
    """Hash of a tensor's shape and values (exact, for token windows)."""
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the config and a strided sample of every parameter (stable across devices and runs).

    Reading a few values per tensor keeps this fast on large models; two checkpoints that differ only
    outside the sampled positions would collide, which is acceptable for catching mix-ups. Weights that
    accelerate offloaded to CPU or disk are read from the offload, so a model fingerprints the same
    however it is placed.
    """
    h = hashlib.sha256()
    config = {k: v for k, v in model_config(model).to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    samples = _parameter_samples(model)
    for name, p in sorted(model.named_parameters()):  # tied weights once, under their first name
        h.update(f"{name}:{tuple(p.shape)}".encode())
        if name in samples:
            h.update(samples[name].numpy().round(4).tobytes())
    return h.hexdigest()[:16]


def _parameter_samples(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> up to 64 strided values (float64, CPU) of it, offloaded parameters included.

    accelerate's public ``align_module_device`` brings an offloaded module's weights in for the read.
    """
    from accelerate.utils import align_module_device

    samples: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        with align_module_device(module, torch.device("cpu") if _offloaded(own) else None):
            for local, p in module.named_parameters(recurse=False):
                full = f"{prefix}.{local}" if prefix else local
                if p.device.type == "meta":  # nowhere to read it from
                    continue
                flat = p.detach().reshape(-1)
                step = max(1, flat.numel() // 64)
                samples[full] = flat[::step][:64].to("cpu", torch.float64)
    return samples


def _offloaded(params: list[tuple[str, torch.Tensor]]) -> bool:
    return any(p.device.type == "meta" for _, p in params)
