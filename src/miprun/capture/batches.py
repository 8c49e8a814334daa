"""Which tokens are samples, and how the windows are cut into forward passes (and data-parallel shares)."""

from __future__ import annotations

import torch

from miprun.capture.statistic import BatchInfo


def token_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, exclude_first: bool
) -> torch.Tensor:
    """Which positions are samples: every non-padding token, optionally without each window's first."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if exclude_first:
        mask = mask.clone()
        mask[:, 0] = False
    return mask


def share_range(num_windows: int, share: tuple[int, int]) -> range:
    """The windows of share ``(index, count)``: ``count`` contiguous, near-equal parts, in order."""
    index, count = share
    if not 0 <= index < count:
        raise ValueError(f"share index {index} is outside 0..{count - 1}")
    return range(num_windows * index // count, num_windows * (index + 1) // count)


def _last_rows(mask: torch.Tensor) -> torch.Tensor:
    """Index among the batch's sample tokens of each window's last sample token (windows with none skipped)."""
    counts = mask.sum(1)
    ends = counts.cumsum(0) - 1
    return ends[counts > 0]


def plan_batches(mask: torch.Tensor, batch_size: int, share: tuple[int, int] = (0, 1)) -> list[BatchInfo]:
    """Cut this share of the windows (``mask`` is ``(num_windows, seq_len)``, every window) into batches.

    Each batch knows how many sample tokens come before it over *all* windows, so statistics that sample
    tokens globally (a seeded token sample) pick the same tokens however the windows are shared.
    """
    mine = share_range(len(mask), share)
    seen = int(mask[: mine.start].sum())
    batches = []
    for start in range(mine.start, mine.stop, batch_size):
        stop = min(start + batch_size, mine.stop)
        part = mask[start:stop]
        batches.append(BatchInfo(start, stop, part.reshape(-1), seen, _last_rows(part)))
        seen += int(part.sum())
    return batches
