"""The KL-against-cache-size plot the quality benchmarks draw (methods.py, real_model.py): one line per series."""

from __future__ import annotations

from pathlib import Path


def kl_plot(series: dict[str, list[tuple[float, float]]], path: Path, *, xlabel: str, title: str,
            log_kl: bool = False) -> bool:
    """series: name -> [(cache size, KL)]; False when matplotlib is missing (the table is written anyway)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    if log_kl:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KL(source || converted), nats/token")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True
