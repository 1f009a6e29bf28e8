"""`fuzzmmu soak`: clean programs from every engine, in parallel on all cores, for a number of
programs or a time, with the structural audit on a sample; every divergence is kept, grouped by
signature and minimized.

Engines (``--engines``):

- ``random``: uniformly random bytes through the decoder, drawn as the benchmark's random
  engine draws them (fuzzmmu.bench.engines.random_search);
- ``generator``: programs of fuzzmmu.program.generate (op-level, shaped like guest kernels);
- ``hypothesis``: the state machine of fuzzmmu.bench.stateful, in bounded batches of
  examples (``run_state_machine_as_test`` with ``max_examples``);
- ``atheris``: a short real campaign of the Atheris harness (fuzzmmu.campaign.fuzz, with
  ``--keep-going``), its crash files read back, its programs counted from libFuzzer's stats.

The work runs in ``jobs`` worker processes. Each worker runs every engine with seed ``S + k``
(worker ``k``), so engine E's share is spread over all workers and ``--jobs 2`` with three
engines still keeps both cores busy: with ``--programs N`` each engine gets ``N / engines``
programs, divided between the workers; with ``--max-time`` each engine gets an equal share of
each worker's time (the in-process engines take turns in slices of about a second, Atheris runs
first, once, for its share: its start-up is too costly to slice). With a programs budget the
programs each worker runs are the same on every run with the same seed. Workers report
progress and each divergence through a queue; the parent prints a progress line every few
seconds, and stops the workers (SIGTERM, which they turn into a stop after the program at
hand, then SIGKILL after a grace period) on SIGINT, SIGTERM or SIGHUP, or at the end of the
time, and still writes its report.

After the soak every signature's smallest program is minimized with the project's minimizer
(fuzzmmu.campaign.minimize) on the same cores. OUT/soak.json holds the settings, the programs
per engine, the divergences grouped by signature with their minimized programs;
OUT/divergences/<signature id>.txt the minimized programs, OUT/programs/<signature id>/ the
first programs found of each signature (binary and text form).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import os
import platform
import queue as queue_module
import random
import shutil
import signal
import subprocess
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fuzzmmu import __version__
from fuzzmmu.campaign.processes import STOP_SIGNALS, handling
from fuzzmmu.oracle.divergence import Divergence, DivergenceKind
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.codec import HEADER_SIZE, MAX_OPS, RECORD_SIZE, decode, encode
from fuzzmmu.program.ops import Program
from fuzzmmu.program.text import format_program, parse_program

ENGINES = ("random", "generator", "hypothesis", "atheris")
# The longest input the harness accepts (-max_len), as in fuzzmmu.bench.engines: the random
# engine draws lengths up to it. Not imported from there, which would import Hypothesis into
# every worker whether or not it runs the hypothesis engine.
MAX_LEN = HEADER_SIZE + RECORD_SIZE * MAX_OPS
# Generator programs get a length uniform up to the codec's limit (the generator stops at 64
# records), so that short programs, which run faster, and long ones are both tried.
GENERATOR_MAX_OPS = MAX_OPS
# The in-process engines of a worker take turns in slices this long: short enough that each
# gets its share of a short soak, long enough that switching costs nothing.
SLICE_S = 1.0
# Examples per run of the Hypothesis state machine: about a second at its 28 programs/s. A batch
# is not cut at the end of a slice (only at the end of the soak), so that with a programs
# budget the same seed always gives the same programs.
HYPOTHESIS_BATCH = 25
# How often a worker reports its counts; the parent prints every ``progress_every`` seconds.
WORKER_REPORT_S = 0.5
# After SIGTERM, how long a worker has to finish: an Atheris worker stops libFuzzer's process
# tree and replays the crash files it wrote. Then SIGKILL.
STOP_GRACE_S = 20.0
# How long past the end of the time an Atheris campaign may go on (libFuzzer's time leaves out
# its start-up, and it lets the running job finish) before its worker stops it.
ATHERIS_OVERRUN_S = 15.0
# How long past the end of the time the parent waits before it stops workers itself (they stop
# on their own at the end; libFuzzer checks its time only now and then).
OVERRUN_S = 60.0
# Programs of one signature written to OUT/programs/<id>/: all are counted, the first few kept.
KEEP_PER_SIGNATURE = 20


class SoakError(ValueError):
    """Settings a soak cannot run with (a usage error)."""


def parse_engines(text: str) -> tuple[str, ...]:
    """``random,generator`` -> ("random", "generator"): known names, each once, in order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SoakError(f"--engines needs at least one of {', '.join(ENGINES)}")
    for n in names:
        if n not in ENGINES:
            raise SoakError(f"unknown engine {n!r}; engines: {', '.join(ENGINES)}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class SoakConfig:
    programs: int | None = None  # in all, over every engine; None: until max_time
    max_time: float | None = None  # seconds; None: until the programs are done
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    engines: tuple[str, ...] = ENGINES
    audit_every: int = 100  # the structural audit on one program in K (0: never)
    seed: int = 1  # worker k uses seed + k (libFuzzer takes 0 as "pick one")
    out: Path = Path("soak-results")
    minimize_runs: int = 3000  # oracle-run budget of each minimization (0: do not minimize)
    progress_every: float = 2.0  # seconds between progress lines

    def validate(self) -> None:
        if self.programs is None and self.max_time is None:
            raise SoakError("give --programs N, --max-time S or both")
        for flag, value, least in (("--programs", self.programs, 1), ("--jobs", self.jobs, 1),
                                   ("--audit-every", self.audit_every, 0),
                                   ("--seed", self.seed, 1),
                                   ("--minimize-runs", self.minimize_runs, 0)):
            if value is not None and value < least:
                raise SoakError(f"{flag} must be at least {least}, not {value}")
        if self.max_time is not None and not self.max_time > 0:
            raise SoakError(f"--max-time must be more than 0 seconds, not {self.max_time}")
        if not self.engines:
            raise SoakError(f"--engines needs at least one of {', '.join(ENGINES)}")
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown:
            raise SoakError(f"unknown engine {unknown[0]!r}; engines: {', '.join(ENGINES)}")
        if not self.progress_every > 0:
            raise SoakError("progress_every must be more than 0 seconds")

    def settings(self, bugs: tuple[str, ...]) -> dict[str, Any]:
        return {"programs": self.programs, "max_time": self.max_time, "jobs": self.jobs,
                "engines": list(self.engines), "audit_every": self.audit_every,
                "seed": self.seed, "minimize_runs": self.minimize_runs, "bugs": list(bugs)}


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` shares differing by at most one, the larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class WorkerPlan:
    """What worker ``index`` does; pickled into its process."""

    index: int
    seed: int
    engines: tuple[str, ...]
    quotas: tuple[int | None, ...]  # programs per engine (None: until the end of the time)
    deadline: float | None  # wall-clock time.time() at which the soak ends
    audit_every: int
    bugs: tuple[str, ...]
    out: Path
    parent: int  # the soak's pid: a worker whose parent is gone stops


def plan_workers(cfg: SoakConfig, bugs: tuple[str, ...], deadline: float | None
                 ) -> list[WorkerPlan]:
    """Every worker runs every engine (worker k with seed S + k); a programs budget is shared
    out engine by engine, then worker by worker. Workers left with nothing are not started."""
    per_engine = split(cfg.programs, len(cfg.engines)) if cfg.programs is not None else None
    plans = []
    for k in range(cfg.jobs):
        engines, quotas = [], []
        for i, e in enumerate(cfg.engines):
            quota = None if per_engine is None else split(per_engine[i], cfg.jobs)[k]
            if quota != 0:
                engines.append(e)
                quotas.append(quota)
        if engines:
            plans.append(WorkerPlan(k, cfg.seed + k, tuple(engines), tuple(quotas), deadline,
                                    cfg.audit_every, bugs, cfg.out, os.getpid()))
    return plans


# ---------------------------------------------------------------------- worker side


class _Stop(Exception):
    """Raised inside a Hypothesis run to end it (time, quota, or the soak stopping)."""


@dataclass
class _Count:
    programs: int = 0
    audited: int = 0
    seconds: float = 0.0
    cut: int = 0  # compared only up to a store outside KVM's contract (Outcome.skipped)

    def to_json(self) -> dict[str, Any]:
        return {"programs": self.programs, "audited": self.audited,
                "seconds": round(self.seconds, 3), "cut": self.cut}


class _Worker:
    def __init__(self, plan: WorkerPlan, out: Any) -> None:
        self.plan = plan
        self.out = out  # the queue to the parent
        self.stopping = False
        self.time_up = False  # this worker is ending its Atheris campaign: it overran
        # The deadline comes as wall-clock time (the parent's monotonic clock means nothing
        # here); the loops compare against this process's monotonic clock.
        self.deadline = (None if plan.deadline is None
                         else time.monotonic() + plan.deadline - time.time())
        self.counts = {e: _Count() for e in plan.engines}
        self.quota = dict(zip(plan.engines, plan.quotas, strict=True))
        self._reported = 0.0

    def request_stop(self, signum: int = 0, frame: object = None) -> None:
        """SIGTERM from the parent: stop after the program at hand (a flag, not an exception
        raised in the middle of the model or of Hypothesis). Not the one this worker sends
        itself to end its Atheris campaign, should it arrive just after the campaign."""
        if not self.time_up:
            self.stopping = True

    def should_stop(self) -> bool:
        if not self.stopping and os.getppid() != self.plan.parent:
            self.stopping = True  # the soak died without stopping us: do not outlive it
        return self.stopping or (self.deadline is not None and time.monotonic() >= self.deadline)

    def left(self, engine: str) -> int | None:
        quota = self.quota[engine]
        return None if quota is None else quota - self.counts[engine].programs

    def audit_next(self, engine: str) -> bool:
        k = self.plan.audit_every
        return k > 0 and self.counts[engine].programs % k == 0

    def started(self, engine: str, audited: bool) -> int:
        """Count a program; returns its number (within this worker and engine)."""
        c = self.counts[engine]
        c.programs += 1
        c.audited += audited
        self.report()
        return c.programs - 1

    def found(self, engine: str, program: Program, d: Divergence, audited: bool,
              tag: str) -> None:
        self.out.put(("divergence", self.plan.index, {
            "engine": engine, "tag": tag, "binary": encode(program),
            "text": format_program(program), "ops": len(program.ops), "audited": audited,
            "kind": d.kind.value, "signature": d.signature, "signature_id": d.signature_id,
            "op_index": d.op_index}))

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._reported >= WORKER_REPORT_S:
            self._reported = now
            self.out.put(("progress", self.plan.index,
                          {e: c.to_json() for e, c in self.counts.items()}))

    # -- the engines

    def run(self) -> None:
        if "atheris" in self.counts:
            start = time.monotonic()
            try:
                self._atheris()
            finally:
                self.counts["atheris"].seconds += time.monotonic() - start
        slices = {e: self._slicer(e) for e in self.plan.engines if e != "atheris"}
        while slices and not self.should_stop():
            for e, run_slice in list(slices.items()):
                left = self.left(e)
                if left is not None and left <= 0:
                    del slices[e]
                    continue
                if self.should_stop():
                    break
                start = time.monotonic()
                length = SLICE_S
                if self.deadline is not None:
                    # Near the end (or in a soak of a few seconds) shorter slices, so that every
                    # engine still gets its turns.
                    length = min(SLICE_S, max(0.05, (self.deadline - start) / (4 * len(slices))))
                run_slice(start + length)
                self.counts[e].seconds += time.monotonic() - start

    def _slicer(self, engine: str) -> Callable[[float], None]:
        rng = random.Random(self.plan.seed)
        if engine == "random":
            # As random_search draws: a length uniform in [0, MAX_LEN], then uniform bytes.
            return self._programs(engine, lambda: decode(rng.randbytes(rng.randint(0, MAX_LEN))))
        if engine == "generator":
            from fuzzmmu.program.generate import random_program

            return self._programs(engine,
                                  lambda: random_program(rng, rng.randint(1, GENERATOR_MAX_OPS)))
        return _HypothesisEngine(self).run_batch

    def _programs(self, engine: str, draw: Callable[[], Program]) -> Callable[[float], None]:
        def run_slice(until: float) -> None:
            while time.monotonic() < until and not self.should_stop():
                left = self.left(engine)
                if left is not None and left <= 0:
                    return
                program = draw()
                audit = self.audit_next(engine)
                n = self.started(engine, audit)
                outcome = run(program, self.plan.bugs, audit=audit)
                d = outcome.divergence
                self.counts[engine].cut += bool(outcome.skipped)
                if d is not None:
                    self.found(engine, program, d, audit, str(n))
        return run_slice

    def _atheris(self) -> None:
        from fuzzmmu.campaign.fuzz import Campaign, CampaignConfig
        from fuzzmmu.program.files import ProgramFileError, read_program

        plan = self.plan
        work = plan.out / "atheris" / f"w{plan.index}"
        shutil.rmtree(work, ignore_errors=True)  # a fresh corpus: the same seed, the same run
        quota = self.quota["atheris"]
        max_time = hard_end = None
        if self.deadline is not None:
            # An equal share of this worker's time. libFuzzer counts it from its own start,
            # after the harness's imports and instrumentation (a few seconds), and then lets
            # the running fork-mode job finish, which is what gets its programs counted: the
            # campaign ends that much after its share, and the other engines get less time.
            share = (self.deadline - time.monotonic()) / len(self.plan.engines)
            max_time = max(1, math.floor(share))
            hard_end = self.deadline + ATHERIS_OVERRUN_S
        cfg = CampaignConfig(bugs=plan.bugs, max_time=max_time, jobs=1, corpus=work / "corpus",
                             crashes=work / "crashes", seed=plan.seed, keep_going=True,
                             libfuzzer_args=(f"-runs={quota}",) if quota is not None else (),
                             stats=work / "stats.jsonl", dashboard=False)
        campaign = Campaign(cfg, Console(file=io.StringIO(), quiet=True))
        count = self.counts["atheris"]
        finished = threading.Event()

        def watch() -> None:
            # libFuzzer's count as the campaign reads it from its status lines. A signal to
            # ourselves, which the campaign turns into a clean stop of libFuzzer's tree, when
            # the parent is gone, or when libFuzzer overruns the end of the soak.
            while not finished.wait(WORKER_REPORT_S):
                count.programs = campaign.stats.execs
                self.report(force=True)
                if os.getppid() != plan.parent:
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                if hard_end is not None and time.monotonic() >= hard_end:
                    self.time_up = True
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            result = campaign.run()
        finally:
            finished.set()
            watcher.join()
        count.programs = result.stats.execs
        if result.returncode != 0 and not result.interrupted and not result.crashes:
            # libFuzzer that could not run (the harness failed to start, say) is no clean soak
            last = " | ".join(list(campaign.stats.lines)[-3:])
            raise RuntimeError(f"the Atheris campaign exited with code {result.returncode}: "
                               f"{last}")
        if result.interrupted and not self.time_up:  # it took a SIGTERM (SIGINT) meant for us
            self.stopping = True
        self.time_up = False
        for crash in sorted(result.crashes, key=lambda c: c.path.name):
            if crash.divergence is not None:
                self.found("atheris", crash.program, crash.divergence, False, crash.path.name)
            else:
                self.out.put(("unreproduced", plan.index, {
                    "engine": "atheris", "file": str(crash.path),
                    "why": "a crash file that does not diverge on replay"}))
        # The audit cannot be sampled inside libFuzzer's loop (it is on for every program or
        # none): it runs on one in K of the campaign's final corpus, its most varied programs,
        # even once the time is up (a few programs), unless the soak is being stopped.
        if plan.audit_every > 0 and not self.stopping:
            files = sorted(p for p in cfg.corpus.iterdir() if p.is_file())
            for path in files[::plan.audit_every]:
                if self.stopping:
                    break
                try:
                    program = read_program(path)
                except ProgramFileError:
                    continue
                count.audited += 1
                d = run(program, plan.bugs, audit=True).divergence
                if d is not None:
                    self.found("atheris", program, d, True, f"corpus-{path.name}")


class _HypothesisEngine:
    """The state machine run in batches of ``HYPOTHESIS_BATCH`` examples, batch ``b`` of
    worker seed ``s`` with Hypothesis seed ``s * 1000003 + b``."""

    def __init__(self, worker: _Worker) -> None:
        from hypothesis import HealthCheck, Phase, Verbosity, settings
        from hypothesis import seed as hypothesis_seed
        from hypothesis.stateful import run_state_machine_as_test

        from fuzzmmu.bench.stateful import ShadowMmuMachine

        self.worker = worker
        self.batches = 0
        self.ended = False  # the batch hit a divergence or a stop: what follows is a replay
        self.stopped = False
        self.until = math.inf
        self.current = -1
        self.last_audit = False
        self._seed = hypothesis_seed
        self._run = run_state_machine_as_test
        self._settings = settings
        self._base = settings(deadline=None, database=None, phases=[Phase.generate],
                              report_multiple_bugs=False,
                              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
        engine = self

        class Machine(ShadowMmuMachine):
            bugs = worker.plan.bugs

            def program_started(self) -> None:
                engine.program_started(self)

            def _check(self, divergence: Divergence | None) -> None:
                if divergence is not None:
                    engine.diverged(Program(self.header, tuple(self.ops)), divergence,
                                    self.audit)
                super()._check(divergence)

        self.machine = Machine

    def run_batch(self, until: float) -> None:
        left = self.worker.left("hypothesis")
        n = HYPOTHESIS_BATCH if left is None else min(HYPOTHESIS_BATCH, left)
        # With a programs budget a batch runs all its examples (unless the soak ends), so that
        # the same seed gives the same programs; with only a time, it ends with its slice, so
        # that the engines share the time evenly.
        self.until = until if left is None else math.inf
        self.ended = self.stopped = False
        self.current = -1
        before = self.worker.counts["hypothesis"].programs
        batch_seed = self.worker.plan.seed * 1_000_003 + self.batches
        self.batches += 1
        try:
            self._run(self._seed(batch_seed)(self.machine),
                      settings=self._settings(self._base, max_examples=n))
        except Exception:
            # After a divergence or a stop, Hypothesis replays the example that raised and
            # reports it (as it is, or as flaky): expected. Anything else is an error of ours.
            if not self.ended:
                raise
        if self.worker.counts["hypothesis"].programs == before and not self.stopped:
            raise RuntimeError("a Hypothesis batch ran no program")

    def program_started(self, machine: Any) -> None:
        w = self.worker
        if self.ended:  # Hypothesis replaying the example that ended the batch: not new
            machine.audit = self.last_audit
            if self.stopped:
                raise _Stop
            return
        left = w.left("hypothesis")
        if w.should_stop() or (left is not None and left <= 0) or time.monotonic() >= self.until:
            self.ended = self.stopped = True
            raise _Stop
        machine.audit = self.last_audit = w.audit_next("hypothesis")
        self.current = w.started("hypothesis", machine.audit)

    def diverged(self, program: Program, d: Divergence, audited: bool) -> None:
        if self.ended:
            return
        self.ended = True
        self.worker.found("hypothesis", program, d, audited, str(self.current))


def _worker_main(plan: WorkerPlan, out: Any) -> None:
    """A worker process: its engines in turn until its quotas or the time are done."""
    # Ctrl-C reaches the whole foreground process group; the parent decides what it means and
    # tells the workers with SIGTERM, which each turns into a stop after the program at hand.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = _Worker(plan, out)
    signal.signal(signal.SIGTERM, worker.request_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, worker.request_stop)
    try:
        worker.run()
    except Exception:
        out.put(("error", plan.index, {"error": traceback.format_exc(limit=20)}))
    finally:
        out.put(("done", plan.index, {e: c.to_json() for e, c in worker.counts.items()}))


# ---------------------------------------------------------------------- the parent


@dataclass
class EngineTotals:
    programs: int = 0
    audited: int = 0
    seconds: float = 0.0  # worker-seconds spent in the engine
    divergences: int = 0
    workers: int = 0
    # Compared only up to a store outside KVM's contract (counted by the random and generator
    # engines, which see each program's outcome).
    cut: int = 0

    @property
    def rate(self) -> float:
        """Programs per second of one worker (one core) running this engine."""
        return self.programs / self.seconds if self.seconds > 0 else 0.0


@dataclass
class SignatureGroup:
    signature: str
    signature_id: str
    kind: str
    count: int = 0
    engines: Counter[str] = field(default_factory=Counter)
    first_s: float = 0.0
    program: str = ""  # the smallest member's text form (the one minimized)
    ops: int = 0
    found_by: str = ""  # engine and worker of that member
    audited: bool = False  # that member was found with the structural audit on
    kept: list[str] = field(default_factory=list)  # files under OUT/programs/<id>/
    minimized: str | None = None
    minimized_ops: int | None = None
    minimize_runs: int = 0
    minimize_seconds: float = 0.0
    minimize_note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"signature": self.signature, "signature_id": self.signature_id,
                "kind": self.kind, "count": self.count, "engines": dict(self.engines),
                "first_s": round(self.first_s, 2), "found_by": self.found_by,
                "audited": self.audited,
                "ops": self.ops, "program": self.program, "minimized": self.minimized,
                "minimized_ops": self.minimized_ops, "minimize_runs": self.minimize_runs,
                "minimize_seconds": round(self.minimize_seconds, 3),
                "minimize_note": self.minimize_note,
                "file": f"divergences/{self.signature_id}.txt", "kept": self.kept}


@dataclass
class SoakResult:
    config: SoakConfig
    bugs: tuple[str, ...]
    seconds: float = 0.0
    engines: dict[str, EngineTotals] = field(default_factory=dict)
    groups: dict[str, SignatureGroup] = field(default_factory=dict)
    unreproduced: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stopped_by: str | None = None
    commit: str | None = None
    date: str = ""

    @property
    def programs(self) -> int:
        return sum(t.programs for t in self.engines.values())

    @property
    def divergences(self) -> int:
        return sum(g.count for g in self.groups.values())

    @property
    def exit_code(self) -> int:
        """0: clean. 1: a divergence, a crash file that does not replay, or an engine that
        failed (a soak that could not look must not pass)."""
        return 1 if self.groups or self.unreproduced or self.errors else 0

    def ordered_groups(self) -> list[SignatureGroup]:
        return sorted(self.groups.values(), key=lambda g: (-g.count, g.signature))

    def to_json(self) -> dict[str, Any]:
        total = self.programs
        return {"fuzzmmu": __version__, "commit": self.commit, "date": self.date,
                "python": platform.python_version(), "cpus": os.cpu_count(),
                "settings": self.config.settings(self.bugs), "stopped_by": self.stopped_by,
                "seconds": round(self.seconds, 2), "programs": total,
                "programs_per_s": round(total / self.seconds, 1) if self.seconds else 0.0,
                "audited": sum(t.audited for t in self.engines.values()),
                "engines": {e: {"programs": t.programs, "audited": t.audited,
                                "seconds": round(t.seconds, 2),
                                "programs_per_s": round(t.rate, 1), "workers": t.workers,
                                "divergences": t.divergences, "cut": t.cut}
                            for e, t in self.engines.items()},
                "divergences": self.divergences,
                "groups": [g.to_json() for g in self.ordered_groups()],
                "unreproduced": self.unreproduced, "errors": self.errors}


def git_commit(where: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the checkout fuzzmmu runs from; None outside one."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"],
                              cwd=where or Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = proc.stdout.strip()
    return sha if proc.returncode == 0 and sha else None


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _minimize_task(task: tuple[str, str, tuple[str, ...], int, bool]) -> dict[str, Any]:
    """In a pool process: minimize one signature's program (with the structural audit when
    only the audit saw it)."""
    from fuzzmmu.campaign.minimize import NotDivergent, minimize

    signature, text, bugs, max_runs, audit = task
    start = time.monotonic()
    try:
        result = minimize(parse_program(text), bugs, max_runs=max_runs, audit=audit)
    except NotDivergent:
        return {"signature": signature, "note": "does not diverge when replayed"}
    out: dict[str, Any] = {"signature": signature, "text": format_program(result.program),
                           "ops": result.ops_after, "runs": result.runs,
                           "seconds": time.monotonic() - start, "note": None}
    if result.signature != signature:
        out["note"] = f"replays with another signature: {result.signature}"
    elif result.exhausted:
        out["note"] = f"run budget ({max_runs}) exhausted: may not be 1-minimal"
    return out


class _Soak:
    def __init__(self, cfg: SoakConfig, bugs: tuple[str, ...], console: Console) -> None:
        self.cfg = cfg
        self.console = console
        self.result = SoakResult(cfg, bugs, engines={e: EngineTotals() for e in cfg.engines})
        self.counts: dict[int, dict[str, dict[str, Any]]] = {}  # worker -> engine -> counts
        self.done: set[int] = set()
        self.signals = 0
        self.started = time.monotonic()

    def on_signal(self, signum: int, frame: object) -> None:
        """Only flags: the loops act on them (a second signal: do not wait for anything)."""
        self.signals += 1
        if self.result.stopped_by is None:
            self.result.stopped_by = signal.Signals(signum).name

    # -- messages from the workers

    def handle(self, message: tuple[str, int, dict[str, Any]]) -> None:
        what, k, body = message
        if what == "progress":
            self.counts[k] = body
        elif what == "done":
            self.counts[k] = body
            self.done.add(k)
        elif what == "divergence":
            self._divergence(k, body)
        elif what == "unreproduced":
            self.result.unreproduced.append({"worker": k, **body})
        elif what == "error":
            self.result.errors.append(f"worker {k}: {body['error']}")

    def _divergence(self, k: int, d: dict[str, Any]) -> None:
        g = self.result.groups.get(d["signature"])
        if g is None:
            g = self.result.groups[d["signature"]] = SignatureGroup(
                d["signature"], d["signature_id"], d["kind"],
                first_s=time.monotonic() - self.started)
            self.console.print(f"[red]new divergence[/] {escape(d['signature'])} "
                               f"({d['engine']}, worker {k})", highlight=False)
        g.count += 1
        g.engines[d["engine"]] += 1
        self.result.engines[d["engine"]].divergences += 1
        if not g.program or d["ops"] < g.ops:
            g.program, g.ops, g.found_by = d["text"], d["ops"], f"{d['engine']} worker {k}"
            g.audited = d["audited"]
        if len(g.kept) < KEEP_PER_SIGNATURE:
            # Written at once, so that what was found stays even if the soak is killed.
            folder = self.cfg.out / "programs" / g.signature_id
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{d['engine']}-w{k}-{d['tag']}"
            (folder / name).write_bytes(d["binary"])
            (folder / f"{name}.txt").write_text(d["text"])
            g.kept.append(f"programs/{g.signature_id}/{name}")

    def progress_line(self) -> str:
        elapsed = time.monotonic() - self.started
        per = Counter[str]()
        audited = 0
        for engines in self.counts.values():
            for e, c in engines.items():
                per[e] += c["programs"]
                audited += c["audited"]
        total = sum(per.values())
        rate = total / elapsed if elapsed > 0 else 0.0
        parts = ", ".join(f"{e} {per[e]:,}" for e in self.cfg.engines)
        return (f"[{elapsed:5.0f}s] {total:,} programs ({rate:,.0f}/s): {parts}; audited "
                f"{audited:,}; divergences {self.result.divergences} in "
                f"{len(self.result.groups)} signature(s)")

    # -- the run

    def run(self) -> SoakResult:
        cfg = self.cfg
        subs = ("divergences", "programs", "atheris")
        marker = cfg.out / "soak.json"
        if not marker.exists() and any((cfg.out / sub).exists() for sub in subs):
            # Only an earlier soak's folders are removed: a soak.json (written at the start of
            # every soak) says what OUT is.
            raise SoakError(f"{cfg.out} holds {'/'.join(subs)} but no soak.json: not a soak's "
                            "output; choose another --out")
        for sub in subs:  # nothing of an earlier soak may be taken for this one's
            shutil.rmtree(cfg.out / sub, ignore_errors=True)
        cfg.out.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"settings": cfg.settings(self.result.bugs),
                                      "running": True}) + "\n")
        deadline = time.time() + cfg.max_time if cfg.max_time is not None else None
        plans = plan_workers(cfg, self.result.bugs, deadline)
        for p in plans:
            for e in p.engines:
                self.result.engines[e].workers += 1
        until = []
        if cfg.programs is not None:
            until.append(f"{cfg.programs:,} programs")
        if cfg.max_time is not None:
            until.append(f"{cfg.max_time:g} s")
        audit = f"1 program in {cfg.audit_every}" if cfg.audit_every else "off"
        self.console.print(f"soak: {', '.join(cfg.engines)} on {len(plans)} worker(s), until "
                           f"{' or '.join(until)}; audit {audit}; seed {cfg.seed}; "
                           f"bugs {', '.join(self.result.bugs) or 'none (the clean model)'}; "
                           f"out {cfg.out}", highlight=False)
        with handling(STOP_SIGNALS, self.on_signal):
            try:
                self._workers(plans, deadline)
            except KeyboardInterrupt:  # not the main thread: no handler was installed
                self.on_signal(signal.SIGINT, None)
            self.result.seconds = time.monotonic() - self.started
            self._totals()
            self._minimize()
        self.result.commit = git_commit()
        self.result.date = time.strftime("%Y-%m-%d %H:%M:%S %z")
        self._write()
        self.summary()
        return self.result

    def _workers(self, plans: list[WorkerPlan], deadline: float | None) -> None:
        ctx = multiprocessing.get_context("spawn")  # no state (locks, threads) forked along
        messages = ctx.Queue()
        procs = {p.index: ctx.Process(target=_worker_main, args=(p, messages),
                                      name=f"fuzzmmu-soak-{p.index}") for p in plans}
        told: float | None = None
        killed = False
        next_line = time.monotonic() + self.cfg.progress_every
        try:
            for proc in procs.values():
                if self.signals:
                    break
                proc.start()
            while any(p.is_alive() for p in procs.values()):
                with contextlib.suppress(queue_module.Empty):
                    self.handle(messages.get(timeout=0.2))
                now = time.monotonic()
                overrun = deadline is not None and time.time() > deadline + OVERRUN_S
                if told is None and (self.signals or overrun):
                    if overrun:
                        self.result.errors.append(f"workers still running {OVERRUN_S:g} s after "
                                                  "the end of the time: stopped")
                    told = now
                    for p in procs.values():
                        if p.is_alive():
                            p.terminate()  # SIGTERM: the worker stops after its program
                if not killed and told is not None and (self.signals > 1
                                                        or now - told > STOP_GRACE_S):
                    killed = True
                    for p in procs.values():
                        if p.is_alive():
                            p.kill()
                if now >= next_line:
                    self.console.print(self.progress_line(), highlight=False)
                    next_line = now + self.cfg.progress_every
            if not killed:  # a killed worker may have left half a message in the pipe
                while True:
                    try:
                        self.handle(messages.get(timeout=0.1))
                    except queue_module.Empty:
                        break
        finally:
            for p in procs.values():
                if p.is_alive():  # an error here: nothing may outlive the soak
                    p.kill()
                if p.pid is not None:
                    p.join()
            messages.close()
            messages.cancel_join_thread()
        for k, p in procs.items():
            if p.pid is not None and k not in self.done and told is None:
                self.result.errors.append(f"worker {k} exited with code {p.exitcode} "
                                          "without finishing")
        self.console.print(self.progress_line(), highlight=False)

    def _totals(self) -> None:
        for engines in self.counts.values():
            for e, c in engines.items():
                t = self.result.engines[e]
                t.programs += c["programs"]
                t.audited += c["audited"]
                t.seconds += c["seconds"]
                t.cut += c.get("cut", 0)

    def _minimize(self) -> None:
        groups = self.result.ordered_groups()
        todo = []
        for g in groups:
            if self.cfg.minimize_runs == 0:
                g.minimize_note = "not minimized (--minimize-runs 0)"
            else:
                todo.append(g)
        if not todo or self.signals > 1:
            return
        self.console.print(f"minimizing {len(todo)} signature(s) on "
                           f"{min(self.cfg.jobs, len(todo))} process(es)", highlight=False)
        ctx = multiprocessing.get_context("spawn")
        tasks = [(g.signature, g.program, self.result.bugs, self.cfg.minimize_runs,
                  g.kind == DivergenceKind.AUDIT_VIOLATION.value) for g in todo]
        seen = self.signals
        with ctx.Pool(min(self.cfg.jobs, len(todo)), initializer=_ignore_sigint) as pool:
            results = pool.imap_unordered(_minimize_task, tasks)
            for _ in tasks:
                while True:
                    if self.signals > seen:  # a signal during minimization: skip the rest
                        self.console.print("[yellow]minimization stopped[/]")
                        for g in todo:
                            if g.minimized is None and g.minimize_note is None:
                                g.minimize_note = "not minimized: the soak was stopped"
                        return  # leaving the block terminates the pool
                    try:
                        r = results.next(timeout=0.2)
                        break
                    except multiprocessing.TimeoutError:
                        continue
                g = self.result.groups[r["signature"]]
                g.minimize_note = r["note"]
                if "text" not in r and g.audited:
                    g.minimize_note += " (found with the audit on; the minimizer runs without)"
                if "text" in r:
                    g.minimized, g.minimized_ops = r["text"], r["ops"]
                    g.minimize_runs, g.minimize_seconds = r["runs"], r["seconds"]

    def _write(self) -> None:
        out = self.cfg.out
        folder = out / "divergences"
        for g in self.result.groups.values():
            folder.mkdir(parents=True, exist_ok=True)
            text = g.minimized if g.minimized is not None else g.program
            engines = ", ".join(f"{e} {n}" for e, n in g.engines.most_common())
            notes = [f"# soak divergence {g.signature_id}: {g.signature}",
                     f"# {g.kind}; {g.count} program(s) ({engines}); "
                     + (f"minimized from {g.ops} to {g.minimized_ops} ops"
                        if g.minimized is not None else f"{g.ops} ops, not minimized")]
            if g.minimize_note:
                notes.append(f"# {g.minimize_note}")
            lines = text.splitlines()
            # After the format line, which tells a text program from a binary one.
            (folder / f"{g.signature_id}.txt").write_text(
                "\n".join(lines[:1] + notes + lines[1:]) + "\n")
        (out / "soak.json").write_text(json.dumps(self.result.to_json(), indent=1) + "\n")

    def summary(self) -> None:
        r, console = self.result, self.console
        table = Table(title="soak", title_justify="left")
        for col in ("engine", "workers", "programs", "seconds", "programs/s", "audited",
                    "cut short", "divergences"):
            table.add_column(col, justify="left" if col == "engine" else "right")
        for e, t in r.engines.items():
            cut = f"{t.cut:,}" if e in ("random", "generator") else "-"
            table.add_row(e, str(t.workers), f"{t.programs:,}", f"{t.seconds:.1f}",
                          f"{t.rate:,.0f}", f"{t.audited:,}", cut, str(t.divergences))
        rate = r.programs / r.seconds if r.seconds else 0.0
        table.add_row("all", str(self.cfg.jobs), f"{r.programs:,}", f"{r.seconds:.1f} wall",
                      f"{rate:,.0f}", f"{sum(t.audited for t in r.engines.values()):,}",
                      f"{sum(t.cut for t in r.engines.values()):,}", str(r.divergences),
                      style="bold")
        console.print(table)
        how = f"stopped by {r.stopped_by}" if r.stopped_by else "finished"
        if r.groups:
            div = Table(title="divergences by signature", title_justify="left")
            for col in ("count", "kind", "signature", "engines", "ops", "file"):
                div.add_column(col, overflow="fold")
            for g in r.ordered_groups():
                ops = (f"{g.ops} -> {g.minimized_ops}" if g.minimized_ops is not None
                       else f"{g.ops}")
                div.add_row(str(g.count), g.kind, escape(g.signature),
                            ", ".join(f"{e} {n}" for e, n in g.engines.most_common()), ops,
                            str(self.cfg.out / "divergences" / f"{g.signature_id}.txt"))
            console.print(div)
        for u in r.unreproduced:
            console.print(f"[yellow]crash file that does not replay[/] {escape(u['file'])}")
        for e in r.errors:
            console.print(f"[red]error[/] {escape(e)}", highlight=False)
        verdict = ("[green]no divergence[/]" if not r.groups else
                   f"[red]{r.divergences} divergent program(s) in {len(r.groups)} "
                   "signature(s)[/]")
        console.print(f"{how} after {r.seconds:.1f}s: {r.programs:,} programs; {verdict}; "
                      f"wrote {self.cfg.out / 'soak.json'}", highlight=False)


def run_soak(cfg: SoakConfig, console: Console | None = None, *,
             bugs: tuple[str, ...] = ()) -> SoakResult:
    """Run a soak and write its report. ``bugs`` switches mutants on, for tests of the soak
    itself: the command line soaks only the clean model. Raises SoakError on bad settings.
    Workers are spawned processes: from a script, call this under ``if __name__ ==
    "__main__":``."""
    from fuzzmmu.model.bugs import BugSet, UnknownBugError

    cfg.validate()
    try:
        BugSet(bugs)
    except UnknownBugError as exc:
        raise SoakError(str(exc)) from exc
    return _Soak(cfg, tuple(bugs), console or Console(highlight=False)).run()
