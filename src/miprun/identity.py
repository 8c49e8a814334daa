"""Cheap content fingerprints, so that scores are never reused for another model or other text."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from miprun.architectures import model_config

_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"}


def tensor_fingerprint(t: torch.Tensor) -> str:
    """Hash of a tensor's shape and values (exact, for token windows)."""
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _offloaded_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Values of parameters that accelerate offloaded (``meta`` in the module, real in a hook's weights map)."""
    values: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights is None:
            continue
        for name, p in module.named_parameters():
            full = f"{prefix}.{name}" if prefix else name
            if p.device.type == "meta" and full not in values:
                try:
                    values[full] = weights[name]
                except KeyError:
                    continue
    return values


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
    offloaded = _offloaded_values(model) if any(p.device.type == "meta" for p in model.parameters()) else {}
    for name, p in sorted(model.named_parameters()):
        h.update(f"{name}:{tuple(p.shape)}".encode())
        value = offloaded.get(name, p) if p.device.type == "meta" else p
        if value.device.type == "meta":  # nowhere to read it from
            continue
        flat = value.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        h.update(flat[::step][:64].to("cpu", torch.float64).numpy().round(4).tobytes())
    return h.hexdigest()[:16]
