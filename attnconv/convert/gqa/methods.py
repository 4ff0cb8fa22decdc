"""The registry of GQA/MQA merge methods: names, help, sources and what each needs. Torch-free, so the CLI, the
settings checks and the docs read it without loading torch; the tensor functions live in gqa/pool.py (mean, first,
random: one tensor at a time) and gqa/calibrated.py (grouped, aligned, fit: one layer at a time, on calibration
statistics), keyed by name. The calibrated methods compose: `grouped+aligned+fit` runs them in that order."""

from __future__ import annotations

from dataclasses import dataclass

from attnconv.errors import AttnconvError

CALIBRATED_STEPS = ("grouped", "aligned", "fit")  # pipeline order of the composable calibrated methods


@dataclass(frozen=True)
class Method:
    """A merge method as the settings parse it once (`parse_method`); plan, ops and targets receive this."""

    name: str
    help: str
    source: str  # where the method comes from
    uses_seed: bool = False
    calibrated: bool = False  # reads statistics of each layer's attention input on calibration text

    @property
    def steps(self) -> tuple[str, ...]:
        """The calibrated steps this method runs, in pipeline order (empty for mean, first, random)."""
        return tuple(s for s in CALIBRATED_STEPS if s in self.name.split("+")) if self.calibrated else ()


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("mean", "mean-pool the K/V heads of each group (the GQA paper's choice)",
                   "Ainslie et al. 2023, GQA"),
        Method("first", "keep the first head of each group (paper ablation)", "Ainslie et al. 2023, GQA"),
        Method("random", "random initialisation scaled to the source's std, biases zero (paper ablation)",
                   "Ainslie et al. 2023, GQA", uses_seed=True),
        Method("grouped", "group KV heads by the cost of merging them on calibration data (balanced groups; "
                   "query rows and o_proj columns follow their KV head), then mean-pool",
                   "activation-informed grouping as in AsymGQA, Chen et al. 2024, arXiv:2406.14963 (here balanced, "
                   "every group the same size)", uses_seed=True, calibrated=True),
        Method("aligned", "rotate heads onto their group's frame before mean-pooling (Procrustes on "
                   "calibration data, RoPE-commuting for keys; the unmerged model is unchanged)",
                   "Jin et al. 2025, Align Attention Heads Before Merging Them, arXiv:2412.20677",
                   uses_seed=True, calibrated=True),
        Method("fit", "least-squares merge of K/V with compensating query/o_proj maps, minimising logit and "
                   "output error on calibration data", "closed form by Eckart-Young (joint truncated SVD of a "
                   "group's heads, as TransMLA does for MLA: Meng et al. 2025, arXiv:2502.07864)",
                   uses_seed=True, calibrated=True),
    ]
}

METHODS_HELP = ("How each group's K/V heads become one: " + "; ".join(
    f"{m.name}: {m.help}" + (" [calibrated]" if m.calibrated else "") for m in METHODS.values())
    + ". Calibrated methods combine with '+' in the order " + "+".join(CALIBRATED_STEPS)
    + " (e.g. grouped+aligned+fit).")


def parse_method(spec: str, label: str = "--method") -> Method:
    """The registry entry of SPEC: a registered name, or calibrated steps joined by '+' (any order; the result
    is named in pipeline order). Anything else is a one-line AttnconvError."""
    if spec in METHODS:
        return METHODS[spec]
    names = spec.split("+")
    if not all(n in CALIBRATED_STEPS for n in names) or len(set(names)) != len(names):
        plain = ", ".join(n for n, m in METHODS.items() if not m.calibrated)
        raise AttnconvError(f"{label} {spec!r} is not a method: use one of {plain}, or one or more of "
                            f"{', '.join(CALIBRATED_STEPS)} joined by '+' (e.g. grouped+aligned+fit); only "
                            "the calibrated methods combine")
    steps = [METHODS[n] for n in CALIBRATED_STEPS if n in names]
    return Method("+".join(m.name for m in steps), ", then ".join(m.help for m in steps),
                      "; ".join(m.source for m in steps), uses_seed=True, calibrated=True)
