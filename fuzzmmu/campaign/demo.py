"""`fuzzmmu demo`: the whole pipeline on one historical bug, in a couple of minutes.

Fuzz with a seed mutant on until the first divergence, minimize it, export it as a pytest
regression test, and run that test twice: against the model with the bug (it fails, as a
regression test should while the bug is present) and against the clean model (it passes).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType

from rich.console import Console

from fuzzmmu.campaign.export import export
from fuzzmmu.campaign.fuzz import Campaign, CampaignConfig, summary
from fuzzmmu.campaign.minimize import minimize
from fuzzmmu.campaign.plot import plot_note
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.files import write_program
from fuzzmmu.program.text import format_program

DEFAULT_BUG = "misaligned-pt-write-two-sptes"


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_exported(path: Path, bugs: tuple[str, ...]) -> str:
    """Run the exported test function with the model's bugs set to ``bugs``."""
    module = _load(path)
    vars(module)["BUGS"] = bugs  # the global the exported test reads (see export.py)
    test = next(getattr(module, n) for n in dir(module) if n.startswith("test_"))
    try:
        test()
    except AssertionError as exc:
        return f"FAILED: {exc}"
    return "passed"


def demo(console: Console, workdir: Path, bug: str = DEFAULT_BUG, max_time: int = 300,
         seed: int | None = 1, dashboard: bool = True) -> int:
    cfg = CampaignConfig(bugs=(bug,), max_time=max_time, corpus=workdir / "corpus",
                         crashes=workdir / "crashes", stats=workdir / "stats.jsonl",
                         seed=seed, dashboard=dashboard)
    console.rule(f"1. fuzz with the historical bug {bug} in the model")
    result = Campaign(cfg, console).run()
    summary(console, result)
    console.print(plot_note(cfg.stats), highlight=False)  # when matplotlib is installed
    if result.interrupted:  # a stop signal stops the demo, not only its campaign
        return 1
    divergent = result.divergences
    if not divergent:
        console.print("[yellow]no divergence within the time limit; try --max-time longer")
        return 1
    crash = min(divergent, key=lambda c: c.found_after or 0.0)
    console.rule("2. minimize the divergent program")
    start = time.monotonic()
    res = minimize(crash.program, crash.bugs)
    small = workdir / "minimized"
    write_program(small, res.program)
    console.print(format_program(res.program), highlight=False)
    console.print(f"{res.ops_before} -> {res.ops_after} ops, {res.runs} oracle runs, "
                  f"{time.monotonic() - start:.1f}s; {small}.txt", highlight=False)
    console.rule("3. export it as a pytest regression test")
    out = workdir / "test_regression.py"
    div = run(res.program, crash.bugs).divergence
    assert div is not None
    export(res.program, crash.bugs, div, out, crash.path.name)
    console.print(f"wrote {out}")
    console.rule("4. run the exported test")
    with_bug = run_exported(out, crash.bugs)
    clean = run_exported(out, ())
    console.print(f"  model with {bug}: {with_bug}", highlight=False)
    console.print(f"  clean model: {clean}", highlight=False)
    console.print(f"(run it yourself: python -m pytest {out})")
    return 0 if with_bug.startswith("FAILED") and clean == "passed" else 1

