"""Training data: documents -> token ids (tokenised once, cached on disk) -> fixed blocks in a seeded order.

Blocks hold `seq_len + 1` tokens: inputs are `block[:-1]`, targets `block[1:]`, so every block gives
`seq_len` predictions and no token is wasted at block edges. Documents are joined with the EOS token.
The order of blocks is a permutation drawn from the seed, one per epoch, so the position in the data
is fully described by the number of global batches already consumed (saved in checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from attnconv.errors import AttnconvError, cache_root
from attnconv.textdata import Corpus

_CACHE_VERSION = 3  # 2: raw int32 files, memory-mapped; 3: with a trailer (count, largest id)
_TRAILER = np.dtype([("magic", "S8"), ("count", "<u8"), ("max_id", "<i8")])  # 24 bytes after the ids
_MAGIC = b"attntok3"
BATCH_CHARS = 1 << 20  # characters per tokenizer call: bounded memory, and fast tokenizers use every core


def default_cache_dir() -> Path:
    return cache_root() / "tokens"


class TokenizerFacts(NamedTuple):
    """What a run needs of its tokenizer's vocabulary, read once: a 50k-token vocabulary takes ~0.3 s to read and
    hash, and a run needs it for each corpus and for its identity."""

    fingerprint: str  # identifies what the tokenizer produces: its vocabulary, special tokens and class
    vocab_size: int  # the largest id + 1: ids at or above it are not the tokenizer's


def tokenizer_facts(tokenizer) -> TokenizerFacts:
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return TokenizerFacts(h.hexdigest(), max(vocab.values(), default=-1) + 1)


def _pieces(texts) -> Iterable[tuple[str, bool]]:
    """A Corpus yields (text, ends_document) pieces; a list of strings is one document per string."""
    return texts if isinstance(texts, Corpus) else [(t, True) for t in texts if t]


def texts_fingerprint(texts) -> str:
    """sha256 of the pieces and where documents end; raises AttnconvError when there is no text at all."""
    h, any_text = hashlib.sha256(), False
    for text, ends in _pieces(texts):
        b = text.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + (b"\1" if ends else b"\0"))
        h.update(b)
        any_text = any_text or not text.isspace()
    if not any_text:
        what = texts.spec if isinstance(texts, Corpus) else "the data"
        raise AttnconvError(f"{what}: the data is empty; point --data at a file or dataset with text")
    return h.hexdigest()


def _batches(pieces: Iterable[tuple[str, bool]]):
    batch, size, max_chars = [], 0, BATCH_CHARS
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _token_chunks(texts, tokenizer) -> Iterator[np.ndarray]:
    """int32 token ids piece by piece (EOS after each document), tokenised a few MB at a time."""
    eos = tokenizer.eos_token_id
    eos_ids = np.asarray([eos] if eos is not None else [], dtype=np.int32)
    limit = tokenizer.model_max_length
    tokenizer.model_max_length = sys.maxsize  # whole documents are meant: silence the too-long warning
    try:
        for batch in _batches(_pieces(texts)):
            ids = tokenizer([t for t, _ in batch], add_special_tokens=False)["input_ids"]
            for (_, ends), piece_ids in zip(batch, ids, strict=True):
                yield np.asarray(piece_ids, dtype=np.int32)
                if ends:
                    yield eos_ids
    finally:
        tokenizer.model_max_length = limit


def _in_memory(texts, tokenizer) -> np.ndarray:
    parts = list(_token_chunks(texts, tokenizer))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _open_tokens(path: Path, vocab_size: int) -> np.ndarray:
    """The cached stream, memory-mapped: pages are read as training reaches them. ValueError when the file is
    not a complete cache of ids below VOCAB_SIZE (its trailer records the count and the largest id)."""
    size = path.stat().st_size
    if size < _TRAILER.itemsize:
        raise ValueError("no trailer")
    with open(path, "rb") as fh:
        fh.seek(size - _TRAILER.itemsize)
        trailer = np.frombuffer(fh.read(_TRAILER.itemsize), dtype=_TRAILER)[0]
    count = int(trailer["count"])
    if trailer["magic"] != _MAGIC or count * 4 + _TRAILER.itemsize != size or int(trailer["max_id"]) >= vocab_size:
        raise ValueError("truncated, or ids beyond the vocabulary")
    if count == 0:
        return np.zeros(0, dtype=np.int32)
    return np.memmap(path, dtype="<i4", mode="r", shape=(count,))


def _clean_stale_tmp(cache: Path) -> None:
    """Remove the half-written caches of tokenisations that were killed (their process is gone)."""
    from attnconv.outputs import pid_alive

    if not cache.is_dir():
        return
    for p in cache.glob(".tokens-*.tmp"):
        try:
            pid = int(p.name.split(".")[-2])
        except ValueError:
            continue
        if not pid_alive(pid):
            p.unlink(missing_ok=True)


def tokenize_cached(texts, tokenizer, cache_dir: str | Path | None = None,
                    facts: TokenizerFacts | None = None) -> tuple[np.ndarray, str]:
    """All documents as one int32 stream of token ids, EOS after each document; cached by tokenizer+data hash.

    texts: a list of documents or a `Corpus` (read lazily). Returns (ids, key); the ids are memory-mapped
    from the cache file, so a corpus larger than memory trains from disk. Tokens are written to the cache
    as they are produced, under a temporary name renamed when complete, so a killed run never leaves a
    truncated cache behind; where the cache cannot be written, the stream is built in memory instead.
    facts: `tokenizer_facts(tokenizer)`, when the caller already has them.
    """
    fingerprint, vocab_size = facts or tokenizer_facts(tokenizer)
    key = hashlib.sha256(f"v{_CACHE_VERSION}:{fingerprint}:{texts_fingerprint(texts)}".encode()).hexdigest()[:24]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"tokens-{key}.i32"
    _clean_stale_tmp(cache)
    if path.is_file():
        try:
            return _open_tokens(path, vocab_size), key
        except (OSError, ValueError):  # damaged (truncated, edited): tokenise again and replace it
            print(f"note: the token cache {path} is damaged; tokenising again", file=sys.stderr)
    tmp = cache / f".tokens-{key}.{os.getpid()}.tmp"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        out = open(tmp, "wb")
    except OSError:  # a read-only cache only costs a re-tokenisation next time
        return _in_memory(texts, tokenizer), key
    try:
        count, max_id = 0, -1
        with out:
            for chunk in _token_chunks(texts, tokenizer):
                out.write(chunk.astype("<i4", copy=False).tobytes())
                count += len(chunk)
                max_id = max(max_id, int(chunk.max())) if len(chunk) else max_id
            out.write(np.array([(_MAGIC, count, max_id)], dtype=_TRAILER).tobytes())
        os.replace(tmp, path)
    except OSError:  # a full disk: tokenise in memory instead (the cache stays as it was)
        tmp.unlink(missing_ok=True)
        return _in_memory(texts, tokenizer), key
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _open_tokens(path, vocab_size), key


class TokenBlocks:
    """[n_blocks, block_len] blocks of a token stream, gathered (as int64) only when indexed.

    The stream may be memory-mapped: only the blocks of a batch are read, so memory does not grow with
    the corpus. Indexing with an int, a slice, a list or an index tensor returns an int64 tensor.
    """

    def __init__(self, stream: np.ndarray, block_len: int, vocab_size: int | None = None):
        n = len(stream) // block_len  # the tail shorter than a block is dropped
        self._rows = stream[: n * block_len].reshape(n, block_len)
        self.shape = (n, block_len)
        self.vocab_size = vocab_size
        self._source = getattr(stream, "filename", None)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        rows = np.asarray(self._rows[idx], dtype=np.int64)
        if self.vocab_size is not None and rows.size and (rows.max() >= self.vocab_size or rows.min() < 0):
            bad = int(rows.max() if rows.max() >= self.vocab_size else rows.min())
            where = f"the token cache {self._source} (delete it)" if self._source else "the tokenizer"
            raise AttnconvError(f"token id {bad} is outside the model's vocabulary of {self.vocab_size}; it comes "
                                f"from {where}, or the tokenizer has more tokens than the model: use its own")
        return torch.from_numpy(rows)


def pack_blocks(stream: np.ndarray, block_len: int, vocab_size: int | None = None) -> TokenBlocks:
    """Blocks of block_len tokens over the stream (see TokenBlocks); the tail shorter than a block is dropped.
    With vocab_size, every gathered block is checked to hold ids below it (a damaged cache fails in one line)."""
    return TokenBlocks(stream, block_len, vocab_size)


@dataclass
class BlockSchedule:
    """Which blocks each process reads at each step: deterministic from (seed, step), shared by all ranks.

    A global batch is `micro_batch * grad_accum * world` blocks; micro-step k of rank r reads slice
    [k, r] of the global batch laid out as [grad_accum, world, micro_batch]. One process with the same
    global batch reads the same blocks, so losses match across process counts.
    """

    n_blocks: int
    micro_batch: int
    grad_accum: int
    world: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.n_blocks // self.global_batch

    def check(self, what: str) -> None:
        if self.steps_per_epoch < 1:
            raise AttnconvError(
                f"{what} gives {self.n_blocks} blocks but one step needs {self.global_batch} "
                "(batch-size x grad-accum x processes); add data or lower --seq-len/--batch-size/--grad-accum"
            )

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_blocks, generator=g)

    def micro_batches(self, step: int, rank: int) -> list[torch.Tensor]:
        """Block indices for optimizer step `step` (0-based) of `rank`: grad_accum tensors of [micro_batch]."""
        epoch, i = divmod(step, self.steps_per_epoch)
        glob = self._order(epoch)[i * self.global_batch:(i + 1) * self.global_batch]
        glob = glob.view(self.grad_accum, self.world, self.micro_batch)
        return [glob[k, rank] for k in range(self.grad_accum)]


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int, vocab_size: int | None = None) -> torch.Tensor:
    """Disjoint held-out windows of seq_len + 1 tokens (at most max_windows, evenly spread over the data)."""
    blocks = pack_blocks(stream, seq_len + 1, vocab_size)
    if len(blocks) > max_windows:
        return blocks[torch.linspace(0, len(blocks) - 1, max_windows).round().long()]
    return blocks[:]
