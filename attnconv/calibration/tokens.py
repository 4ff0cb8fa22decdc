"""Calibration tokens from a `--calibrate SPEC` (the forms of `--data`): the first n_tokens of the text, in rows.

The text is read through `attnconv.textdata.Corpus` and tokenised a chunk at a time, stopping as soon as
enough tokens are in, so calibrating on 64k tokens of a large corpus reads a few hundred kB of it.
Documents are joined with the EOS token, as training data is (attnconv.uptrain.data).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import torch

from attnconv.errors import AttnconvError
from attnconv.textdata import CALIBRATION_SPEC, Corpus

CHUNK_CHARS = 1 << 16  # characters per tokenizer call: a few times what a 4k-token request needs
_CUT = re.compile(r"(?<=\S)\n(?=\S)")  # a lone line break between words: BPE tokenizers split there anyway


def _chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """TEXT in pieces of about SIZE characters, each cut after a lone line break where there is one."""
    start = 0
    while len(text) - start > size:
        cut = max((m.end() for m in _CUT.finditer(text, start + size // 2, start + size)), default=start + size)
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def _token_stream(corpus: Corpus, tokenizer) -> Iterator[list[int]]:
    """Token ids chunk by chunk, EOS after each document."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    limit = tokenizer.model_max_length
    tokenizer.model_max_length = sys.maxsize  # long chunks are meant: silence the too-long warning
    try:
        for text, ends_document in corpus:
            for chunk in _chunks(text):
                yield tokenizer(chunk, add_special_tokens=False)["input_ids"]
            if ends_document:
                yield eos
    finally:
        tokenizer.model_max_length = limit


def calibration_tokens(spec: str | None, tokenizer, n_tokens: int, seq_len: int) -> torch.Tensor:
    """[n_seq, seq_len] int64 token ids: the first ceil(n_tokens / seq_len) * seq_len tokens of SPEC's text.

    spec: a --data form (file, folder, hub dataset, tinyshakespeare[:split]); None is the first half of the
    shipped WikiText-2 test split (wikitext-2-test:calib), disjoint from what eval scores by default. Hub
    datasets default to their train split. Raises AttnconvError when the text is too short.
    """
    if n_tokens < 1 or seq_len < 1:
        raise AttnconvError(f"calibration needs at least one token and a sequence length >= 1 "
                            f"(got --calib-tokens {n_tokens}, sequence length {seq_len})")
    n_seq = -(-n_tokens // seq_len)
    need = n_seq * seq_len
    spec = spec or CALIBRATION_SPEC
    parts, have = [], 0
    for ids in _token_stream(Corpus(spec, default_split="train"), tokenizer):
        parts.append(torch.as_tensor(ids, dtype=torch.long))
        have += len(ids)
        if have >= need:
            break
    if have < need:
        lower = (f"lower --calib-tokens to {have // seq_len * seq_len} or less" if have >= seq_len
                 else f"use sequences shorter than {seq_len} tokens")
        raise AttnconvError(f"{spec} has only {have} tokens, fewer than the {need} asked for calibration "
                            f"({n_seq} x {seq_len}); {lower} or point --calibrate at more text")
    return torch.cat(parts)[:need].view(n_seq, seq_len)
