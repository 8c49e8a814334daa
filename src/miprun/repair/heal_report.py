"""What a healing run did, as the manifest records it (apart from :mod:`miprun.repair.heal`, which pulls in
``transformers.Trainer``, so that reading a manifest stays light)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from miprun.options import HealConfig


@dataclass
class HealReport:
    """What a healing run did: steps and tokens in all (resumed ones included), this call's time, the loss."""

    steps: int
    tokens: int
    seconds: float  # wall time of this call's training
    cpu_seconds: float  # process CPU time of this call's training (all threads)
    loss_start: float  # KL(teacher || student) in nats per token, first batch of the run
    loss_end: float  # the same on the last batch
    resumed: bool
    resumed_at_step: int
    config: HealConfig
    target_modules: list[str] = field(default_factory=list)  # suffixes of the adapted linear layers
    trainable_parameters: int = 0
    losses: list[float] = field(default_factory=list)  # every step's KL, in order
    processes: int = 1  # the processes that shared each batch (accelerate launch / torchrun)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HealReport:
        return cls(**{**data, "config": HealConfig(**data["config"])})
