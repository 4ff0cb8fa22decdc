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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attnconv.errors import AttnconvError

_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    root = os.environ.get("ATTNCONV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "attnconv")
    return Path(root) / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies what the tokenizer produces: its vocabulary, special tokens and class."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    return h.hexdigest()


def texts_fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def tokenize_cached(texts: list[str], tokenizer, cache_dir: str | Path | None = None) -> tuple[np.ndarray, str]:
    """All documents as one int32 stream of token ids, EOS between documents; cached by tokenizer+data hash.

    Returns (ids, key). The cache file is written to a temporary name and renamed, so a killed run
    never leaves a truncated cache behind.
    """
    key = hashlib.sha256(
        f"v{_CACHE_VERSION}:{tokenizer_fingerprint(tokenizer)}:{texts_fingerprint(texts)}".encode()
    ).hexdigest()[:24]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"tokens-{key}.npy"
    if path.is_file():
        try:
            return np.load(path, allow_pickle=False), key
        except (OSError, ValueError):
            pass  # unreadable cache: tokenise again and replace it
    eos = tokenizer.eos_token_id
    parts = []
    limit = tokenizer.model_max_length
    tokenizer.model_max_length = sys.maxsize  # whole documents are meant: silence the too-long warning
    try:
        for doc in texts:
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            parts.append(np.asarray(ids, dtype=np.int32))
            if eos is not None:
                parts.append(np.asarray([eos], dtype=np.int32))
    finally:
        tokenizer.model_max_length = limit
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".tokens-{key}.{os.getpid()}.npy"
        np.save(tmp, stream, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full cache only costs a re-tokenisation next time
    return stream, key


def pack_blocks(stream: np.ndarray, block_len: int) -> torch.Tensor:
    """[n_blocks, block_len] int64 view of the stream; the tail shorter than a block is dropped."""
    n = len(stream) // block_len
    return torch.from_numpy(stream[: n * block_len].astype(np.int64)).view(n, block_len)


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


def eval_windows(stream: np.ndarray, seq_len: int, max_windows: int) -> torch.Tensor:
    """Disjoint held-out windows of seq_len + 1 tokens (at most max_windows, evenly spread over the data)."""
    blocks = pack_blocks(stream, seq_len + 1)
    if len(blocks) > max_windows:
        idx = torch.linspace(0, len(blocks) - 1, max_windows).round().long()
        blocks = blocks[idx]
    return blocks
