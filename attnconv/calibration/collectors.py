"""Collectors: statistics of one decoder layer's attention input, accumulated batch by batch.

A collector sees x, the hidden state after the layer's input norm (exactly what the q/k/v projections see),
and the position of every token. It keeps float64 sums and counts, never the activations, so its memory is
independent of the number of calibration tokens.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Collector(Protocol):
    def update(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """x: [n_tokens, hidden] float32 attention input; positions: [n_tokens] int64 position ids (for RoPE)."""
        ...


class CovarianceCollector:
    """Running float64 sums of x x^T and x over the calibration tokens.

    Every linear function of the attention input has its statistics in these: the outputs y = W x of a
    projection have E[y y^T] = W E[x x^T] W^T, so K, V and Q second moments need no second pass.
    The sums live on the device of the first batch; `to` moves them (e.g. to the CPU after a GPU pass).
    """

    def __init__(self):
        self.sum_xxT: torch.Tensor | None = None  # [hidden, hidden] float64
        self.sum_x: torch.Tensor | None = None  # [hidden] float64
        self.count = 0

    def update(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        x = x.to(torch.float64)  # [n_tokens, hidden]
        if self.sum_xxT is None:
            hidden = x.shape[-1]
            self.sum_xxT = torch.zeros(hidden, hidden, dtype=torch.float64, device=x.device)
            self.sum_x = torch.zeros(hidden, dtype=torch.float64, device=x.device)
        self.sum_xxT.addmm_(x.T, x)
        self.sum_x += x.sum(0)
        self.count += x.shape[0]

    def _check(self) -> None:
        if not self.count:
            raise ValueError("the collector has seen no tokens")

    def second_moment(self) -> torch.Tensor:
        """E[x x^T], [hidden, hidden] float64, not centred: what W Σ W^T needs for y = W x without a mean shift."""
        self._check()
        return self.sum_xxT / self.count

    def mean(self) -> torch.Tensor:
        """E[x], [hidden] float64."""
        self._check()
        return self.sum_x / self.count

    def covariance(self) -> torch.Tensor:
        """The centred covariance E[x x^T] - E[x] E[x]^T, [hidden, hidden] float64."""
        mean = self.mean()
        return self.second_moment() - torch.outer(mean, mean)

    def result(self) -> torch.Tensor:
        """The uncentred second moment E[x x^T] (see `second_moment`)."""
        return self.second_moment()

    def to(self, device: torch.device | str) -> CovarianceCollector:
        if self.sum_xxT is not None:
            self.sum_xxT, self.sum_x = self.sum_xxT.to(device), self.sum_x.to(device)
        return self

    @staticmethod
    def nbytes(hidden: int) -> int:
        """Memory one collector holds for a layer of width HIDDEN (for `estimate_memory`)."""
        return (hidden * hidden + hidden) * 8
