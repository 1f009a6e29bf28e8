"""Survival curves of a benchmark: for each engine, the fraction of (mutant, trial) searches
that had found their divergence by time t. Needs matplotlib (``pip install -e '.[bench]'``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fuzzmmu.bench.trial import TrialResult


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def curves(trials: Sequence[TrialResult], engines: Sequence[str]
           ) -> dict[str, tuple[list[float], list[float]]]:
    """Per engine, the step function's corners: times and the fraction found by then."""
    out = {}
    for e in engines:
        mine = [t for t in trials if t.engine == e and t.bug is not None and t.error is None]
        if not mine:
            continue
        times = sorted(t.seconds for t in mine if t.in_budget)
        xs, ys = [0.0], [0.0]
        for i, x in enumerate(times, 1):
            xs.append(x)
            ys.append(i / len(mine))
        xs.append(max(t.budget for t in mine))
        ys.append(ys[-1])
        out[e] = (xs, ys)
    return out


def survival_plot(trials: Sequence[TrialResult], engines: Sequence[str], out: Path,
                  title: str) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a CI or fuzzing machine
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable("the PNG plot needs matplotlib: pip install -e '.[bench]'") \
            from exc
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for e, (xs, ys) in curves(trials, engines).items():
        ax.step(xs, ys, where="post", label=e, linewidth=2)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("seconds since the search started (log scale above 1 s)")
    ax.set_ylabel("fraction of (mutant, trial) searches that found a divergence")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
