"""Data-parallel calibration: each process captures a share of the windows, then all merge exactly.

Launched by ``torchrun --nproc_per_node P`` (or ``accelerate launch``), accelerate's ``PartialState`` joins
the process group (NCCL on CUDA, gloo on CPU). Every rank tokenizes the same windows, captures its own
contiguous share (:func:`miprun.capture.batches.share_range`), and :func:`merge_stats` gathers every
rank's statistics and folds them in rank order with each statistic's own exact ``merge_``, so all ranks
end with identical statistics equal, to float rounding, to one process's. Shares are contiguous and in
rank order, so a seeded token sample drawn over all windows comes back in the single-process order.
"""

from __future__ import annotations

import atexit
import logging
from typing import Any

import torch

from miprun.capture.statistic import CapturedStats
from miprun.errors import DataError, InvalidOptionError

log = logging.getLogger(__name__)


def state() -> Any:
    """accelerate's process state (a shared singleton): rank, world size, whether this is the main process.

    The first call joins the process group that ``torchrun`` describes, if any, and leaves it at exit.
    """
    from accelerate import PartialState

    fresh = not PartialState._shared_state
    current = PartialState(cpu=not torch.cuda.is_available())
    if fresh and int(current.num_processes) > 1:
        atexit.register(current.destroy_process_group)
    return current


def is_distributed() -> bool:
    """Whether more than one process shares the work."""
    return int(state().num_processes) > 1


def is_main() -> bool:
    """Whether this process writes outputs, logs and shows progress (rank 0, or the only process)."""
    return bool(state().is_main_process)


def share(num_windows: int) -> tuple[int, int]:
    """``(rank, world size)``: this process's share of ``num_windows`` windows, checked to be non-empty."""
    size, rank = int(state().num_processes), int(state().process_index)
    if num_windows < size:
        raise InvalidOptionError(
            f"{size} processes share {num_windows} calibration windows: each needs at least one. "
            f"Use --samples {size} or more, or fewer processes (--nproc_per_node)."
        )
    return rank, size


def merge_stats(stats: CapturedStats) -> CapturedStats:
    """Every rank's statistics merged in place, identical on every rank; a no-op in one process."""
    if not is_distributed():
        return stats
    from accelerate.utils import gather_object

    mine = {"tokens": stats.num_tokens, "stats": [s.state_dict() for s in stats.statistics]}
    gathered = gather_object([mine])  # one entry per rank, in rank order
    if min(entry["tokens"] for entry in gathered) == 0:  # every rank decides this alike: no rank waits
        raise DataError("a process captured no tokens: every process needs at least one sample token")
    merged = [type(s).from_state_dict(d) for s, d in zip(stats.statistics, gathered[0]["stats"], strict=True)]
    for entry in gathered[1:]:
        for acc, data in zip(merged, entry["stats"], strict=True):
            acc.merge_(type(acc).from_state_dict(data))
    device = _device_of(stats)
    stats.statistics = [_to_device(acc, device) for acc in merged]
    stats.num_tokens = sum(entry["tokens"] for entry in gathered)
    log.info("merged the statistics of %d processes: %d tokens in all", len(gathered), stats.num_tokens)
    return stats


def _device_of(stats: CapturedStats) -> torch.device:
    for acc in stats.statistics:
        for value in vars(acc).values():
            if isinstance(value, torch.Tensor):
                return value.device
    return torch.device("cpu")


def _to_device(acc: Any, device: torch.device) -> Any:
    for name, value in vars(acc).items():
        if isinstance(value, torch.Tensor) and name != "plan":
            setattr(acc, name, value.to(device))
    return acc
