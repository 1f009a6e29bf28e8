"""The KVM target for the executor: ``KVM``, a ``fuzzmmu.oracle.executor.Target`` whose
machine is real KVM (``KvmMachine``)."""

from __future__ import annotations

from fuzzmmu.kvm.machine import KvmMachine
from fuzzmmu.kvm.support import check_program
from fuzzmmu.model.bugs import BugSet
from fuzzmmu.oracle.executor import Target, Unsupported
from fuzzmmu.program.ops import Program


def _make(program: Program, bugs: BugSet) -> KvmMachine:
    if bugs.ids:
        raise Unsupported("bugs are mutants of the model; real KVM runs its own code")
    check_program(program)
    return KvmMachine(program)


# Real KVM may make any last-level shadow page unsync (a CPL3 store to a page table): the
# reference accepts speculatively cached translations whatever the header says.
KVM = Target("kvm", _make, speculative=True)
