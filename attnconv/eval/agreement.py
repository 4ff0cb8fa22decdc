"""How closely a model follows its source on the same windows: KL(source || model), top-1 agreement, ppl ratio.

Both models see exactly the windows of the perplexity evaluation and are compared on the scored tokens only,
so the perplexities reported beside the agreement are those of the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnconv.errors import AttnconvError
from attnconv.eval.perplexity import PerplexityResult, TextStats, iter_scored_logits, plan_windows


@dataclass
class AgreementResult:
    kl_sum: float  # sum over scored tokens of KL(source || model), in nats
    top1_matches: int
    n_tokens: int
    model: PerplexityResult
    source: PerplexityResult

    @property
    def kl(self) -> float:
        """Mean per-token KL(source || model), nats."""
        return self.kl_sum / self.n_tokens

    @property
    def top1_agreement(self) -> float:
        return self.top1_matches / self.n_tokens

    @property
    def ppl_ratio(self) -> float:
        """Model token perplexity / source token perplexity (1.0 = no loss)."""
        return math.exp((self.model.nll_sum - self.source.nll_sum) / self.n_tokens)

    def to_dict(self) -> dict:
        return {"kl": self.kl, "top1_agreement": self.top1_agreement, "ppl_ratio": self.ppl_ratio,
                "kl_sum": self.kl_sum, "top1_matches": self.top1_matches, "n_tokens": self.n_tokens}


def reference_logits(source, ids: torch.Tensor, *, max_length: int, stride: int,
                     batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The source's scored logits and targets for every batch of windows, to compare several models with one
    source without running it again for each (memory: scored tokens x vocabulary x 4 bytes)."""
    windows = plan_windows(len(ids), max_length, stride)
    return list(iter_scored_logits(source, ids, windows, batch_size))


def agreement(model, source, ids: torch.Tensor, stats: TextStats, *, max_length: int, stride: int,
              batch_size: int = 4, on_batch: Callable[[int], None] | None = None) -> AgreementResult:
    """Run `model` and `source` in lockstep over the windows of `ids` [n]; both perplexities come out too.
    SOURCE is a model, or what `reference_logits` returned for the same ids, windows and batch size."""
    windows = plan_windows(len(ids), max_length, stride)
    kl_sum = nll_model = nll_source = 0.0
    matches = n = 0
    cached = isinstance(source, list)
    pairs = zip(iter_scored_logits(model, ids, windows, batch_size, on_batch),
                source if cached else iter_scored_logits(source, ids, windows, batch_size), strict=True)
    for (logits_m, targets), (logits_s, _) in pairs:
        if logits_m.shape[-1] != logits_s.shape[-1]:
            raise AttnconvError(f"the model predicts {logits_m.shape[-1]} token ids and the reference "
                                f"{logits_s.shape[-1]}; compare models with the same vocabulary")
        logits_s = logits_s.to(logits_m.device)
        targets = targets.to(logits_m.device)
        logp_m = F.log_softmax(logits_m, dim=-1)  # [N, V]
        logp_s = F.log_softmax(logits_s, dim=-1)  # [N, V]
        # kl_div(input=log q, target=log p) sums p * (log p - log q): KL(source || model).
        kl_sum += F.kl_div(logp_m, logp_s, log_target=True, reduction="sum").item()
        matches += (logits_m.argmax(-1) == logits_s.argmax(-1)).sum().item()
        nll_model += F.nll_loss(logp_m, targets, reduction="sum").item()
        nll_source += F.nll_loss(logp_s, targets, reduction="sum").item()
        n += len(targets)
    common = dict(n_tokens=n, n_words=stats.n_words, n_bytes=stats.n_bytes, max_length=max_length, stride=stride,
                  n_windows=len(windows))
    return AgreementResult(kl_sum, matches, n, PerplexityResult(nll_model, **common),
                           PerplexityResult(nll_source, **common))
