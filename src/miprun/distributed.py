"""Data-parallel calibration with ``torch.distributed``: each rank captures a share, then all ranks merge.

Launched by ``torchrun --nproc_per_node P``, every rank tokenizes the same windows, captures its own
contiguous share of them (:func:`miprun.capture.share_range`), and :func:`merge_stats` combines the
shares with collective operations (gloo on CPU, NCCL on CUDA), so every rank ends with identical
statistics equal, to float rounding, to one process's. Shares are contiguous and in rank order, so the
seeded token sample, drawn over all windows, comes back in the single-process order.

Shift-centred sums (:class:`~miprun.stats.Moments`, :class:`~miprun.stats.CoordinateMoments`) are first
re-centred exactly on rank 0's shift, then summed; plain sums are summed; the token sample is gathered.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import fields
from typing import Any

import torch
import torch.distributed as dist

from miprun.stats import BlockStats

log = logging.getLogger(__name__)

# BlockStats fields merge_stats knows; any other accumulator is refused rather than silently dropped.
_PLAIN_FIELDS = {"num_blocks", "hidden_size", "normalized"}
_SHIFTED = {"moments": "gram", "coordinates": "cross"}  # accumulator -> its second-moment tensor
_SUMMED = {"cosine": ("cos", "angle")}


def init_from_env() -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns whether this run is distributed.

    Safe to call more than once. NCCL is used when CUDA is available (one GPU per rank, ``LOCAL_RANK``),
    gloo otherwise.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():  # someone else's group of one
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    atexit.register(_shutdown)
    log.info("data-parallel calibration: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """How many ranks share the work (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes outputs, logs and shows progress (rank 0)."""
    return rank() == 0


def share(num_windows: int) -> tuple[int, int]:
    """``(rank, world size)``: this rank's share of ``num_windows`` windows, checked to be non-empty."""
    size = world_size()
    if num_windows < size:
        raise ValueError(
            f"{size} ranks share {num_windows} calibration windows: each rank needs at least one. "
            f"Use --samples {size} or more, or fewer processes (--nproc_per_node)."
        )
    return rank(), size


def merge_stats(stats: BlockStats) -> BlockStats:
    """Merge every rank's statistics in place, so each rank holds the totals over all shares; a no-op alone."""
    if not is_distributed():
        return stats
    unknown = [
        f.name
        for f in fields(stats)
        if f.name not in {*_PLAIN_FIELDS, *_SHIFTED, *_SUMMED, "num_tokens", "sample"}
        and getattr(stats, f.name) is not None
    ]
    if unknown:
        raise NotImplementedError(
            f"merge_stats does not know how to merge BlockStats.{', '.join(unknown)}: add it to "
            "miprun/distributed.py (a sum, or a shift-centred sum) before calibrating data-parallel."
        )
    stats.num_tokens = int(_all_sum(torch.tensor([stats.num_tokens], dtype=torch.int64)))
    for name, second in _SHIFTED.items():
        if getattr(stats, name) is not None:
            _merge_shifted(getattr(stats, name), second)
    for name, sums in _SUMMED.items():
        acc = getattr(stats, name)
        if acc is not None:
            acc.count = int(_all_sum(torch.tensor([acc.count], dtype=torch.int64)))
            for attr in sums:
                setattr(acc, attr, _all_sum(getattr(acc, attr)))
    if stats.sample is not None:
        gathered: list[Any] = [None] * world_size()
        dist.all_gather_object(gathered, [p.cpu() for p in stats.sample.parts])
        parts = [p for rank_parts in gathered for p in rank_parts]  # rank order = window order
        stats.sample.parts = [torch.cat(parts, dim=1)] if parts else []
    log.info("merged the statistics of %d ranks: %d tokens in all", world_size(), stats.num_tokens)
    return stats


def recentre(
    count: int, total: torch.Tensor, second: torch.Tensor, shift: torch.Tensor, new_shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums ``(sum z - shift, sum of pair products)`` re-expressed about ``new_shift``, exactly.

    With ``d = shift - new_shift``: ``z - new = (z - shift) + d``. Pair products are taken over the
    leading axis: a full outer product for 1-D sums (:class:`~miprun.stats.Moments`), per coordinate for
    2-D ones (:class:`~miprun.stats.CoordinateMoments`).
    """
    d = (shift - new_shift).to(second.dtype)

    def pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.unsqueeze(1) * b.unsqueeze(0)

    return total + count * d, second + pair(total, d) + pair(d, total) + count * pair(d, d)


def _merge_shifted(acc: Any, second_name: str) -> None:
    """Re-centre one rank's shift-centred accumulator on rank 0's shift, then sum over ranks."""
    fewest = _all_sum(torch.tensor([acc.count], dtype=torch.int64), dist.ReduceOp.MIN)
    if int(fewest) == 0:  # decided together: one rank raising alone would leave the others waiting
        raise ValueError("a rank captured no tokens: every rank needs at least one sample token")
    common = _broadcast(acc.shift.clone())
    total, second = recentre(acc.count, acc.total, getattr(acc, second_name), acc.shift, common)
    acc.total, acc.shift = _all_sum(total), common
    setattr(acc, second_name, _all_sum(second))
    acc.count = int(_all_sum(torch.tensor([acc.count], dtype=torch.int64)))


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_sum(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    """The sum (or ``op``) of ``t`` over ranks, identical on every rank, on ``t``'s device."""
    buf = t.to(_comm_device()).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM if op is None else op)
    return buf.to(t.device)


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank, on ``t``'s device."""
    buf = t.to(_comm_device()).contiguous()
    dist.broadcast(buf, src=0)
    return buf.to(t.device)
