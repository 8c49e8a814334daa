"""Token windows cut from a text source: random windows for calibration, consecutive ones for perplexity."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from miprun.data.sources import TextSource
from miprun.errors import DataError


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer itself starts a sequence with BOS (Llama-2, Gemma: yes; SmolLM2, GPT-2: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


# Token streams per tokenizer object and source fingerprint: compare, the oracle and the stability study
# cut windows from the same source many times, and tokenizing 350 k tokens takes a second or two.
_STREAMS: weakref.WeakKeyDictionary[Any, dict[str, tuple[int, ...]]] = weakref.WeakKeyDictionary()


def _token_stream(tokenizer: Any, source: TextSource) -> tuple[int, ...]:
    """The source's paragraphs joined with ``"\\n\\n"``, tokenized once per tokenizer without special tokens."""
    try:
        memo = _STREAMS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable or not hashable: no memo
        memo = {}
    if source.fingerprint not in memo:
        text = "\n\n".join(source.texts)
        memo[source.fingerprint] = tuple(
            tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        )
    return memo[source.fingerprint]


def _cut(tokenizer: Any, source: TextSource, seq_len: int) -> torch.Tensor:
    """All non-overlapping windows of the source, in text order: (num_available, seq_len)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, not {seq_len}")
    ids = torch.tensor(_token_stream(tokenizer, source), dtype=torch.long)
    bos = _adds_bos(tokenizer)
    body = seq_len - 1 if bos else seq_len
    count = ids.numel() // body
    windows = ids[: count * body].view(count, body)
    if bos:
        windows = torch.cat(
            [torch.full((count, 1), tokenizer.bos_token_id, dtype=torch.long), windows], dim=1
        )
    return windows


def available_windows(tokenizer: Any, source: TextSource, seq_len: int) -> int:
    """How many non-overlapping windows of ``seq_len`` tokens the source holds."""
    return int(_cut(tokenizer, source, seq_len).shape[0])


def token_windows(
    tokenizer: Any, source: TextSource, num_windows: int, seq_len: int, seed: int
) -> torch.Tensor:
    """``num_windows`` non-overlapping windows of ``seq_len`` tokens drawn without replacement.

    The paragraphs are joined with ``"\\n\\n"`` and tokenized once without special tokens, then cut into
    consecutive windows. When the tokenizer itself adds BOS (``tokenizer("a")`` starts with it), every
    window is ``[BOS] + seq_len - 1`` text tokens, as the model saw text in training; otherwise it is
    ``seq_len`` text tokens. Windows are drawn with a ``torch.Generator`` seeded by ``seed``.

    Returns:
        LongTensor of shape (num_windows, seq_len).
    """
    if num_windows < 1:
        raise DataError(f"num_windows must be at least 1, not {num_windows}")
    windows = _cut(tokenizer, source, seq_len)
    if windows.shape[0] < num_windows:
        total = len(_token_stream(tokenizer, source))
        raise DataError(
            f"{source.name} has {total} tokens: {windows.shape[0]} windows of {seq_len}, but {num_windows} "
            f"were asked for (about {num_windows * seq_len} tokens). Lower the number of windows "
            "(--samples) or the sequence length (--seq-len), or use a larger text source (--calib)."
        )
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows.shape[0], generator=generator)[:num_windows]
    return windows[pick].contiguous()


def eval_windows(
    tokenizer: Any, source: TextSource, seq_len: int, max_windows: int | None = None
) -> torch.Tensor:
    """The first ``max_windows`` consecutive non-overlapping windows (all when None), for perplexity.

    Same tokenization and BOS convention as :func:`token_windows`; deterministic, no seed.

    Returns:
        LongTensor of shape (num_windows, seq_len).
    """
    windows = _cut(tokenizer, source, seq_len)
    if windows.shape[0] == 0:
        raise DataError(
            f"{source.name} is shorter than one window of {seq_len} tokens; lower the sequence length"
        )
    if max_windows is not None:
        windows = windows[:max_windows]
    return windows.contiguous()
