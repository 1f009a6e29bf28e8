"""The search engines the benchmark compares, each run until the first divergence or a budget.

- ``atheris``: the campaign's harness (harnesses/shadow_mmu_fuzzer.py) under libFuzzer, with
  the op-level mutator, from the shipped corpus (fuzzmmu.bench.atheris_engine);
- ``atheris-bytes``: the same with libFuzzer's byte mutator only;
- ``atheris-state``: the same with the model's state features as coverage instead of the
  lines of the model (fuzzmmu.campaign.feedback; the code runs uninstrumented);
- ``atheris-both``: both kinds of coverage;
- ``random``: the same decoder fed uniformly random bytes, no feedback;
- ``hypothesis``: the stateful test of fuzzmmu.bench.stateful.

The in-process engines (random, hypothesis) live here; they run in a worker process of their
own (fuzzmmu.bench.worker) so that trials run side by side, one per core. So does
``kvm_throughput``: programs/s of real KVM, next to the model's on the same programs.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, seed, settings
from hypothesis.stateful import run_state_machine_as_test

from fuzzmmu.bench.stateful import DivergenceError, ShadowMmuMachine
from fuzzmmu.oracle.divergence import Divergence
from fuzzmmu.oracle.executor import Target, run
from fuzzmmu.program.codec import HEADER_SIZE, MAX_OPS, RECORD_SIZE, decode
from fuzzmmu.program.ops import Program

# The longest input libFuzzer is allowed (-max_len): the random engine draws lengths up to it.
MAX_LEN = HEADER_SIZE + RECORD_SIZE * MAX_OPS


class Engine(enum.Enum):
    ATHERIS = "atheris"
    ATHERIS_BYTES = "atheris-bytes"
    ATHERIS_STATE = "atheris-state"
    ATHERIS_BOTH = "atheris-both"
    RANDOM = "random"
    HYPOTHESIS = "hypothesis"


@dataclass
class Search:
    """How one search went. ``seconds`` counts from the start of the search (imports and
    interpreter start-up excluded) to the divergence, or to the end of the budget."""

    found: bool
    seconds: float
    programs: int
    program: Program | None = None
    divergence: Divergence | None = None


def random_search(bugs: Sequence[str], seed_: int, budget: float) -> Search:
    """Uniformly random inputs: a length uniform in [0, MAX_LEN], then uniform bytes."""
    rng = random.Random(seed_)
    start = time.monotonic()
    programs = 0
    while time.monotonic() - start < budget:
        program = decode(rng.randbytes(rng.randint(0, MAX_LEN)))
        programs += 1
        divergence = run(program, bugs).divergence
        if divergence is not None:
            return Search(True, time.monotonic() - start, programs, program, divergence)
    return Search(False, time.monotonic() - start, programs)


class _OutOfTime(Exception):
    pass


@dataclass
class _Progress:
    programs: int = 0
    out_of_time: bool = False
    found: Search | None = None


def hypothesis_search(bugs: Sequence[str], seed_: int, budget: float) -> Search:
    """Hypothesis generating state-machine runs (no shrinking: the first divergence counts)."""
    start = time.monotonic()
    progress = _Progress()

    class Timed(ShadowMmuMachine):
        def program_started(self) -> None:
            if time.monotonic() - start >= budget:
                progress.out_of_time = True
                raise _OutOfTime
            progress.programs += 1

        def _check(self, divergence: Divergence | None) -> None:
            if divergence is not None and progress.found is None:
                progress.found = Search(True, time.monotonic() - start, progress.programs,
                                        Program(self.header, tuple(self.ops)), divergence)
            super()._check(divergence)

    Timed.bugs = tuple(bugs)
    run_settings = settings(max_examples=10**9, deadline=None, database=None,
                            phases=[Phase.generate], report_multiple_bugs=False,
                            suppress_health_check=list(HealthCheck),
                            verbosity=Verbosity.quiet)
    try:
        run_state_machine_as_test(seed(seed_)(Timed), settings=run_settings)
    except DivergenceError:
        pass
    except Exception:
        # Hypothesis re-runs the example that raised _OutOfTime and may then report it as
        # flaky; any other error without a timeout is ours and must not be hidden.
        if not progress.out_of_time:
            raise
    if progress.found is not None:
        return progress.found
    return Search(False, time.monotonic() - start, progress.programs)


@dataclass(frozen=True)
class KvmThroughput:
    """Programs/s of real KVM (/dev/kvm, the pooled target: one VM per process reset in place)
    and of the clean model on the same random programs of what the host supports (16 ops,
    fuzzmmu.kvm.support.random_supported_program), the two run in turn; or why KVM was
    skipped."""

    kvm: float = 0.0
    model: float = 0.0
    programs: int = 0
    skipped: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> KvmThroughput:
        return cls(**doc)


def kvm_throughput(seconds: float, seed: int) -> KvmThroughput:
    """Run programs on real KVM and on the model in turn for ``seconds`` in all. Only from
    the main thread: the KVM watchdog needs its signals."""
    from fuzzmmu.kvm.support import kvm_problem, random_supported_program

    problem = kvm_problem()
    if problem is not None:
        return KvmThroughput(skipped=f"real KVM is not usable here: {problem}")
    from fuzzmmu.kvm.target import KVM_POOLED
    from fuzzmmu.oracle.executor import MODEL

    machines: tuple[tuple[str, Target], ...] = (("kvm", KVM_POOLED), ("model", MODEL))
    spent = dict.fromkeys(("kvm", "model"), 0.0)
    programs = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds or not programs:
        program = random_supported_program(random.Random(seed + programs))
        for name, target in machines[::-1] if programs % 2 else machines:
            t = time.perf_counter()
            run(program, target=target)
            spent[name] += time.perf_counter() - t
        programs += 1
    return KvmThroughput(programs / spent["kvm"], programs / spent["model"], programs)
