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


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the config and a strided sample of every parameter (stable across devices and runs).

    Reading a few values per tensor keeps this fast on large models; two checkpoints that differ only
    outside the sampled positions would collide, which is acceptable for catching mix-ups.
    """
    h = hashlib.sha256()
    config = {k: v for k, v in model_config(model).to_dict().items() if k not in _IGNORED_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in sorted(model.named_parameters()):
        h.update(f"{name}:{tuple(p.shape)}".encode())
        if p.device.type == "meta":
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        h.update(flat[::step][:64].to("cpu", torch.float64).numpy().round(4).tobytes())
    return h.hexdigest()[:16]
