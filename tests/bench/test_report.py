"""Benchmark summaries: medians with misses censored at the budget, ratios, goals."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from fuzzmmu.bench.plot import curves
from fuzzmmu.bench.report import (
    cells,
    engine_summaries,
    goals,
    minimize_summary,
    ratio,
    show,
    summary_json,
    throughput,
)
from fuzzmmu.bench.trial import TrialResult

SEED = "misaligned-pt-write-two-sptes"
OTHER = "cr0wp-not-in-role"


def t(bug: str | None, engine: str, k: int, seconds: float | None, programs: int = 100,
      budget: float = 30.0, minimized: dict | None = None) -> TrialResult:
    found = seconds is not None
    return TrialResult(bug, engine, k, k + 1, budget, found,
                       seconds if found else budget, programs, minimized=minimized)


def test_median_counts_misses_as_infinite() -> None:
    table = cells([t(SEED, "atheris", 0, 2.0), t(SEED, "atheris", 1, None),
                   t(SEED, "atheris", 2, 4.0)])
    c = table[SEED, "atheris"]
    assert (c.trials, c.found, c.median_s, c.max_s) == (3, 2, 4.0, math.inf)
    assert not c.censored
    table = cells([t(SEED, "random", 0, 2.0), t(SEED, "random", 1, None),
                   t(SEED, "random", 2, None)])
    c = table[SEED, "random"]
    assert c.censored and c.capped_median == 30.0


def test_a_find_after_the_budget_counts_as_a_miss() -> None:
    late = t(SEED, "atheris", 0, 31.0)
    c = cells([late, t(SEED, "atheris", 1, 3.0)])[SEED, "atheris"]
    assert (c.found, c.max_s) == (1, math.inf)
    assert curves([late], ["atheris"])["atheris"][1][-1] == 0.0


def test_trials_with_errors_and_clean_runs_are_not_cells() -> None:
    bad = t(SEED, "atheris", 0, 1.0)
    bad.error = "harness exited 1"
    assert cells([bad, t(None, "atheris", 0, None)]) == {}


def test_ratio_is_a_lower_bound_when_the_engine_missed() -> None:
    table = cells([t(SEED, "atheris", 0, 2.0), t(SEED, "random", 0, 8.0),
                   t(SEED, "hypothesis", 0, None)])
    assert ratio(table[SEED, "random"], table[SEED, "atheris"]) == (4.0, False)
    assert ratio(table[SEED, "hypothesis"], table[SEED, "atheris"]) == (15.0, True)
    assert ratio(table[SEED, "atheris"], None) is None


def test_catalog_comparisons_use_the_mutants_the_baseline_found() -> None:
    trials = [t(SEED, "atheris", 0, 2.0), t(SEED, "random", 0, 20.0),
              t(OTHER, "atheris", 0, None), t(OTHER, "random", 0, 1.0),
              t(None, "atheris", 0, None, programs=300, budget=10.0),
              t(None, "random", 0, None, programs=1000, budget=10.0)]
    thr = throughput(trials)
    assert thr == {"atheris": 30.0, "random": 100.0}
    by = {s.engine: s for s in engine_summaries(cells(trials), ["atheris", "random"], thr)}
    assert by["atheris"].catalog_ratio is None  # the baseline is not compared with itself
    assert (by["atheris"].found, by["random"].found) == (1, 2)
    assert by["random"].catalog_ratio == 10.0
    assert by["random"].geomean_ratio == pytest.approx(10.0)
    assert not by["random"].lower_bound
    assert by["random"].programs_per_s == 100.0


def test_goals_report_the_figures() -> None:
    mini = {"ops_before": 20, "ops_after": 3, "runs": 150, "seconds": 0.5, "exhausted": False,
            "one_minimal": True, "program": ""}
    trials = [t(SEED, "atheris", 0, 12.0, minimized=mini), t(SEED, "random", 0, None),
              t(None, "atheris", 0, None, programs=5000, budget=1.0)]
    table = cells(trials)
    summaries = engine_summaries(table, ["atheris", "random"], throughput(trials))
    verdicts = {g: (met, why) for g, met, why in goals(table, summaries,
                                                      minimize_summary(trials))}
    assert verdicts["throughput under Atheris >= 3,000 programs/s/core"] == (True, "5,000/s")
    met, why = verdicts["every seed mutant found by atheris in a median <= 10 s"]
    assert not met and SEED in why and "12.0s" in why
    assert verdicts["every catalogued mutant found by atheris in a median <= 60 s"][0]
    met, why = verdicts["atheris at least 10x faster than random over the catalog"]
    assert not met and ">= 2.5x" in why
    assert verdicts["minimized reproducers 1-minimal, typically < 10 ops, < 30 s each"][0]


def test_summary_json_is_strict_json_and_the_table_prints() -> None:
    trials = [t(SEED, "atheris", 0, 2.0), t(SEED, "random", 0, None)]
    text = json.dumps(summary_json(trials, ["atheris", "random"]), allow_nan=False)
    assert '"median_s": "inf"' in text
    console = Console(record=True, width=200)
    show(console, trials, ["atheris", "random"])
    out = console.export_text()
    assert "1/1 2.0s" in out and "0/1 > 30s" in out


def test_a_divergence_of_the_clean_model_is_reported_not_hidden() -> None:
    clean = t(None, "atheris", 0, 3.0, programs=900)
    clean.kind, clean.signature = "mmio-mismatch", "mmio-mismatch:access/read"
    trials = [clean, t(None, "random", 0, None), t(SEED, "atheris", 0, 2.0)]
    assert throughput(trials) == {"atheris": 300.0, "random": 100 / 30}
    assert [d["engine"] for d in summary_json(trials, ["atheris"])["clean_divergences"]] == \
        ["atheris"]
    console = Console(record=True, width=200)
    show(console, trials, ["atheris"])
    assert "the clean model diverged under atheris" in console.export_text()


def test_survival_curve_steps_up_at_each_find() -> None:
    trials = [t(SEED, "atheris", 0, 2.0), t(OTHER, "atheris", 0, 5.0),
              t(SEED, "atheris", 1, None), t(OTHER, "atheris", 1, 1.0)]
    xs, ys = curves(trials, ["atheris"])["atheris"]
    assert xs == [0.0, 1.0, 2.0, 5.0, 30.0]
    assert ys == [0.0, 0.25, 0.5, 0.75, 0.75]
