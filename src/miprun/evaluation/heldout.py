"""Held-out perplexity: the one measure of a pruned model's quality every command reports the same way.

Windows are the first consecutive, non-overlapping windows of a source's *evaluation* split (text
disjoint from calibration); see :mod:`miprun.model.perplexity` for the window convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from miprun.data import TextSource, eval_windows, load_text
from miprun.model.perplexity import mean_nll
from miprun.model.placement import input_device
from miprun.output.manifest import HeldoutEvaluation


@dataclass
class HeldoutText:
    """Held-out text and the windows cut from it: what every held-out perplexity of a run is measured on."""

    text: TextSource
    windows: torch.Tensor  # (windows, seq_len) token ids

    def record(self, dense_ppl: float, *, fingerprint: bool = True) -> HeldoutEvaluation:
        """The evaluation record of a run measured on these windows, starting with the dense perplexity."""
        return HeldoutEvaluation(
            source=self.text.name,
            windows=int(self.windows.shape[0]),
            seq_len=int(self.windows.shape[1]),
            dense_ppl=dense_ppl,
            fingerprint=self.text.fingerprint if fingerprint else None,
        )


def heldout_windows(
    tokenizer: Any, source: str | None, seq_len: int, max_windows: int | None
) -> tuple[TextSource, torch.Tensor]:
    """The evaluation split of ``source`` (default: novel) and its first ``max_windows`` windows (all when None)."""
    text = load_text(source, "evaluation")
    return text, eval_windows(tokenizer, text, seq_len, max_windows)


def heldout_text(tokenizer: Any, source: str | None, seq_len: int, max_windows: int | None) -> HeldoutText:
    """:func:`heldout_windows` as one record."""
    return HeldoutText(*heldout_windows(tokenizer, source, seq_len, max_windows))


def perplexity_record(
    model: Any, text: TextSource, windows: torch.Tensor, *, batch_size: int = 4, progress: bool = False
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``windows`` cut from ``text``, with what it was measured on."""
    nll, tokens = mean_nll(
        model, windows, batch_size=batch_size, device=input_device(model), progress=progress
    )
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "source": text.name,
        "fingerprint": text.fingerprint,
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "predicted_tokens": tokens,
    }
