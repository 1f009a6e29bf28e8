"""Summaries of benchmark trials, in the manner of fuzzer evaluations: medians over trials,
never means; a miss counts as +inf (censored at the budget), so a cell whose median trial
missed has median "> budget" and every comparison with it is a lower bound.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from fuzzmmu.bench.engines import KvmThroughput
from fuzzmmu.bench.trial import TrialResult
from fuzzmmu.model.bugs import CATALOG

BASELINE = "atheris"
SEED_MUTANTS = frozenset(b.id for b in CATALOG if b.seed)


@dataclass(frozen=True)
class Cell:
    """One mutant under one engine, over its trials."""

    bug: str
    engine: str
    budget: float
    trials: int
    found: int
    median_s: float  # math.inf when the median trial missed
    max_s: float  # math.inf when any trial missed
    median_programs: float  # programs run to the find (a miss: all it ran)

    @property
    def censored(self) -> bool:
        return math.isinf(self.median_s)

    @property
    def capped_median(self) -> float:
        """The median with a miss counted as the budget: a lower bound when censored."""
        return min(self.median_s, self.budget)


def cells(trials: Sequence[TrialResult]) -> dict[tuple[str, str], Cell]:
    groups: dict[tuple[str, str], list[TrialResult]] = {}
    for t in trials:
        if t.bug is not None and t.error is None:
            groups.setdefault((t.bug, t.engine), []).append(t)
    out = {}
    for (bug, engine), ts in sorted(groups.items()):
        times = [t.seconds if t.in_budget else math.inf for t in ts]
        out[bug, engine] = Cell(bug, engine, max(t.budget for t in ts), len(ts),
                                sum(t.in_budget for t in ts), statistics.median(times), max(times),
                                statistics.median(t.programs for t in ts))
    return out


def ratio(cell: Cell, base: Cell | None) -> tuple[float, bool] | None:
    """cell's median over the baseline's, and whether that is only a lower bound (cell
    censored). None when the baseline is censored or missing: nothing to compare against."""
    if base is None or base.censored:
        return None
    return cell.capped_median / max(base.median_s, 1e-3), cell.censored


@dataclass(frozen=True)
class EngineSummary:
    engine: str
    mutants: int
    found: int  # mutants whose median trial found it
    catalog_s: float  # sum over mutants of the median time, misses at the budget
    # Over the mutants the baseline found: the sum of medians over the baseline's, and the
    # geometric mean of per-mutant ratios; lower bounds when one of this engine's was censored.
    catalog_ratio: float | None
    geomean_ratio: float | None
    lower_bound: bool
    programs_per_s: float | None  # on the clean model


def engine_summaries(table: dict[tuple[str, str], Cell], engines: Sequence[str],
                     throughput: dict[str, float]) -> list[EngineSummary]:
    """Comparisons with the baseline use the mutants the baseline found (its median trial):
    elsewhere there is no time of its to divide by; the found column shows those."""
    bugs = sorted({b for b, _ in table})
    compared = [b for b in bugs if (b, BASELINE) in table and not table[b, BASELINE].censored]
    out = []
    for e in engines:
        mine = [table[b, e] for b in bugs if (b, e) in table]
        paired = [(table[b, e], table[b, BASELINE]) for b in compared if (b, e) in table]
        catalog = geomean = None
        if e != BASELINE and paired:
            catalog = sum(c.capped_median for c, _ in paired) / \
                max(sum(base.median_s for _, base in paired), 1e-3)
            geomean = math.exp(statistics.fmean(
                math.log(max(ratio(c, base)[0], 1e-6)) for c, base in paired))  # type: ignore[index]
        out.append(EngineSummary(
            e, len(mine), sum(not c.censored for c in mine),
            sum(c.capped_median for c in mine), catalog, geomean,
            any(c.censored for c, _ in paired), throughput.get(e)))
    return out


@dataclass(frozen=True)
class MinimizeSummary:
    count: int
    median_before: float
    median_after: float
    max_after: int
    under_10: int
    all_one_minimal: bool
    median_runs: float
    max_runs: int
    max_seconds: float


def minimize_summary(trials: Sequence[TrialResult]) -> MinimizeSummary | None:
    ms = [t.minimized for t in trials if t.minimized]
    if not ms:
        return None
    return MinimizeSummary(len(ms), statistics.median(m["ops_before"] for m in ms),
                           statistics.median(m["ops_after"] for m in ms),
                           max(m["ops_after"] for m in ms),
                           sum(m["ops_after"] < 10 for m in ms),
                           all(m["one_minimal"] for m in ms),
                           statistics.median(m["runs"] for m in ms), max(m["runs"] for m in ms),
                           max(m["seconds"] for m in ms))


def throughput(trials: Sequence[TrialResult]) -> dict[str, float]:
    """Programs per second per engine on the clean model (the bug-less trials)."""
    out: dict[str, list[float]] = {}
    for t in trials:
        if t.bug is None and t.error is None and t.seconds > 0:
            out.setdefault(t.engine, []).append(t.programs / t.seconds)
    return {e: statistics.median(v) for e, v in out.items()}


def clean_divergences(trials: Sequence[TrialResult]) -> list[TrialResult]:
    """Finds in the throughput runs: a model or oracle bug, which voids every mutant's figures
    (a trial could have stopped at it instead of at its mutant)."""
    return [t for t in trials if t.bug is None and t.found]


def goals(table: dict[tuple[str, str], Cell], summaries: Sequence[EngineSummary],
          mini: MinimizeSummary | None) -> list[tuple[str, bool, str]]:
    """The benchmark's stated goals: (goal, met, the figures behind the verdict)."""
    out = []
    by = {s.engine: s for s in summaries}
    base = by.get(BASELINE)
    if base is not None and base.programs_per_s is not None:
        out.append(("throughput under Atheris >= 3,000 programs/s/core",
                    base.programs_per_s >= 3000, f"{base.programs_per_s:,.0f}/s"))
    mine = {b: c for (b, e), c in table.items() if e == BASELINE}
    seeds = {b: c for b, c in mine.items() if b in SEED_MUTANTS}
    if seeds:
        slow = [f"{b} {_time(c)}" for b, c in sorted(seeds.items()) if c.median_s > 10]
        out.append(("every seed mutant found by atheris in a median <= 10 s", not slow,
                    "all met" if not slow else "missed: " + ", ".join(slow)))
    if mine:
        slow = [f"{b} {_time(c)}" for b, c in sorted(mine.items()) if c.median_s > 60]
        out.append(("every catalogued mutant found by atheris in a median <= 60 s", not slow,
                    "all met" if not slow else "missed: " + ", ".join(slow)))
    for other, goal, met in (("random", "at least 10x faster than random", lambda r: r >= 10),
                             ("hypothesis", "faster than hypothesis", lambda r: r > 1)):
        s = by.get(other)
        if s is not None and s.catalog_ratio is not None:
            out.append((f"atheris {goal} over the catalog", met(s.catalog_ratio),
                        f"{other} needs {_x(s.catalog_ratio, s.lower_bound)} atheris's time "
                        f"(sum of medians); geometric mean of per-mutant ratios "
                        f"{_x(s.geomean_ratio, s.lower_bound)}"))
    if mini is not None:
        out.append(("minimized reproducers 1-minimal, typically < 10 ops, < 30 s each",
                    mini.all_one_minimal and mini.median_after < 10 and mini.max_seconds < 30,
                    f"{mini.count} minimized: median {mini.median_before:g} -> "
                    f"{mini.median_after:g} ops (max {mini.max_after}), "
                    f"{'all' if mini.all_one_minimal else 'NOT all'} 1-minimal, "
                    f"at most {mini.max_seconds:.1f} s"))
    return out


