"""The distillation losses: KL(teacher || student) on full logits, or on a cached top-k plus a tail bucket.

Pure functions of tensors; the top-k form reuses mi-verified's ``coarse_kl`` (a lower bound of the full KL,
exact when k is the vocabulary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from miprun.methods.targets import coarse_kl, top_k_with_tail


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over (unmasked) positions of KL(teacher || student) at ``temperature``, in nats, float32.

    Args:
        student_logits, teacher_logits: (batch, seq, vocab) logits of the same positions.
        mask: (batch, seq), true where a position counts (not padding); all count when None.
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (batch, seq)
    if mask is None:
        return kl.mean()
    weights = mask.to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp_min(1.0)


def teacher_top_k(
    teacher_logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's distribution at ``temperature`` as its top ``k`` log-probabilities, their ids and the tail.

    (batch, seq, vocab) -> values (batch, seq, k) float32, indices (batch, seq, k), tail (batch, seq).
    """
    return top_k_with_tail(teacher_logits.float() / temperature, min(k, teacher_logits.shape[-1]))


def top_k_distill_loss(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    tail: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean KL(teacher || student) over positions on the teacher's cached top-k tokens plus one tail bucket."""
    return coarse_kl(student_logits.float() / temperature, values, indices, tail)
