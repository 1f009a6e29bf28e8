"""Which programs the KVM target can run, decided before running them.

A program is replayed on real KVM only where every op means the same there as on the model. What
this host cannot do (docs of the target; the host is a kvm_pvm module: long mode only, no SMM,
no SMEP/SMAP offered to guests) or what has no host interface is refused with a reason, so the
caller can report "skipped: REASON" instead of a result. Some limits show only while running
(an access through a 1 GiB page, a memslot update that would unmap the agent's root, a
MAXPHYADDR above the host's): those are
raised as ``Unsupported`` by the KVM machine itself.

``host_program`` adapts any program to what the host runs (a campaign's inputs, its crash
files), and ``kvm_problem`` says whether this machine's KVM can be used at all.
"""

from __future__ import annotations

import random
from dataclasses import replace

from fuzzmmu.arch.bits import PTE_A, PTE_D, PTE_P, PTE_U, PTE_W
from fuzzmmu.oracle.executor import Unsupported, run
from fuzzmmu.program import world as W
from fuzzmmu.program.generate import Generator
from fuzzmmu.program.ops import (
    Access,
    CrBit,
    Entry,
    GuestMode,
    Header,
    Interleave,
    Map,
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
from fuzzmmu.program.text import parse_program
from fuzzmmu.world.observe import AccessKind


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


def host_program(program: Program) -> Program:
    """``program`` as this host can run it: booted in 4-level paging (the other header fields
    kept), without the ops the host cannot do, 1 GiB maps made 2 MiB ones (``_for_host``).
    Deterministic, and idempotent: a campaign on real KVM adapts every decoded input and every
    crash file the same way, so a crash file replays as the program that diverged."""
    return Program(replace(program.header, boot=GuestMode.LONG4), _for_host(program.ops))


def kvm_problem() -> str | None:
    """Why real KVM cannot be used here, or None: the device opens and a booted VM runs the
    agent's first operation (a device that opens may still be a module that cannot run the
    agent). Creates one VM: cheap, but callers that ask often should keep the answer."""
    try:  # here, not above: the target imports this module, and needs iced-x86
        from fuzzmmu.kvm.device import KvmError
        from fuzzmmu.kvm.target import KVM
    except ImportError as exc:  # iced-x86 missing, say
        return f"cannot import the KVM target: {exc}"
    probe = parse_program("config boot=4level\nread cpu0 0xffffff80c0000000+0x0 cpl=0\n")
    try:
        outcome = run(probe, target=KVM)
    except KvmError as exc:
        return str(exc)
    if outcome.skipped or outcome.divergence is not None:
        return f"the agent does not run: {outcome.skipped or outcome.divergence}"
    return None


def check_program(program: Program) -> None:
    """Raise Unsupported when the KVM target cannot run ``program``."""
    why = program_unsupported(program)
    if why is not None:
        raise Unsupported(why)


# The op kinds of fuzzmmu.program.generate that this host can run at least in part.
SUPPORTED_KINDS = ("access", "map", "pte", "store", "invlpg", "cr3", "set", "memslot", "host")


def random_supported_program(rng: random.Random, n_ops: int = 16) -> Program:
    """A random 4-level program of what the host supports (the generator's, with what it
    cannot run left out, ``_for_host``), on a header of ``_random_header``'s."""
    header = _random_header(rng)
    program = Generator(rng, header, kinds=SUPPORTED_KINDS).program(n_ops)
    return Program(header, _for_host(program.ops))


def _for_host(ops: tuple[Op, ...]) -> tuple[Op, ...]:
    """``ops`` without what the host cannot do: unsupported ops left out, and 1 GiB maps made
    2 MiB ones (this host offers no 1 GiB pages; an entry a later op writes may still make
    one, and that program is skipped while running)."""
    return tuple(replace(op, level=2) if isinstance(op, Map) and op.level == 3 else op
                 for op in ops if op_unsupported(op) is None)


def _random_header(rng: random.Random, mmu_pages: int | None = None) -> Header:
    """Zap policy (modern KVM), the MMIO generation bits of current KVM, unsync on (real KVM
    always may), a MAXPHYADDR this host offers, ``mmu_pages`` (default: a random limit)."""
    maxphyaddr = rng.choice((40, 36, 46))
    pages = rng.choice((2000, 64)) if mmu_pages is None else mmu_pages
    return Header("zap", 19, maxphyaddr, pages, GuestMode.LONG4, True)


_LOW_VAS = tuple(va for va in W.VAS if (va >> 39) & 511 not in (300, 511))  # not the agent's
# or the kernel's PML4 slot: a map there takes fresh tables from its pool


def _slot_offset(rng: random.Random, va: int) -> int:
    """An access offset (one the language has) in the last-level table: mostly the gpte that
    maps ``va``."""
    own = ((va >> 12) & 511) * 8
    if own in W.OFFSETS and rng.random() < 0.7:
        return own
    return min(rng.choice(W.OFFSETS), 4096 - 8)  # an 8-byte store stays in its page


def random_unsync_program(rng: random.Random, n_ops: int = 16) -> Program:
    """A random supported program whose guest also maps one of its own last-level tables at
    a user address and works on it, so that CPL3 stores to that table (real KVM's unsync path)
    and accesses through the entries they write come up: two user pages mapped from one pool
    (a fresh PML4 slot gets its tables at pool, pool+1 and pool+2, the last-level one), the
    alias of pool+2, a CPL3 read of the first and a CPL3 store through the alias, then
    generated ops aimed at those addresses."""
    header = _random_header(rng, 2000)
    pool = rng.choice(W.POOLS)
    data, alias = rng.sample(_LOW_VAS, 2)
    user = PTE_P | PTE_W | PTE_U | PTE_A | PTE_D
    upper = PTE_W | PTE_U | PTE_A
    prelude = (Map(0, None, None, data, Entry(rng.randrange(64), user), 1, upper, pool),
               Map(1, None, None, alias, Entry(pool + 2, user), 1, upper, pool),
               # A CPL3 read shadows the tables; a CPL3 store into the last-level one follows.
               Access(0, AccessKind.READ, data, 0, 8, 3, False, 0),
               Access(1, AccessKind.WRITE, alias, _slot_offset(rng, data), 8, 3, False,
                      rng.randrange(256)))
    gen = Generator(rng, header, context=Program(header, prelude), kinds=SUPPORTED_KINDS)
    body = gen.program(max(1, n_ops - len(prelude))).ops
    return Program(header, prelude + _for_host(body))