def kvm_line(kvm: KvmThroughput) -> str:
    """Real KVM's programs/s next to the model's, or why they were not measured."""
    if kvm.skipped:
        return f"real KVM: skipped ({kvm.skipped})"
    return (f"real KVM (/dev/kvm, one VM reset in place): {kvm.kvm:,.0f} programs/s; the clean "
            f"model {kvm.model:,.0f} programs/s on the same {kvm.programs:,} random programs "
            "of what the host supports")


def _time(c: Cell) -> str:
    return f"> {c.budget:g}s" if c.censored else f"{c.median_s:.1f}s"


def _x(r: float | None, lower: bool) -> str:
    return "-" if r is None else f"{'>= ' if lower else ''}{r:.2g}x"


_SUMMARY_COLUMNS = ("engine", "programs/s (clean)", "found (median trial)", "sum of medians",
                    "vs atheris (sum)", "vs atheris (geo. mean)")


@dataclass(frozen=True)
class _Rows:
    """The report's figures as text, for :func:`show` and :func:`markdown` to mark up."""

    mutants: list[tuple[str, list[tuple[str, bool]]]]  # bug, per engine (text, censored)
    engines: list[list[str]]
    goals: list[tuple[str, bool, str]]


def _rows(trials: Sequence[TrialResult], engines: Sequence[str], *, with_max: bool) -> _Rows:
    table = cells(trials)
    summaries = engine_summaries(table, engines, throughput(trials))
    mutants = []
    for bug in sorted({b for b, _ in table}, key=lambda b: (b not in SEED_MUTANTS, b)):
        row = []
        for e in engines:
            c = table.get((bug, e))
            if c is None:
                row.append(("-", False))
                continue
            most = "-" if math.isinf(c.max_s) else f"{c.max_s:.1f}"
            text = f"{c.found}/{c.trials} {_time(c)}{f' ({most})' if with_max else ''} " \
                   f"{c.median_programs:g}p"
            r = ratio(c, table.get((bug, BASELINE)))
            if e != BASELINE and r is not None:
                text += f" {_x(*r)}"
            row.append((text, c.censored))
        mutants.append((bug, row))
    rows = [[x.engine, "-" if x.programs_per_s is None else f"{x.programs_per_s:,.0f}",
             f"{x.found}/{x.mutants}", f"{x.catalog_s:.0f} s",
             _x(x.catalog_ratio, x.lower_bound), _x(x.geomean_ratio, x.lower_bound)]
            for x in summaries]
    return _Rows(mutants, rows, goals(table, summaries, minimize_summary(trials)))


