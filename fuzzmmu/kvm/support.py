"""Which programs the KVM target can run, decided before running them.

A program is replayed on real KVM only where every op means the same there as on the model. What
this host cannot do (docs of the target; the host is a kvm_pvm module: long mode only, no SMM,
no SMEP/SMAP offered to guests) or what has no host interface is refused with a reason, so the
caller can report "skipped: REASON" instead of a result. Some limits show only while running
(an access through a 1 GiB page, a memslot update that would unmap the agent's root, a
MAXPHYADDR above the host's): those are
raised as ``Unsupported`` by the KVM machine itself.
"""

from __future__ import annotations

from fuzzmmu.oracle.executor import Unsupported
from fuzzmmu.program.ops import (
    CrBit,
    GuestMode,
    Interleave,
    Memslot,
    Migrate,
    Op,
    Program,
    Rsm,
    SetBit,
    SetMode,
    Shrink,
    Smi,
)


def op_unsupported(op: Op) -> str | None:
    """Why the KVM target cannot perform ``op``, or None."""
    if isinstance(op, Interleave):
        return "interleave points are places inside the model's KVM; real KVM has no hook there"
    if isinstance(op, SetMode):
        return ("a mode switch leaves long mode (CR0.PG=0), which this kvm_pvm host cannot run "
                "(KVM_EXIT_SHUTDOWN: paging only in long mode)")
    if isinstance(op, (Smi, Rsm)):
        return "this host has no SMM (KVM_CAP_X86_SMM is 0)"
    if isinstance(op, Memslot) and op.as_id != 0:
        return "address space 1 is SMM's, and this host has no SMM"
    if isinstance(op, Migrate):
        return "no host interface moves one page of a memslot (page migration)"
    if isinstance(op, Shrink):
        return "no host interface runs the MMU shrinker on one VM"
    if isinstance(op, SetBit) and op.bit in (CrBit.SMEP, CrBit.SMAP):
        return f"this host does not offer {op.bit.value.upper()} to guests (CPUID)"
    return None


def program_unsupported(program: Program) -> str | None:
    """Why the KVM target cannot run ``program``, or None when it can try."""
    h = program.header
    if h.boot is not GuestMode.LONG4:
        return (f"boot={h.boot.value}: this kvm_pvm host runs guests in long mode only "
                "(boot=4level)")
    for i, op in enumerate(program.ops):
        why = op_unsupported(op)
        if why is not None:
            return f"op {i} ({op.KIND}): {why}"
    return None


def check_program(program: Program) -> None:
    """Raise Unsupported when the KVM target cannot run ``program``."""
    why = program_unsupported(program)
    if why is not None:
        raise Unsupported(why)
