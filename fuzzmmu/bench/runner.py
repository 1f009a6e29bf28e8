"""`fuzzmmu bench`: every engine against every chosen mutant, several trials each, side by side
on ``jobs`` cores, in one run so that all engines see the same machine load.

Each finished trial is appended at once to ``OUT/trials.jsonl``, so an interrupted benchmark
loses only the trials in flight, and ``--resume`` runs only what is missing. At the end
``OUT/bench.json`` holds the settings, every trial and the summary, and ``OUT/survival.png``
the survival curves.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fuzzmmu import __version__
from fuzzmmu.bench.engines import Engine, KvmThroughput, kvm_throughput
from fuzzmmu.bench.plot import PlotUnavailable, survival_plot
from fuzzmmu.bench.report import markdown, show, summary_json
from fuzzmmu.bench.trial import TrialResult, TrialSpec, run_trial


class BenchError(ValueError):
    """Settings or files a benchmark cannot run with."""


@dataclass(frozen=True)
class BenchConfig:
    bugs: tuple[str, ...]
    engines: tuple[Engine, ...] = tuple(Engine)
    trials: int = 5
    budget: float = 30.0
    jobs: int = 2
    out: Path = Path("bench-results")
    seed: int = 1  # trial k of every cell uses seed + k (libFuzzer takes 0 as "pick one")
    throughput_time: float = 20.0  # 0: no throughput runs (the clean model's, real KVM's)
    minimize_runs: int = 3000  # 0: do not minimize what is found
    resume: bool = False
    native: bool = False  # the engines that watch no line run the compiled model

    def settings(self) -> dict[str, Any]:
        """What must match for ``--resume`` to mix old and new trials."""
        return {"budget": self.budget, "seed": self.seed,
                "throughput_time": self.throughput_time, "minimize_runs": self.minimize_runs}


def plan(cfg: BenchConfig) -> list[TrialSpec]:
    """Throughput runs first, then trial by trial, each mutant under every engine in turn."""
    specs = [TrialSpec(None, e, 0, cfg.seed, cfg.throughput_time, cfg.native)
             for e in cfg.engines if cfg.throughput_time > 0]
    specs += [TrialSpec(bug, e, k, cfg.seed + k, cfg.budget, cfg.native)
              for k in range(cfg.trials) for bug in cfg.bugs for e in cfg.engines]
    return specs


def _load_done(path: Path, cfg: BenchConfig) -> list[TrialResult]:
    if not path.exists():
        return []
    done = []
    try:
        lines = path.read_text().splitlines()
        head = json.loads(lines[0]) if lines else {}
        if head.get("settings") != cfg.settings():
            raise BenchError(f"{path} was written with settings {head.get('settings')}, "
                             f"not {cfg.settings()}: use another --out or the same settings")
        for line in lines[1:]:
            if line.strip():
                done.append(TrialResult.from_json(json.loads(line)))
    except (json.JSONDecodeError, TypeError, KeyError) as exc:
        raise BenchError(f"{path} is not a benchmark's trial log: {exc}") from exc
    return done


@dataclass
class _Tally:
    found: int = 0
    missed: int = 0
    errors: int = 0
    running: set[str] = field(default_factory=set)

    def line(self) -> str:
        now = ", ".join(sorted(self.running)) or "-"
        return f"found {self.found} missed {self.missed} errors {self.errors}; running {now}"


def run_bench(cfg: BenchConfig, console: Console) -> list[TrialResult]:
    cfg.out.mkdir(parents=True, exist_ok=True)
    log = cfg.out / "trials.jsonl"
    done = _load_done(log, cfg) if cfg.resume else []
    if not cfg.resume:
        log.write_text(json.dumps({"settings": cfg.settings()}) + "\n")
    have = {(t.bug or "", t.engine, t.trial) for t in done}
    todo = [s for s in plan(cfg) if s.key not in have]
    results = list(done)
    if done:
        console.print(f"resuming: {len(done)} trials already in {log}, {len(todo)} to run")
    started = time.monotonic()
    lock = threading.Lock()
    tally = _Tally()
    kvm = None
    if cfg.throughput_time > 0:  # here, alone: in the main thread, without trials beside it
        console.print(f"real KVM's throughput: {cfg.throughput_time:g} s", highlight=False)
        kvm = kvm_throughput(cfg.throughput_time, cfg.seed)
    work = Path(tempfile.mkdtemp(prefix="fuzzmmu-bench-"))
    stop = threading.Event()

    def one(spec: TrialSpec) -> TrialResult | None:
        if stop.is_set():
            return None
        name = f"{spec.engine.value}:{spec.bug or 'clean'}#{spec.trial}"
        with lock:
            tally.running.add(name)
        try:
            result = run_trial(spec, work / name.replace(":", "-").replace("#", "-"),
                               minimize_runs=cfg.minimize_runs)
        except Exception as exc:  # recorded as the trial's error, the benchmark goes on
            result = TrialResult(spec.bug, spec.engine.value, spec.trial, spec.seed,
                                 spec.budget, False, 0.0, 0, error=f"{type(exc).__name__}: "
                                                                   f"{exc}")
        finally:
            with lock:
                tally.running.discard(name)
        if stop.is_set():  # interrupted half-way: say nothing about it
            return None
        with lock:
            with log.open("a") as f:
                f.write(json.dumps(result.to_json()) + "\n")
            if result.error:
                tally.errors += 1
            elif result.bug is not None:
                if result.found:
                    tally.found += 1
                else:
                    tally.missed += 1
        return result

    progress = Progress(TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.description}"),
                        console=console, transient=False)
    try:
        with progress, ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
            task = progress.add_task(tally.line(), total=len(todo))
            pending: set[Future[TrialResult | None]] = {pool.submit(one, s) for s in todo}
            try:
                while pending:
                    finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        r = fut.result()
                        if r is not None:
                            results.append(r)
                        progress.advance(task)
                    progress.update(task, description=tally.line())
            except KeyboardInterrupt:
                stop.set()
                for fut in pending:
                    fut.cancel()
                console.print("[yellow]interrupted[/]: the trials in flight are dropped; "
                              f"`--resume` runs what is missing ({log})")
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_outputs(cfg, results, time.monotonic() - started, console, kvm)
    return results


def write_outputs(cfg: BenchConfig, results: list[TrialResult], wall: float,
                  console: Console, kvm: KvmThroughput | None = None) -> None:
    engines = [e.value for e in cfg.engines]
    meta = {"fuzzmmu": __version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(), "jobs": cfg.jobs,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(wall, 1),
            "trials": cfg.trials, "engines": engines, "bugs": list(cfg.bugs),
            "compiled_model": cfg.native, **cfg.settings()}
    results = sorted(results, key=lambda t: (t.bug or "", t.engine, t.trial))
    (cfg.out / "bench.json").write_text(json.dumps(
        {"meta": meta, "summary": summary_json(results, engines, kvm),
         "trials": [t.to_json() for t in results]}, indent=1, allow_nan=False))
    show(console, results, engines, kvm)
    try:
        png = survival_plot(results, engines, cfg.out / "survival.png",
                            f"fuzzmmu {__version__}: {len(cfg.bugs)} mutants x "
                            f"{cfg.trials} trials, budget {cfg.budget:g} s")
        console.print(f"wrote {cfg.out / 'bench.json'} and {png}", highlight=False)
    except PlotUnavailable as exc:
        console.print(f"wrote {cfg.out / 'bench.json'}; no plot: {exc}", highlight=False)


def report_from(out: Path, console: Console, *, as_markdown: bool = False) -> None:
    """Print the report of an earlier run from its bench.json (as Markdown tables when
    ``as_markdown``)."""
    path = out / "bench.json"
    try:
        data = json.loads(path.read_text())
        trials = [TrialResult.from_json(t) for t in data["trials"]]
        engines = data["meta"]["engines"]
        measured = data["summary"].get("kvm_throughput")  # absent before it was measured
        kvm = KvmThroughput.from_json(measured) if measured else None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BenchError(f"cannot read a benchmark from {path}: {exc}") from exc
    if as_markdown:
        print(markdown(trials, engines, kvm), end="")
    else:
        show(console, trials, engines, kvm)

