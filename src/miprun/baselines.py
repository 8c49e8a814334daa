"""The depth-pruning baselines people use today: pure selection rules and the model-driven scores they read.

* ``shortgpt`` (Men et al. 2024): block influence ``BI_i = 1 - mean_t cos(x_i, y_i)``; remove the N lowest.
* ``angular`` (Gromov et al. 2024): remove the contiguous window of N blocks whose input and output are
  closest in mean angular distance ``arccos(cos) / pi``.
* ``sleb`` (Song et al. 2024): greedily remove the block whose removal, with those already removed, raises
  the calibration loss least; re-evaluated after every removal.
* ``ppl-oneshot`` (Kim et al. 2024, Shortened LLaMA): remove the N blocks whose removal alone raises the
  calibration perplexity least.
* ``last-n`` and ``random``: the naive references.

Calibration loss is the mean next-token NLL (nats) over the calibration windows (:func:`~miprun.perplexity.mean_nll`);
blocks are skipped in place with :func:`~miprun.surgery.skip_blocks`, so no model is ever copied.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from miprun.architectures import num_blocks
from miprun.perplexity import mean_nll
from miprun.stats import CosineSums
from miprun.surgery import skip_blocks

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- pure selection rules


def lowest(values: Sequence[float], n: int) -> list[int]:
    """Indices of the ``n`` smallest values (ties to the lower index), sorted."""
    _check_n(len(values), n)
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    return sorted(order[:n])


def block_influence(mean_cos: torch.Tensor) -> list[float]:
    """ShortGPT's ``BI_i = 1 - mean cos(x_i, y_i)`` per block, from the ``(T+1, T+1)`` mean-cosine matrix."""
    return [1.0 - float(mean_cos[i, i + 1]) for i in range(mean_cos.shape[0] - 1)]


def shortgpt_select(influence: Sequence[float], n: int) -> list[int]:
    """ShortGPT: the ``n`` blocks of lowest block influence."""
    return lowest(influence, n)


def window_distances(mean_angle: torch.Tensor, n: int) -> list[float]:
    """Angular distance ``d(l, n)`` between the input of block ``l`` and the output of block ``l+n-1``, per ``l``."""
    total = mean_angle.shape[0] - 1
    _check_n(total, n)
    return [float(mean_angle[start, start + n]) for start in range(total - n + 1)]


def angular_select(mean_angle: torch.Tensor, n: int) -> list[int]:
    """Gromov et al.: the contiguous window of ``n`` blocks with the smallest angular distance."""
    dist = window_distances(mean_angle, n)
    start = min(range(len(dist)), key=lambda s: (dist[s], s))
    return list(range(start, start + n))


def last_n(total: int, n: int) -> list[int]:
    """The ``n`` deepest blocks except the final one: ``T-1-n .. T-2``."""
    if not 0 < n < total - 1:
        raise ValueError(
            f"last-n keeps the final block, so it can remove 1 to {total - 2} of {total}, not {n}"
        )
    return list(range(total - 1 - n, total - 1))


def random_select(total: int, n: int, seed: int) -> list[int]:
    """A seeded uniform choice of ``n`` distinct blocks."""
    _check_n(total, n)
    return sorted(random.Random(seed).sample(range(total), n))


def _check_n(total: int, n: int) -> None:
    if not 0 < n < total:
        raise ValueError(f"can remove between 1 and {total - 1} of {total} blocks, not {n}")


# ----------------------------------------------------------------------------- model-driven scores


def calibration_loss(
    model: nn.Module, windows: torch.Tensor, removed: Sequence[int] = (), *, batch_size: int = 4
) -> float:
    """Mean next-token NLL (nats) on ``windows`` ``(num_windows, seq_len)`` with blocks ``removed`` skipped."""
    with skip_blocks(model, removed):
        return mean_nll(model, windows, batch_size=batch_size)[0]


@dataclass
class OneShotLosses:
    """Calibration loss with each block alone removed (``losses[i]``), and what computing it cost."""

    losses: list[float]
    forward_passes: int  # passes over all calibration windows
    seconds: float


@dataclass
class SlebPath:
    """SLEB's greedy removal order and the calibration loss after each step; any N <= len(order) reads a prefix."""

    order: list[int]  # block removed at step 1, 2, ...
    losses: list[float]  # calibration loss after each step
    forward_passes: list[int] = field(default_factory=list)  # passes over the windows spent at each step
    seconds: list[float] = field(default_factory=list)  # time of each step

    @property
    def max_blocks(self) -> int:
        return len(self.order)

    def removed(self, n: int) -> list[int]:
        """The blocks SLEB removes for a budget of ``n`` (the first ``n`` steps)."""
        if not 0 < n <= self.max_blocks:
            raise ValueError(f"the SLEB path holds 1 to {self.max_blocks} removals, not {n}")
        return sorted(self.order[:n])


def ppl_oneshot_losses(
    model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = False
) -> OneShotLosses:
    """Shortened LLaMA's PPL criterion: the calibration loss of the model without block ``i``, for every ``i``."""
    total = num_blocks(model)
    start = time.perf_counter()
    losses = [
        calibration_loss(model, windows, [i], batch_size=batch_size)
        for i in tqdm(range(total), desc="ppl one-shot", unit="block", disable=not progress)
    ]
    return OneShotLosses(losses, total, round(time.perf_counter() - start, 4))


def sleb_path(
    model: nn.Module,
    windows: torch.Tensor,
    max_blocks: int,
    *,
    batch_size: int = 4,
    progress: bool = False,
) -> SlebPath:
    """SLEB: remove ``max_blocks`` blocks one at a time, each the one whose extra removal hurts loss least.

    Step ``k`` evaluates every remaining block (``T - k + 1`` passes over the windows). The path for
    ``max_blocks`` holds the answer for every smaller N as a prefix, so one run serves them all.
    """
    total = num_blocks(model)
    _check_n(total, max_blocks)
    path = SlebPath(order=[], losses=[])
    passes = sum(total - k for k in range(max_blocks))
    bar = tqdm(total=passes, desc="sleb", unit="pass", disable=not progress)
    for _ in range(max_blocks):
        start = time.perf_counter()
        candidates = [b for b in range(total) if b not in path.order]
        trial: dict[int, float] = {}
        for b in candidates:
            trial[b] = calibration_loss(model, windows, [*path.order, b], batch_size=batch_size)
            bar.update()
        best = min(candidates, key=lambda b: (trial[b], b))
        path.order.append(best)
        path.losses.append(trial[best])
        path.forward_passes.append(len(candidates))
        path.seconds.append(round(time.perf_counter() - start, 4))
        log.info("sleb step %d: remove block %d (calibration loss %.4f)", len(path.order), best, trial[best])
    bar.close()
    return path


# ----------------------------------------------------------------------------- serialisable evidence


@dataclass
class BaselineScores:
    """What the baselines read, all from the calibration windows; written into scores files for reuse."""

    cosine: CosineSums | None = None
    oneshot: OneShotLosses | None = None
    sleb: SlebPath | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "cosine": self.cosine.to_json() if self.cosine is not None else None,
            "oneshot": asdict(self.oneshot) if self.oneshot is not None else None,
            "sleb": asdict(self.sleb) if self.sleb is not None else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> BaselineScores:
        data = data or {}
        cosine, oneshot, sleb = data.get("cosine"), data.get("oneshot"), data.get("sleb")
        return cls(
            cosine=CosineSums.from_json(cosine) if cosine else None,
            oneshot=OneShotLosses(**oneshot) if oneshot else None,
            sleb=SlebPath(**sleb) if sleb else None,
        )
