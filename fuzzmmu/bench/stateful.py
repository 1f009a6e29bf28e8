"""fuzzmmu's operations as a Hypothesis stateful test (RuleBasedStateMachine).

Each rule draws one op from fuzzmmu.program.strategies and runs it at once on model and
reference through ``Executor.step``, so a Hypothesis run builds a program op by op and stops
at the first divergence. The test suite runs it as a property test of the clean model; the
benchmark uses it as the ``hypothesis`` engine (fuzzmmu.bench.engines).
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import assume
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from fuzzmmu.oracle.divergence import Divergence
from fuzzmmu.oracle.executor import Executor
from fuzzmmu.oracle.reference import OutsideContract
from fuzzmmu.program import strategies as S
from fuzzmmu.program.codec import MAX_OPS, MAX_SECOND
from fuzzmmu.program.ops import Header, Op, Program

# Every program stays encodable (at most MAX_OPS op records), so whatever this finds can be
# written, minimized and exported like a campaign's crash.
_INTERLEAVE_RECORDS = 2 + MAX_SECOND


class DivergenceError(AssertionError):
    """Model and reference disagree on the program built so far."""

    def __init__(self, program: Program, divergence: Divergence) -> None:
        self.program = program
        self.divergence = divergence
        super().__init__(f"{divergence.kind.value} at op {divergence.op_index} "
                         f"({divergence.op}) [{divergence.signature}]")


def _room(records: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return precondition(lambda self: self.records + records <= MAX_OPS)


class ShadowMmuMachine(RuleBasedStateMachine):
    """Subclass and set ``bugs`` (mutants on) or ``audit`` (check the model's invariants)."""

    bugs: tuple[str, ...] = ()
    audit: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.header = Header()
        self.ops: list[Op] = []
        self.records = 0
        self.executor: Executor | None = None

    def program_started(self) -> None:
        """Called once per program (Hypothesis example); the benchmark counts them here."""

    @initialize(header=S.headers)
    def boot(self, header: Header) -> None:
        self.program_started()
        self.header = header
        self.executor = Executor(Program(header, ()), self.bugs, audit=self.audit)
        self._check(self.executor.boot())

    def _run(self, op: Op) -> None:
        assert self.executor is not None
        self.ops.append(op)
        self.records += S.records(op)
        try:
            divergence = self.executor.step(len(self.ops) - 1, op)
        except OutsideContract:
            assume(False)  # past KVM's contract nothing is compared: not a test case
            return
        self._check(divergence)

    def _check(self, divergence: Divergence | None) -> None:
        if divergence is not None:
            raise DivergenceError(Program(self.header, tuple(self.ops)), divergence)

    @_room(1)
    @rule(op=S.accesses())
    def access(self, op: Op) -> None:
        self._run(op)

    @_room(1)
    @rule(op=S.maps())
    def map(self, op: Op) -> None:
        self._run(op)

    @_room(1)
    @rule(op=S.table_writes)
    def write_table(self, op: Op) -> None:
        self._run(op)

    @_room(1)
    @rule(op=S.control_ops)
    def control(self, op: Op) -> None:
        self._run(op)

    @_room(1)
    @rule(op=S.smm_ops)
    def smm(self, op: Op) -> None:
        self._run(op)

    @_room(1)
    @rule(op=S.host_ops)
    def host(self, op: Op) -> None:
        self._run(op)

    @_room(_INTERLEAVE_RECORDS)
    @rule(op=S.interleaves)
    def interleave(self, op: Op) -> None:
        self._run(op)

    @precondition(lambda self: self.records > MAX_OPS - _INTERLEAVE_RECORDS)
    @rule()
    def full(self) -> None:
        """Lets a run go on (doing nothing) when an interleave no longer fits."""
