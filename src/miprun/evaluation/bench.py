"""Speed and memory of a pruned model against its dense base, measured in one process.

Prefill: one forward pass over a batch-1 prompt of ``prompt_len`` random tokens that builds the KV cache
and keeps only the last position's logits, as generation does. Decode: greedy generation of
``new_tokens`` tokens with the KV cache at each batch size, timing the decode steps only (the prefill
before them is not timed). Models are measured interleaved (A B, B A, ...) after warm-up rounds and
the median of the timed rounds is reported, so drift of a shared machine hits both alike. On CUDA,
times come from CUDA events around synchronised work; elsewhere from ``time.perf_counter``.
"""

from __future__ import annotations

import inspect
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch
from tqdm.auto import tqdm

from miprun.errors import InvalidOptionError
from miprun.model.layouts import base_model, max_positions, model_config, num_blocks, text_config
from miprun.model.loading import LoadedModel, as_loaded
from miprun.model.placement import input_device
from miprun.options import BenchConfig, BenchOptions, with_overrides

log = logging.getLogger(__name__)


def forward_pass_seconds(model: Any, windows: torch.Tensor, batch_size: int, repeats: int) -> float:
    """Median wall time of one plain forward pass of the model body over ``windows`` (the unit pruning times
    are reported in)."""
    body, device = base_model(model), input_device(model)
    times = []
    with torch.inference_mode():
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            for i in range(0, len(windows), batch_size):
                body(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class _Clock:
    """Seconds taken by a callable: CUDA events on CUDA, ``perf_counter`` after a sync elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def time(self, fn: Callable[[], Any]) -> float:
        self._sync()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return start.elapsed_time(end) / 1000.0
        begin = time.perf_counter()
        fn()
        self._sync()
        return time.perf_counter() - begin


_FLAGS: dict[type, tuple[str, bool]] = {}


def _forward_flags(model: torch.nn.Module) -> tuple[str, bool]:
    """The model's KV-cache keyword (``cache``; ``past_key_values`` before transformers 5) and whether its
    forward takes ``logits_to_keep``; cached per class."""
    cls = type(model)
    if cls not in _FLAGS:
        params = inspect.signature(model.forward).parameters
        _FLAGS[cls] = ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params
    return _FLAGS[cls]


def _step(model: torch.nn.Module, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """One cached forward pass; returns the greedy next tokens (batch, 1) and the cache."""
    cache_arg, keep = _forward_flags(model)
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": True}
    if cache is not None:
        kwargs[cache_arg] = cache
    if keep:
        kwargs["logits_to_keep"] = 1  # as in generation: no logits for the prompt positions
    out = model(**kwargs)
    new_cache = out.get("cache")
    if new_cache is None:  # transformers 4 names it past_key_values
        new_cache = out.get("past_key_values")
    return out.logits[:, -1].argmax(-1, keepdim=True), new_cache  # (batch, 1)


@torch.inference_mode()
def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, Any]:
    """Greedy continuation of ``prompt`` (batch, seq) with the KV cache; returns (batch, new_tokens) and the cache."""
    token, cache = _step(model, prompt, None)
    tokens = [token]
    for _ in range(new_tokens - 1):
        token, cache = _step(model, token, cache)
        tokens.append(token)
    return torch.cat(tokens, dim=1), cache


def cache_bytes(cache: Any) -> int | None:
    """Bytes held by a transformers KV cache's key and value tensors (None if its layout is unknown)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers (tied weights counted once): transformers' own count."""
    return int(model.get_memory_footprint(return_buffers=True))


class _Runner:
    """The measurements of one model; each call runs one round and records its times."""

    def __init__(self, loaded: LoadedModel, config: BenchConfig, prompt: torch.Tensor, clock: _Clock) -> None:
        self.model = loaded.model
        self.config = config
        self.prompt = prompt  # (max batch, prompt_len), on the model's device
        self.clock = clock
        self.times: dict[str, list[float]] = {"prefill_s": []}
        self.times.update({f"decode_b{b}_s": [] for b in config.batch_sizes})
        self.kv_bytes: dict[int, int | None] = {}
        self.peak: dict[int, int] = {}

    @torch.inference_mode()
    def round(self, record: bool) -> None:
        prefill = self.clock.time(lambda: _step(self.model, self.prompt[:1], None))
        if record:
            self.times["prefill_s"].append(prefill)
        for b in self.config.batch_sizes:
            cuda = self.clock.device.type == "cuda"
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.clock.device)
            token, cache = _step(self.model, self.prompt[:b], None)  # prefill of the decode run: not timed
            state = {"token": token, "cache": cache}

            def decode(state: dict[str, Any] = state) -> None:
                for _ in range(self.config.new_tokens):
                    state["token"], state["cache"] = _step(self.model, state["token"], state["cache"])

            seconds = self.clock.time(decode)
            if record:
                self.times[f"decode_b{b}_s"].append(seconds)
                self.kv_bytes[b] = cache_bytes(state["cache"])
                if cuda:
                    self.peak[b] = torch.cuda.max_memory_allocated(self.clock.device)

    def summary(self, name: str, path: str | None) -> dict[str, Any]:
        medians = {key: statistics.median(values) for key, values in self.times.items()}
        out: dict[str, Any] = {
            "name": name,
            "path": path,
            "num_blocks": num_blocks(self.model),
            "parameters": self.model.num_parameters(),
            "prefill_ms": 1000.0 * medians["prefill_s"],
            "prefill_tokens_per_s": self.config.prompt_len / medians["prefill_s"],
            "decode_tokens_per_s": {
                str(b): b * self.config.new_tokens / medians[f"decode_b{b}_s"]
                for b in self.config.batch_sizes
            },
            "times_s": self.times,
            "memory": {
                "weights_bytes": weight_bytes(self.model),
                "kv_cache_bytes": {str(b): v for b, v in self.kv_bytes.items()},
            },
        }
        if self.peak:
            out["memory"]["cuda_peak_allocated_bytes"] = {str(b): v for b, v in self.peak.items()}
        return out


def _ratios(model: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
    """Pruned against dense: speed-ups (> 1 is faster), size ratios and the ideal layer ratio T/(T-N)."""
    return {
        "prefill_speedup": dense["prefill_ms"] / model["prefill_ms"],
        "decode_speedup": {
            b: model["decode_tokens_per_s"][b] / dense["decode_tokens_per_s"][b]
            for b in model["decode_tokens_per_s"]
        },
        "ideal_layer_ratio": dense["num_blocks"] / model["num_blocks"],
        "parameter_ratio": model["parameters"] / dense["parameters"],
        "weights_bytes_ratio": model["memory"]["weights_bytes"] / dense["memory"]["weights_bytes"],
    }


@contextmanager
def _eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def _check_positions(loaded: LoadedModel, cfg: BenchConfig) -> None:
    """Refuse a prompt and decode longer than the model's positions, before anything runs (it would hang or
    fail deep inside the model)."""
    limit = max_positions(loaded.model)
    total = cfg.prompt_len + cfg.new_tokens
    if limit is not None and total > limit:
        raise InvalidOptionError(
            f"--prompt-len {cfg.prompt_len} plus --new-tokens {cfg.new_tokens} is {total} positions, more "
            f"than the {limit} positions {loaded.name} was built for; lower them to {limit} in all"
        )


def kv_cache_estimate(model: torch.nn.Module, batch: int, positions: int) -> int | None:
    """Bytes of the KV cache of ``batch`` sequences of ``positions`` tokens (None when the config is unusual)."""
    cfg = text_config(model_config(model))
    layers, heads = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not (isinstance(layers, int) and isinstance(heads, int) and isinstance(hidden, int) and heads > 0):
        return None
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    size = next(model.parameters()).element_size()
    return 2 * layers * batch * positions * int(kv_heads) * int(head_dim) * size


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (CUDA: the driver's count; CPU: available pages, Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _check_memory(loaded: LoadedModel, cfg: BenchConfig) -> None:
    """Refuse batch sizes whose KV cache alone cannot fit in the free memory (it would swap, hang or crash)."""
    batch = max(cfg.batch_sizes)
    need = kv_cache_estimate(loaded.model, batch, cfg.prompt_len + cfg.new_tokens)
    device = next(loaded.model.parameters()).device
    free = free_memory(device)
    if need is not None and free is not None and need > free:
        raise InvalidOptionError(
            f"--batch-sizes {batch} needs about {need / 2**30:.1f} GiB for the KV cache of {loaded.name} "
            f"({batch} x {cfg.prompt_len + cfg.new_tokens} positions), more than the {free / 2**30:.1f} GiB "
            f"free on {device}; use smaller batch sizes (or a shorter --prompt-len)"
        )


def bench(
    model: str | LoadedModel | None,
    options: BenchOptions | None = None,
    *,
    against: str | LoadedModel | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Prefill latency, decode throughput, memory and size of ``model`` (and of ``against``, with ratios).

    Both models run on the same device with the same random prompt, interleaved; see the module docstring.
    ``overrides`` replace :class:`~miprun.options.BenchOptions` fields by flat name (``repeats=3``);
    ``against`` may also be a model already loaded.
    """
    opts = with_overrides(options or BenchOptions(), **overrides)
    reference = against if against is not None else opts.against
    cfg = opts.config
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    loaded = [as_loaded(model, opts.runtime, revision=opts.revision)] + (
        [as_loaded(reference, opts.runtime)] if reference is not None else []
    )
    dev = next(loaded[0].model.parameters()).device
    if any(next(x.model.parameters()).device != dev for x in loaded):
        where = [str(next(x.model.parameters()).device) for x in loaded]
        raise InvalidOptionError(
            f"the model is on {where[0]} and --against on {where[1]}: load both on one device (--device {where[0]})"
        )
    for x in loaded:
        _check_positions(x, cfg)
        _check_memory(x, cfg)
    vocab = min(x.model.get_input_embeddings().num_embeddings for x in loaded)
    generator = torch.Generator().manual_seed(cfg.seed)
    # Ids 0..2 are often special tokens; random ordinary tokens are what matters for timing.
    prompt = torch.randint(
        min(3, vocab - 1), vocab, (max(cfg.batch_sizes), cfg.prompt_len), generator=generator
    )
    clock = _Clock(dev)
    runners = [_Runner(x, cfg, prompt.to(dev), clock) for x in loaded]
    with _eval_mode(*(x.model for x in loaded)):
        rounds = range(cfg.warmup + cfg.repeats)  # the bar moves between rounds, outside the timed calls
        for r in tqdm(rounds, desc="bench rounds", unit="round", disable=not opts.progress):
            order = runners if r % 2 == 0 else runners[::-1]
            for runner in order:
                runner.round(record=r >= cfg.warmup)
    results = [runner.summary(x.name, x.path) for runner, x in zip(runners, loaded, strict=True)]
    out: dict[str, Any] = {
        "device": str(dev),
        "dtype": str(next(loaded[0].model.parameters()).dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "config": asdict(cfg),
        "memory_kind": (
            "weights: parameter+buffer bytes; kv_cache: bytes of the cache tensors after the decode "
            "(tensor sizes, not process RSS)"
            + (
                "; cuda_peak: torch.cuda.max_memory_allocated over each decode run"
                if dev.type == "cuda"
                else ""
            )
        ),
        "model": results[0],
    }
    if len(loaded) > 1:
        out["dense"] = results[1]
        out["ratios"] = _ratios(results[0], results[1])
    return out
