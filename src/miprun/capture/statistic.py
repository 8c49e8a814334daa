"""The accumulator protocol every captured statistic follows, and the container the capture pass fills.

A :class:`Statistic` reads some *taps* of the forward pass (block states, or the output of a module role
inside a block), reduces each tap's tokens as soon as it is seen (so at most one batch of reduced states
is alive), folds a batch into float64 sums once every tap of that batch has been seen, and merges exactly
with another accumulator of the same kind (another data-parallel rank's). The whole-model pass, the
layer-by-layer pass and data-parallel merging treat every statistic the same way through this protocol.

State ``s`` is what enters block ``s`` (``s = 0 .. T-1``); state ``T`` is what leaves the last block.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from miprun.registry import Registry


@dataclass(frozen=True)
class Tap:
    """One tensor of the forward pass: block state ``state``, or the output of module ``role`` of ``block``."""

    state: int | None = None
    block: int | None = None
    role: str | None = None

    def describe(self) -> str:
        if self.state is not None:
            return "the embeddings (input of block 0)" if self.state == 0 else f"block {self.state - 1}"
        return f"the {self.role} of block {self.block}"


def state_taps(num_blocks: int) -> list[Tap]:
    """Every block state, ``0 .. T``."""
    return [Tap(state=s) for s in range(num_blocks + 1)]


@dataclass(frozen=True)
class CaptureContext:
    """What a statistic learns once, before the pass: the model's shape and all windows' sample tokens."""

    num_blocks: int
    hidden_size: int
    seed: int
    token_mask: torch.Tensor  # (num_windows, seq_len) bool over *all* windows: positions that are samples


@dataclass(frozen=True)
class BatchInfo:
    """One forward pass over windows ``start:stop``: its sample tokens, in the global order of all windows."""

    start: int
    stop: int
    token_mask: torch.Tensor  # (batch * seq_len,) bool: which flattened positions are samples
    token_offset: int  # sample tokens of all windows before this batch
    last_rows: torch.Tensor  # (windows,) index, among this batch's sample tokens, of each window's last

    @property
    def num_tokens(self) -> int:
        return int(self.token_mask.sum())


class Statistic(ABC):
    """A streaming summary of hidden states (see the module docstring).

    Subclasses are dataclasses: fields with ``init=True`` are the configuration (two statistics with the
    same class and configuration are one statistic, captured once); the others are accumulators. Sums
    are float64; a batch's products may be formed in float32.
    """

    name: ClassVar[str]

    @classmethod
    def example(cls) -> Statistic:
        """A small instance for the registry-wide contract tests (tests/test_contracts.py) on a tiny model:
        the defaults, unless a plugin's defaults need more than a tiny model holds."""
        return cls()

    def config(self) -> tuple[Any, ...]:
        """Identity of what is captured: class and configuration fields."""
        init = [f.name for f in dataclasses.fields(self) if f.init]  # type: ignore[arg-type]
        return (type(self).__name__, *(getattr(self, n) for n in init))

    def blank(self) -> Statistic:
        """A new, empty statistic of the same configuration: what a capture fills, leaving ``self`` as given."""
        init = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]
        return type(self)(**init)

    def widen(self, other: Statistic) -> Statistic | None:
        """A statistic that serves both ``self`` and ``other`` (same kind), or None if they must stay apart."""
        return self if self.config() == other.config() else None

    def taps(self, ctx: CaptureContext) -> list[Tap]:
        """What this statistic reads; every block state by default."""
        return state_taps(ctx.num_blocks)

    def start(self, ctx: CaptureContext) -> None:  # noqa: B027 - optional hook
        """Called once before the pass (allocate lazily in :meth:`update` where the data's device is known)."""

    def reduce(self, tap: Tap, h: torch.Tensor, batch: BatchInfo) -> torch.Tensor | None:
        """This batch's sample tokens ``(tokens, hidden)`` float32 at ``tap``, reduced to what :meth:`update` needs."""
        return h

    @abstractmethod
    def update(self, parts: list[torch.Tensor], batch: BatchInfo) -> None:
        """Fold one batch in; ``parts`` are :meth:`reduce`'s outputs in :meth:`taps` order, on one device."""

    @abstractmethod
    def merge_(self, other: Statistic) -> None:
        """Fold another accumulator of the same configuration (another rank's share) into this one, exactly."""

    def state_dict(self) -> dict[str, Any]:
        """Configuration and accumulators, tensors on the CPU: what crosses between processes."""
        return {
            f.name: _to_cpu(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Statistic:
        init = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        obj = cls(**{k: v for k, v in state.items() if k in init})
        for k, v in state.items():
            if k not in init:
                setattr(obj, k, v)
        return obj


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def rms_normalize(h: torch.Tensor) -> torch.Tensor:
    """Per-token RMS normalisation without a learned scale: what a pre-norm block reads."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


@dataclass
class CapturedStats:
    """Every statistic one capture pass filled, looked up by the configuration that asked for it."""

    num_blocks: int
    hidden_size: int
    num_tokens: int = 0
    statistics: list[Statistic] = field(default_factory=list)

    @property
    def num_states(self) -> int:
        return self.num_blocks + 1

    def find(self, want: Statistic) -> Statistic | None:
        """The captured statistic that serves ``want`` (the same, or a wider one of its kind), if any."""
        for have in self.statistics:
            if type(have) is type(want) and have.widen(want) is have:
                return have
        return None

    def get(self, want: Statistic, reader: str = "this estimator") -> Any:
        """Like :meth:`find`, but a miss is an error that says how to capture it."""
        found = self.find(want)
        if found is None:
            raise ValueError(
                f"{reader} needs {want.config()} statistics, which this capture did not record: "
                "capture them by asking for them in the capture's statistics."
            )
        return found

    def __iter__(self) -> Iterator[Statistic]:
        return iter(self.statistics)


def combine(requests: list[Statistic]) -> list[Statistic]:
    """The fewest statistics that serve every request: equal ones once, widenable ones widened."""
    out: list[Statistic] = []
    for want in requests:
        for i, have in enumerate(out):
            if type(have) is type(want):
                wide = have.widen(want)
                if wide is None:
                    wide = want.widen(have)
                if wide is not None:
                    out[i] = wide
                    break
        else:
            out.append(want)
    return out


# Every statistic by name: a class registers itself with ``@REGISTRY.register`` (its ``name`` is the key).
REGISTRY: Registry[type[Statistic]] = Registry("statistic")
