"""The KVM targets for the executor: ``fuzzmmu.oracle.executor.Target``s whose machine is real
KVM (``KvmMachine``).

``KVM`` runs each program on a fresh VM: what reproduces a finding (replay, triage,
minimization, an exported test) uses it, so that nothing a VM kept from earlier programs can
take part. ``KVM_POOLED`` runs it on a VM of this process's pool (fuzzmmu.kvm.pool), reset in
place between programs, several times faster: for campaigns and measurements.
"""

from __future__ import annotations

from fuzzmmu.kvm.machine import KvmMachine
from fuzzmmu.kvm.pool import POOL, GuestPool
from fuzzmmu.kvm.support import check_program
from fuzzmmu.model.bugs import BugSet
from fuzzmmu.oracle.executor import Target, Unsupported
from fuzzmmu.program.ops import Program


def _target(pool: GuestPool | None) -> Target:
    """The KVM target on a fresh VM per program (``pool`` None) or on the VMs of ``pool``."""

    def make(program: Program, bugs: BugSet) -> KvmMachine:
        if bugs.ids:
            raise Unsupported("bugs are mutants of the model; real KVM runs its own code")
        check_program(program)
        return KvmMachine(program, pool)

    # Real KVM may make any last-level shadow page unsync (a CPL3 store to a page table):
    # the reference accepts speculatively cached translations whatever the header says.
    return Target("kvm", make, speculative=True)


def pooled(pool: GuestPool) -> Target:
    """The KVM target on the VMs of ``pool``."""
    return _target(pool)


KVM = _target(None)
KVM_POOLED = pooled(POOL)
