"""The registry of GQA/MQA merge methods: names, help, sources and what each needs. Torch-free, so the CLI, the
settings checks and the docs read it without loading torch; the tensor functions live in gqa.py, keyed by name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    help: str
    source: str  # where the method comes from
    uses_seed: bool = False


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in [
        MethodInfo("mean", "mean-pool the K/V heads of each group (the GQA paper's choice)",
                   "Ainslie et al. 2023, GQA"),
        MethodInfo("first", "keep the first head of each group (paper ablation)", "Ainslie et al. 2023, GQA"),
        MethodInfo("random", "random initialisation scaled to the source's std, biases zero (paper ablation)",
                   "Ainslie et al. 2023, GQA", uses_seed=True),
    ]
}