def show(console: Console, trials: Sequence[TrialResult], engines: Sequence[str],
         kvm: KvmThroughput | None = None) -> None:
    """``kvm``: real KVM's throughput (None: not measured)."""
    rows = _rows(trials, engines, with_max=True)
    t = Table(title="time to first divergence: found/trials, median (max) seconds, "
                    "median programs; ratio of the median to atheris's",
              title_justify="left", show_lines=False)
    t.add_column("mutant", overflow="fold")
    for e in engines:
        t.add_column(e, justify="right")
    for bug, row in rows.mutants:
        t.add_row(bug + (" [yellow](seed)[/]" if bug in SEED_MUTANTS else ""),
                  *(f"[red]{text}[/]" if censored else text for text, censored in row))
    console.print(t)
    s = Table(title="engines over the catalog", title_justify="left")
    for col in _SUMMARY_COLUMNS:
        s.add_column(col, justify="right")
    for r in rows.engines:
        s.add_row(*r)
    console.print(s)
    if kvm is not None:
        console.print(kvm_line(kvm), highlight=False)
    for goal, met, why in rows.goals:
        console.print(f"{'[green]met[/]   ' if met else '[red]missed[/]'} {goal}: {why}",
                      highlight=False)
    for c in clean_divergences(trials):
        console.print(f"[bold red]the clean model diverged[/] under {c.engine} (trial "
                      f"{c.trial}, seed {c.seed}) after {c.programs:,} programs: {c.kind} "
                      f"{c.signature}; its program is in bench.json", highlight=False)
    errors = [t for t in trials if t.error]
    for err in errors:
        console.print(f"[red]error[/] {err.engine} {err.bug} trial {err.trial}: {err.error}",
                      highlight=False)


def markdown(trials: Sequence[TrialResult], engines: Sequence[str],
             kvm: KvmThroughput | None = None) -> str:
    """The report as Markdown tables, for a README or a pull request: the figures of
    :func:`show`, the found cells in bold."""
    rows = _rows(trials, engines, with_max=False)

    def md(text: str) -> str:
        return text.replace(">= ", "&ge;").replace("> ", "&gt;")

    lines = ["| mutant | " + " | ".join(engines) + " |", "|---|" + "---:|" * len(engines)]
    for bug, row in rows.mutants:
        marked = [md(text) if censored or text == "-" else f"**{md(text)}**"
                  for text, censored in row]
        lines.append(f"| `{bug}`{' (seed)' if bug in SEED_MUTANTS else ''} | "
                     + " | ".join(marked) + " |")
    lines += ["", "| " + " | ".join(_SUMMARY_COLUMNS) + " |",
              "|---|" + "---:|" * (len(_SUMMARY_COLUMNS) - 1)]
    lines += ["| " + " | ".join(md(x) for x in r) + " |" for r in rows.engines]
    lines.append("")
    if kvm is not None:
        lines.append(f"* {kvm_line(kvm)}")
    lines += [f"* {'met' if met else '**missed**'}: {goal}: {why}" for goal, met, why in rows.goals]
    lines += [f"* **the clean model diverged** under {c.engine} (trial {c.trial}): {c.kind} "
              f"`{c.signature}`" for c in clean_divergences(trials)]
    return "\n".join(lines) + "\n"


def summary_json(trials: Sequence[TrialResult], engines: Sequence[str],
                 kvm: KvmThroughput | None = None) -> dict[str, object]:
    table = cells(trials)
    thr = throughput(trials)
    summaries = engine_summaries(table, engines, thr)
    mini = minimize_summary(trials)

    def num(x: float | None) -> float | str | None:
        return "inf" if x is not None and math.isinf(x) else x

    return {
        "cells": [{"bug": c.bug, "engine": c.engine, "trials": c.trials, "found": c.found,
                   "median_s": num(c.median_s), "max_s": num(c.max_s),
                   "median_programs": c.median_programs,
                   "ratio_to_atheris": (r[0] if (r := ratio(c, table.get((c.bug, BASELINE))))
                                        else None),
                   "ratio_is_lower_bound": bool(r and r[1])} for c in table.values()],
        "engines": [vars(s) for s in summaries],
        "throughput": thr,
        "kvm_throughput": None if kvm is None else kvm.to_json(),
        "minimize": vars(mini) if mini else None,
        "goals": [{"goal": g, "met": m, "figures": w} for g, m, w in
                  goals(table, summaries, mini)],
        "clean_divergences": [t.to_json() for t in clean_divergences(trials)],
    }
