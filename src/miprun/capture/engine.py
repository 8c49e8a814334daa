"""One dense forward pass over the calibration windows, reduced on the fly to bounded statistics.

Every statistic (:mod:`miprun.capture.statistics`) says which taps it reads; hooks hand each tap to the
batch's :class:`Reducer`, which keeps each statistic's reduced part (projected, token-sampled) until the
batch has been seen whole, then folds it in. At most one batch of reduced states is alive, so memory does
not grow with the number of calibration tokens. The same reducer serves the layer-by-layer pass
(:mod:`miprun.capture.sequential`); data-parallel shares are merged by :mod:`miprun.capture.distributed`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from miprun.capture.batches import plan_batches, token_mask
from miprun.capture.statistic import BatchInfo, CaptureContext, CapturedStats, Statistic, Tap, combine
from miprun.capture.taps import tap_hooks
from miprun.errors import NonFiniteError
from miprun.model.layouts import base_model, decoder_layers, model_config, text_config
from miprun.model.placement import input_device

if TYPE_CHECKING:
    from miprun.options import CalibrationConfig

log = logging.getLogger(__name__)

NonFiniteHiddenStateError = NonFiniteError  # the name earlier versions raised


class Reducer:
    """One batch: each statistic's reduced taps, parked until the batch is complete, then folded in."""

    def __init__(
        self,
        statistics: Sequence[Statistic],
        taps: Sequence[Sequence[Tap]],
        batch: BatchInfo,
        device: torch.device | None,
        park: torch.device | None = None,
    ) -> None:
        self.statistics, self.batch = statistics, batch
        self.device, self.park = device, park or device
        self.readers: dict[Tap, list[tuple[int, int]]] = {}
        for i, stat_taps in enumerate(taps):
            for slot, tap in enumerate(stat_taps):
                self.readers.setdefault(tap, []).append((i, slot))
        self.parts: list[list[torch.Tensor | None]] = [[None] * len(t) for t in taps]

    def feed(self, tap: Tap, hidden: torch.Tensor, model: nn.Module | None = None) -> None:
        """Reduce this batch's tensor at ``tap`` for every statistic that reads it."""
        readers = self.readers.get(tap)
        if not readers:
            return
        h = hidden.reshape(-1, hidden.shape[-1])[self.batch.token_mask.to(hidden.device)]
        if not torch.isfinite(h).all():
            raise NonFiniteError(non_finite_message(tap, hidden.dtype, model))
        h = h.float()
        for i, slot in readers:
            part = self.statistics[i].reduce(tap, h, self.batch)
            if part is not None and self.park is not None:
                part = part.to(self.park)
            self.parts[i][slot] = part

    def finish(self) -> None:
        """Fold the batch into every statistic, in statistic order."""
        for stat, parts in zip(self.statistics, self.parts, strict=True):
            if any(p is None for p in parts):
                raise RuntimeError("a decoder layer did not run: cannot capture its states")
            moved = [p.to(self.device) if self.device is not None else p for p in parts if p is not None]
            stat.update(moved, self.batch)
        self.parts = []

    def parked_bytes(self) -> int:
        """Bytes of reduced taps this batch holds until it is complete."""
        return sum(p.numel() * p.element_size() for parts in self.parts for p in parts if p is not None)


def non_finite_message(tap: Tap, dtype: torch.dtype, model: nn.Module | None) -> str:
    """Why a tap is NaN/Inf and what to do: overflow in a half dtype, or non-finite weights."""
    where = tap.describe()
    if dtype in (torch.float16, torch.bfloat16):
        return f"NaN/Inf in the hidden states produced by {where}: the model overflows in {dtype}. Run with --dtype float32."
    bad = _non_finite_weights(model) if model is not None else []
    found = f"; non-finite weights: {', '.join(bad[:3])}" if bad else ""
    return (
        f"NaN/Inf in the hidden states produced by {where} in {dtype}{found}. The checkpoint's weights or "
        "the input are not finite: check (or re-download) the model files; a lower precision will not help."
    )


def _non_finite_weights(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.device.type != "meta" and not torch.isfinite(p).all()]


def new_stats(model: nn.Module, requests: Sequence[Statistic]) -> CapturedStats:
    """Empty captured statistics of ``model`` serving every request (equal requests captured once).

    The requests are copied, never filled: a caller's list serves a second capture unchanged.
    """
    layers = decoder_layers(model)
    hidden = int(text_config(model_config(model)).hidden_size)
    statistics = combine([request.blank() for request in requests])
    return CapturedStats(num_blocks=len(layers), hidden_size=hidden, statistics=statistics)


def prepare(
    model: nn.Module,
    windows: torch.Tensor,
    requests: Sequence[Statistic],
    calibration: CalibrationConfig,
    attention_mask: torch.Tensor | None,
    share: tuple[int, int],
) -> tuple[CapturedStats, list[list[Tap]], list[BatchInfo]]:
    """Statistics started on this model and windows, each one's taps, and this share's batches."""
    stats = new_stats(model, requests)
    mask = token_mask(windows, attention_mask, calibration.exclude_first_token)
    ctx = CaptureContext(stats.num_blocks, stats.hidden_size, calibration.seed, mask)
    for stat in stats:
        stat.start(ctx)
    taps = [stat.taps(ctx) for stat in stats]
    return stats, taps, plan_batches(mask, calibration.batch_size, share)


@torch.inference_mode()
def capture(
    model: nn.Module,
    windows: torch.Tensor,
    requests: Sequence[Statistic],
    calibration: CalibrationConfig | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    share: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> CapturedStats:
    """Run the dense model once over ``windows`` ``(num_windows, seq_len)`` and fill the requested statistics.

    Args:
        model: a causal LM whose architecture :mod:`miprun.model.layouts` knows; it may be spread over
            devices (or offloaded) by an accelerate device map.
        requests: what to capture (statistics asked for by the estimator, the method, the repair).
        calibration: batch size, seed (projections, token samples) and whether each window's first
            token is a sample; the defaults of :class:`~miprun.options.CalibrationConfig` when None.
        attention_mask: marks padding in ``windows``, if any.
        share: ``(index, count)``: only this contiguous share of the windows (one data-parallel rank's).
    """
    from miprun.options import CalibrationConfig

    cal = calibration or CalibrationConfig()
    stats, taps, batches = prepare(model, windows, requests, cal, attention_mask, share)
    device = input_device(model)
    current: list[Reducer] = []
    all_taps = [t for per in taps for t in per]
    with tap_hooks(model, all_taps, lambda tap, h: current[0].feed(tap, h, model)):
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            current[:] = [Reducer(stats.statistics, taps, batch, device)]
            ids = windows[batch.start : batch.stop].to(device)
            am = None if attention_mask is None else attention_mask[batch.start : batch.stop].to(device)
            base_model(model)(input_ids=ids, attention_mask=am, use_cache=False)
            current[0].finish()
            stats.num_tokens += batch.num_tokens
    log.info("captured %d tokens over %d blocks", stats.num_tokens, stats.num_blocks)
    return stats
