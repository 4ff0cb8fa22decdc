"""Strided sliding-window perplexity (the Hugging Face perplexity guide), with windows batched.

Windows of `max_length` tokens move by `stride`; each window scores only the tokens that no previous
window scored, with the rest of the window as context. Unlike the guide's final `exp(mean of window
means)`, the result is exact: the sum of all token NLLs divided by the number of scored tokens.
Word/byte perplexity and bits per byte follow lm-evaluation-harness, counted on the original text.

Speed: windows of equal shape go through the model together, and only the positions that predict a
scored token reach the LM head (`logits_to_keep`), so the context half of each window costs no vocabulary
projection or softmax (the guide's loop computes both for every position).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from attnconv.errors import AttnconvError

DOC_SEPARATOR = "\n\n"  # documents are joined like the guide joins WikiText lines


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of the stream; the last `n_scored` of them are scored (each predicted from its left)."""

    begin: int
    end: int
    n_scored: int

    @property
    def length(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class TextStats:
    """What the corpus holds, counted on the original documents (lm-evaluation-harness conventions)."""

    n_words: int
    n_bytes: int


@dataclass
class PerplexityResult:
    nll_sum: float  # natural-log NLL summed over scored tokens
    n_tokens: int  # scored tokens
    n_words: int
    n_bytes: int
    max_length: int
    stride: int
    n_windows: int

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll_sum / self.n_words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.nll_sum / self.n_bytes)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / (self.n_bytes * math.log(2))

    def to_dict(self) -> dict:
        return {**asdict(self), "token_perplexity": self.token_perplexity, "word_perplexity": self.word_perplexity,
                "byte_perplexity": self.byte_perplexity, "bits_per_byte": self.bits_per_byte}


def text_stats(texts: list[str]) -> TextStats:
    """Words as the harness's wikitext task counts them (`re.split(r"\\s+")`), and UTF-8 bytes, per document."""
    return TextStats(n_words=sum(len(re.split(r"\s+", t)) for t in texts),
                     n_bytes=sum(len(t.encode("utf-8")) for t in texts))


def tokenize_corpus(tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream for all documents joined by a blank line, tokenized once. Returns [n] int64."""
    # verbose=False: the stream is meant to be longer than model_max_length; windows cut it later.
    ids = tokenizer(DOC_SEPARATOR.join(texts), return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def plan_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The guide's windows: begin = 0, S, 2S, ...; each scores the tokens after the previous window's end."""
    if max_length < 2:
        raise AttnconvError(f"--max-length {max_length} is too small; use at least 2 tokens")
    if not 1 <= stride <= max_length:
        raise AttnconvError(f"--stride {stride} must be between 1 and --max-length ({max_length})")
    if n_tokens < 2:
        raise AttnconvError(f"the data has {n_tokens} token(s); perplexity needs at least 2")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        # A window's first token has no context inside it, so it is never scored (the corpus's first token).
        windows.append(Window(begin, end, min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def batch_windows(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal shape, at most `batch_size` at a time.

    Equal length needs no padding; equal `n_scored` lets the whole batch skip the logits of the context
    part (the first window, which scores nearly all its tokens, goes alone instead of costing the others).
    """
    if batch_size < 1:
        raise AttnconvError(f"--batch-size {batch_size} must be at least 1")
    batch: list[Window] = []
    for w in windows:
        if batch and (len(batch) == batch_size or (w.length, w.n_scored) != (batch[0].length, batch[0].n_scored)):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def scored_logits(model, ids: torch.Tensor, batch: list[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits predicting each scored token of the batch, and those tokens: [N, V], [N]."""
    device = next(model.parameters()).device
    input_ids = torch.stack([ids[w.begin:w.end] for w in batch]).to(device)  # [b, w]
    width = input_ids.shape[1]
    keep = max(w.n_scored for w in batch) + 1  # positions w-keep .. w-1; the last one predicts past the window
    kwargs = {"logits_to_keep": keep} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits[:, -keep:]  # [b, keep, V]
    rows, targets = [], []
    for i, w in enumerate(batch):
        rows.append(logits[i, keep - 1 - w.n_scored:keep - 1])  # [n_scored, V]
        targets.append(input_ids[i, width - w.n_scored:])  # [n_scored]
    return torch.cat(rows).float(), torch.cat(targets)


def iter_scored_logits(model, ids: torch.Tensor, windows: list[Window], batch_size: int,
                       on_batch: Callable[[int], None] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`scored_logits` for every batch of windows; `on_batch(n_windows)` reports progress."""
    for batch in batch_windows(windows, batch_size):
        yield scored_logits(model, ids, batch)
        if on_batch is not None:
            on_batch(len(batch))


def perplexity(model, ids: torch.Tensor, stats: TextStats, *, max_length: int, stride: int, batch_size: int = 4,
               on_batch: Callable[[int], None] | None = None) -> PerplexityResult:
    """Sliding-window perplexity of `model` on token stream `ids` [n] (see the module docstring)."""
    windows = plan_windows(len(ids), max_length, stride)
    nll_sum, n_scored = 0.0, 0
    for logits, targets in iter_scored_logits(model, ids, windows, batch_size, on_batch):
        nll_sum += F.cross_entropy(logits, targets.to(logits.device), reduction="sum").item()
        n_scored += len(targets)
    return PerplexityResult(nll_sum, n_scored, stats.n_words, stats.n_bytes, max_length, stride, len(windows))
