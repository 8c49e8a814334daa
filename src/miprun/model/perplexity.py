"""Perplexity of a causal LM on fixed token windows.

Window convention: every window is scored on its own, with no context carried over from the previous
window (non-overlapping, no stride). Position 0 of a window is never predicted; positions 1..L-1 are,
each from the tokens before it in the same window, so a window of L tokens contributes L-1 predictions.
Perplexities from different window lengths or conventions (e.g. sliding windows with a stride) are not
comparable.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def mean_nll(
    model: Any,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[float, int]:
    """Mean next-token negative log-likelihood in nats over all predicted positions, and their count.

    Args:
        windows: LongTensor (num_windows, seq_len) of token ids; see the module docstring.
        device: where to run; defaults to the device of the model's first parameter.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must have shape (num_windows, seq_len >= 2), not {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    batches = range(0, windows.shape[0], batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
            ids = windows[start : start + batch_size].to(dev)  # (batch, seq)
            logits = model(input_ids=ids, use_cache=False).logits  # (batch, seq, vocab)
            # Position t predicts token t + 1; the float32 log-softmax guards bf16/fp16 models.
            nll = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
            )  # (batch * (seq - 1),)
            total += nll.double().sum().cpu()
            count += ids[:, 1:].numel()
    return float(total) / count, count


def perplexity(
    model: Any,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> float:
    """``exp`` of :func:`mean_nll`: perplexity over all predicted positions of all windows.

    Each window of shape (seq_len,) is evaluated independently; its first token is context only. Use
    :func:`mean_nll` for the number of predicted tokens as well.
    """
    nll, _ = mean_nll(model, windows, batch_size=batch_size, device=device, progress=progress)
    return math.exp(nll)
