"""The dense model's next-token targets and what a pruned model's logits are measured by against them.

Pure functions of tensors, shared by the verification of removal sets (:mod:`miprun.methods.verified`) and the
heal's distillation loss: the KL to the dense top-k tokens plus one bucket for the rest, and the next-token loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from miprun.capture.replay import first_rows


@dataclass
class DenseTargets:
    """The dense model's next-token distribution on the verification windows, kept as its top-k plus a tail."""

    values: list[torch.Tensor]  # per batch (batch, seq, k) log-probabilities
    indices: list[torch.Tensor]  # per batch (batch, seq, k) token ids
    tail: list[torch.Tensor]  # per batch (batch, seq) log of the probability outside the top k

    def prefix(self, rows: int, batch_size: int) -> DenseTargets:
        """The targets of the first ``rows`` windows."""
        return DenseTargets(
            *(first_rows(part, rows, batch_size) for part in (self.values, self.indices, self.tail))
        )


def coarse_kl(
    logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor
) -> torch.Tensor:
    """Mean KL(dense || pruned) over positions, on the dense top-k tokens plus one bucket for the rest.

    Merging the tail into one outcome can only lower the KL (data processing), so this is a lower bound
    that is exact when k is the vocabulary.
    """
    logq = F.log_softmax(logits.float(), dim=-1)
    top_q = logq.gather(-1, indices)
    q_tail = torch.log1p(-top_q.exp().sum(-1).clamp(max=1 - 1e-7))
    p = values.exp()
    kl = (p * (values - top_q)).sum(-1) + tail.exp() * (tail - q_tail)
    return kl.mean()


def top_k_with_tail(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (values, indices, tail) ``coarse_kl`` compares against: top-k log-probabilities, their token ids,
    and the log of the probability left outside them; (..., vocab) logits -> (..., k), (..., k), (...)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    top = logp.topk(k, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-7))
    return top.values, top.indices, tail


def next_token_nll(
    logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean NLL of every next token of ``ids`` (the first of each window is context only); with
    ``positions``, ``logits`` are those positions' and only the ones before the last token count."""
    if positions is None:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device))
    scored = positions < ids.shape[1] - 1
    labels = ids[:, positions[scored] + 1].to(logits.device)
    return F.cross_entropy(logits[:, scored.to(logits.device)].flatten(0, 1).float(), labels.flatten())
