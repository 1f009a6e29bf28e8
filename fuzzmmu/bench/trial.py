"""One benchmark trial: one engine, one mutant (or the clean model), one seed, one budget.

Every trial runs in processes of its own: the Atheris harness as a campaign would start it
(fuzzmmu.campaign.fuzz builds the command), the other engines in fuzzmmu.bench.worker. Time
counts from the start of the search, not of the interpreter: for Atheris from libFuzzer's
``INFO: Seed:`` line (after the harness's imports and instrumentation, which are reported
apart as ``startup``), for the others from the start of their loop.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fuzzmmu.bench.engines import Engine
from fuzzmmu.campaign.fuzz import CampaignConfig, prepare, target_command, target_environment
from fuzzmmu.campaign.processes import parent_death_signal
from fuzzmmu.campaign.settings import Feedback
from fuzzmmu.campaign.triage import is_crash_file, load_crash
from fuzzmmu.native import ENV_NATIVE
from fuzzmmu.program.text import format_program

_STAT = re.compile(r"stat::(\w+):\s*(\d+)")
# Slack on top of a trial's budget before its process is killed (start-up, final replay).
_GRACE = 60.0


class TrialError(RuntimeError):
    """A trial's process failed in a way that says nothing about the engine."""


@dataclass(frozen=True)
class TrialSpec:
    bug: str | None  # None: the clean model (a throughput run)
    engine: Engine
    trial: int
    seed: int
    budget: float
    # Engines that watch no line of the model run it compiled (fuzzmmu.native), as a campaign
    # with state feedback does; the result does not depend on it, only the speed.
    native: bool = False

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.bug or "", self.engine.value, self.trial)


@dataclass
class TrialResult:
    bug: str | None
    engine: str
    trial: int
    seed: int
    budget: float
    found: bool
    seconds: float  # to the first divergence, or the time searched without one
    programs: int
    startup: float | None = None  # Atheris: interpreter, imports and instrumentation
    kind: str | None = None
    signature: str | None = None
    program: str | None = None  # the divergent program's text form
    minimized: dict[str, Any] | None = None
    error: str | None = None

    @property
    def in_budget(self) -> bool:
        """Found within the budget. libFuzzer checks -max_total_time only now and then, so an
        Atheris trial may find something a little after the budget, which the other engines
        never get to run: comparisons count that as a miss."""
        return self.found and self.seconds <= self.budget

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> TrialResult:
        return TrialResult(**d)


def _worker(task: dict[str, Any], timeout: float, native: bool = False) -> dict[str, Any]:
    # Trial processes stay in the benchmark's process group (Ctrl-C reaches them as before);
    # should the benchmark die without stopping them (SIGTERM, SIGKILL), the kernel stops them.
    # This thread waits for the process, so it outlives it, as the parent-death signal needs.
    env = {**os.environ, ENV_NATIVE: "1" if native else "0"}
    proc = subprocess.run([sys.executable, "-m", "fuzzmmu.bench.worker", json.dumps(task)],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          preexec_fn=parent_death_signal(), env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise TrialError(f"worker {task['task']} exited {proc.returncode}: "
                         f"{proc.stderr.strip()[-400:]}")
    return json.loads(lines[-1])


# The engines that run the campaign's harness under libFuzzer, and what their coverage sees.
LIBFUZZER_ENGINES = (Engine.ATHERIS, Engine.ATHERIS_BYTES, Engine.ATHERIS_STATE,
                     Engine.ATHERIS_BOTH)
_FEEDBACK = {Engine.ATHERIS_STATE: Feedback.STATE, Engine.ATHERIS_BOTH: Feedback.BOTH}


def watches_lines(engine: Engine) -> bool:
    """Whether the engine's feedback is the model's Python lines (it cannot run compiled)."""
    return engine in LIBFUZZER_ENGINES and _FEEDBACK.get(engine, Feedback.LINES).lines


def _atheris(spec: TrialSpec, workdir: Path) -> TrialResult:
    bugs = (spec.bug,) if spec.bug else ()
    cfg = CampaignConfig(bugs=bugs, max_time=max(1, math.ceil(spec.budget)), seed=spec.seed,
                         corpus=workdir / "corpus", crashes=workdir / "crashes",
                         stats=workdir / "stats.jsonl", dashboard=False,
                         byte_share=1.0 if spec.engine is Engine.ATHERIS_BYTES else 0.2,
                         feedback=_FEEDBACK.get(spec.engine, Feedback.LINES),
                         native=spec.native and not watches_lines(spec.engine))
    prepare(cfg)
    launched = time.monotonic()
    # Not fork mode (one job): libFuzzer has no children, the parent-death signal covers it.
    proc = subprocess.Popen(target_command(cfg), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=target_environment(cfg),
                            preexec_fn=parent_death_signal())
    marks: dict[str, float] = {}
    stats: dict[str, int] = {}
    tail: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for raw in iter(proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            now = time.monotonic()
            if line.startswith("INFO: Seed:"):
                marks.setdefault("start", now)
            elif "Uncaught Python exception" in line:
                marks.setdefault("crash", now)
            elif m := _STAT.match(line):
                stats[m[1]] = int(m[2])
            if not line.startswith("INFO: Instrumenting"):
                tail[:] = [*tail[-20:], line]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=spec.budget + _GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(timeout=10)
    ended = time.monotonic()
    start = marks.get("start", launched)
    result = TrialResult(spec.bug, spec.engine.value, spec.trial, spec.seed, spec.budget,
                         False, round(ended - start, 3),
                         stats.get("number_of_executed_units", 0),
                         startup=round(start - launched, 3))
    crashes = sorted(p for p in cfg.crashes.iterdir() if is_crash_file(p))
    if not crashes:
        if proc.returncode not in (0, None):
            result.error = f"harness exited {proc.returncode}: " + " | ".join(tail[-5:])
        return result
    crash = load_crash(crashes[0], bugs)
    if crash.divergence is None:
        result.error = f"{crashes[0].name} does not replay as a divergence: " \
                       + " | ".join(tail[-5:])
        return result
    result.found = True
    result.seconds = round(marks.get("crash", ended) - start, 3)
    result.kind = crash.divergence.kind.value
    result.signature = crash.divergence.signature
    result.program = format_program(crash.program)
    return result


def run_trial(spec: TrialSpec, workdir: Path, *, minimize_runs: int = 3000) -> TrialResult:
    """Run one trial; a divergence found is minimized (``minimize_runs`` 0: not minimized)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if spec.engine in LIBFUZZER_ENGINES:
        result = _atheris(spec, workdir)
    else:
        task = {"task": "search", "engine": spec.engine.value,
                "bugs": [spec.bug] if spec.bug else [], "seed": spec.seed,
                "budget": spec.budget}
        out = _worker(task, spec.budget + _GRACE, native=spec.native)
        result = TrialResult(spec.bug, spec.engine.value, spec.trial, spec.seed, spec.budget,
                             out["found"], out["seconds"], out["programs"], kind=out["kind"],
                             signature=out["signature"], program=out["program"])
    if result.found and result.program is not None and minimize_runs > 0:
        task = {"task": "minimize", "program": result.program,
                "bugs": [spec.bug] if spec.bug else [],
                "max_runs": minimize_runs}
        result.minimized = _worker(task, 600)
    return result
