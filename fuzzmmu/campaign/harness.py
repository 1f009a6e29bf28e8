"""What the Atheris target runs: one input, and the op-level mutator.

``test_one_input`` decodes the bytes, runs model and reference, and raises only when they
diverge: a distinct exception class per divergence kind, raised from a distinct function, so
that libFuzzer/ClusterFuzz crash grouping by the top stack frames separates bug classes. With
target "kvm" the program runs on this machine's real KVM instead of the model (as the host can
run it: fuzzmmu.kvm.support.host_program). Divergences with a suppressed signature (known
findings) are recorded instead of raised, so a campaign goes on past them.

The mutator edits programs at the op level (records of the binary form), stacking a few of:
insert an op aimed at the program's addresses and tables, delete, duplicate, swap, change
one field of one op (one mixed-radix digit), access an accessed address again another way,
map a mapped frame again through a neighbouring entry with other rights, take a memslot away
from under an access and give it back, give memory to a gfn a map names without any, write
an entry an access's walk read (one bit flipped, or a store across it and its neighbour;
after the access, or from the other vCPU while the access is inside KVM), link a table the
walk went through from a second entry with other rights and replay the accesses through it,
change the machine configuration or boot mode, replace the tail with random records; part of
the time it leaves the bytes to libFuzzer's own byte mutator. The two that follow a walk run
the program up to the access on the reference alone.
"""

from __future__ import annotations

import functools
import inspect
import os
import random
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from fuzzmmu.arch.bits import PTE_A, PTE_D, PTE_NX, PTE_P, PTE_U, PTE_W, PagingMode
from fuzzmmu.arch.walker import WalkStep
from fuzzmmu.campaign.feedback import CounterMap, StateFeedback
from fuzzmmu.campaign.settings import SettingsError
from fuzzmmu.model.mmu.internal import Point
from fuzzmmu.oracle.divergence import Divergence, DivergenceKind
from fuzzmmu.oracle.executor import AccessStep, Outcome, lower, run
from fuzzmmu.oracle.reference import OutsideContract, ReferenceMachine
from fuzzmmu.program import world as W
from fuzzmmu.program.codec import (
    HEADER_SIZE,
    MAX_OPS,
    RECORD_SIZE,
    decode,
    decode_record,
    encode,
    op_record,
    record_digits,
    record_from_digits,
)
from fuzzmmu.program.generate import OP_KINDS, Generator, kinds_of
from fuzzmmu.program.ops import (
    BOOT_MODES,
    FLAG_BITS,
    Access,
    Entry,
    GuestMode,
    Header,
    Interleave,
    Invlpg,
    Map,
    Memslot,
    Op,
    Program,
    SetMode,
    Store,
    WritePte,
)
from fuzzmmu.program.world import Extra
from fuzzmmu.world.memslots import MemslotChange
from fuzzmmu.world.observe import DONE, AccessKind

# How often an inserted op keeps to the kinds its program already has (swarm testing: a
# lineage explores deep in a few kinds rather than thinly in all).
SWARM_KEEP = 0.8
# How much a swarm weighs each op kind it keeps, against the generator's own weights.
SWARM_SCALES: Final = (0.25, 1.0, 4.0)


def random_swarm(rng: random.Random) -> dict[str, float]:
    """A random subset of the generator's op kinds, each kept with probability 1/2 (accesses
    and maps always: without them nothing is translated), each kept kind's weight scaled by
    1/4, 1 or 4. Omission alone left every program's mix of the kinds it kept the same:
    scaled, some programs are mostly mode switches and others mostly memslot updates."""
    return {k: rng.choice(SWARM_SCALES) for k, _ in OP_KINDS
            if k in ("access", "map") or rng.random() < 0.5}


class DivergenceFound(Exception):
    """Model and reference disagree. Subclasses name the kind."""

    def __init__(self, divergence: Divergence) -> None:
        self.divergence = divergence
        d = divergence
        super().__init__(f"{d.kind.value} at op {d.op_index} ({d.op}): expected {d.expected}, "
                         f"got {d.actual} [{d.signature}]")


class WrongTranslation(DivergenceFound): ...


class MissingFault(DivergenceFound): ...


class SpuriousFault(DivergenceFound): ...


class WrongErrorCode(DivergenceFound): ...


class AccessedDirtyMismatch(DivergenceFound): ...


class MemoryMismatch(DivergenceFound): ...


class MmioMismatch(DivergenceFound): ...


class StateMismatch(DivergenceFound): ...


class WrongResult(DivergenceFound): ...


class ModelCrash(DivergenceFound): ...


class AuditViolation(DivergenceFound): ...


# One function per kind, so that each kind has its own top stack frame.
def _wrong_translation(d: Divergence) -> None:
    raise WrongTranslation(d)


def _missing_fault(d: Divergence) -> None:
    raise MissingFault(d)


def _spurious_fault(d: Divergence) -> None:
    raise SpuriousFault(d)


def _wrong_error_code(d: Divergence) -> None:
    raise WrongErrorCode(d)


def _ad_mismatch(d: Divergence) -> None:
    raise AccessedDirtyMismatch(d)


def _memory_mismatch(d: Divergence) -> None:
    raise MemoryMismatch(d)


def _mmio_mismatch(d: Divergence) -> None:
    raise MmioMismatch(d)


def _state_mismatch(d: Divergence) -> None:
    raise StateMismatch(d)


def _wrong_result(d: Divergence) -> None:
    raise WrongResult(d)


def _model_crash(d: Divergence) -> None:
    raise ModelCrash(d)


def _audit_violation(d: Divergence) -> None:
    raise AuditViolation(d)


RAISERS: dict[DivergenceKind, Callable[[Divergence], None]] = {
    DivergenceKind.WRONG_TRANSLATION: _wrong_translation,
    DivergenceKind.MISSING_FAULT: _missing_fault,
    DivergenceKind.SPURIOUS_FAULT: _spurious_fault,
    DivergenceKind.WRONG_ERROR_CODE: _wrong_error_code,
    DivergenceKind.AD_MISMATCH: _ad_mismatch,
    DivergenceKind.MEMORY_MISMATCH: _memory_mismatch,
    DivergenceKind.MMIO_MISMATCH: _mmio_mismatch,
    DivergenceKind.STATE_MISMATCH: _state_mismatch,
    DivergenceKind.WRONG_RESULT: _wrong_result,
    DivergenceKind.MODEL_CRASH: _model_crash,
    DivergenceKind.AUDIT_VIOLATION: _audit_violation,
}


@dataclass(frozen=True)
class Suppression:
    """Divergence signatures a campaign records and goes on from, and the file each one's
    signature is appended to (a line per divergent input; None: not recorded)."""

    signatures: frozenset[str]
    log: Path | None = None

    def hides(self, d: Divergence) -> bool:
        """Whether ``d`` is suppressed; if so, it is recorded. One short write in append mode:
        fork mode's jobs append to the same file without tearing each other's lines."""
        if d.signature not in self.signatures:
            return False
        if self.log is not None:
            with self.log.open("a") as f:
                f.write(d.signature + "\n")
        return True


def test_one_input(data: bytes, bugs: Sequence[str] = (), audit: bool = False,
                   counters: CounterMap | None = None, *, target: str = "model",
                   suppress: Suppression | None = None) -> None:
    """Deterministic: the same bytes always give the same program and outcome. With
    ``counters``, the run's state features are reported to libFuzzer through them. With
    ``target="kvm"`` the program runs on real KVM (no bugs, audit or state features: those
    are the model's); a program the host cannot run is skipped, which is not a crash."""
    if target == "kvm":
        outcome = _run_on_kvm(data, bugs, audit, counters)
    elif counters is None:
        outcome = run(decode(data), bugs, audit=audit)
    else:
        feedback = StateFeedback()
        outcome = run(decode(data), bugs, audit=audit, observe=feedback)
        counters.report(feedback.features)
    d = outcome.divergence
    if d is not None and (suppress is None or not suppress.hides(d)):
        RAISERS[d.kind](d)


def _run_on_kvm(data: bytes, bugs: Sequence[str], audit: bool,
                counters: CounterMap | None) -> Outcome:
    if bugs or audit or counters is not None:
        raise SettingsError("bugs, the audit and state feedback are the model's: real KVM "
                            "runs its own code")
    # Imported here: a campaign on the model never loads the KVM target (nor iced-x86); the
    # Atheris target imports it first, under instrumentation, when it fuzzes real KVM.
    from fuzzmmu.kvm.support import host_program
    from fuzzmmu.kvm.target import KVM_POOLED

    # One VM per process, reset in place between inputs (fuzzmmu.kvm.pool); the campaign's
    # replay of a crash file runs on a fresh VM (fuzzmmu.kvm.target.KVM).
    return run(host_program(decode(data)), target=KVM_POOLED)


# ---------------------------------------------------------------------- mutation


def _records(data: bytes) -> tuple[bytes, list[bytes]]:
    header = data[:HEADER_SIZE].ljust(HEADER_SIZE, b"\0")
    body = data[HEADER_SIZE:]
    n = min(len(body) // RECORD_SIZE, MAX_OPS)
    return header, [body[i * RECORD_SIZE:(i + 1) * RECORD_SIZE] for i in range(n)]


def _join(header: bytes, records: list[bytes], max_size: int) -> bytes:
    keep = max(0, min(len(records), (max_size - HEADER_SIZE) // RECORD_SIZE, MAX_OPS))
    return header + b"".join(records[:keep])


def _new_records(rng: random.Random, program: Program) -> list[bytes]:
    """Mostly an op aimed at what the program already uses (an interleave is several
    records), of a kind the program already has: its lineage's swarm, which it leaves now and
    then; sometimes any op of the world, uniformly (what the generator rarely writes)."""
    if rng.random() < 0.25:
        return [op_record(decode_record(rng.randbytes(RECORD_SIZE)))]
    swarm = kinds_of(program) if rng.random() < SWARM_KEEP else None
    op = Generator(rng, program.header, program, swarm or None).op()
    return _op_records(program.header, op)


def _op_records(header: Header, op: Op) -> list[bytes]:
    if isinstance(op, Interleave):
        body = encode(Program(header, (op,)))[HEADER_SIZE:]
        return [body[i:i + RECORD_SIZE] for i in range(0, len(body), RECORD_SIZE)]
    return [op_record(op)]


def _change_field(rng: random.Random, rec: bytes) -> bytes:
    """Change one mixed-radix digit of a record: one field of one op."""
    kind, digits = record_digits(rec)
    if not digits:
        return rec
    i = rng.randrange(len(digits))
    digits[i] = (rng.randrange(digits[i][1]), digits[i][1])
    return record_from_digits(kind, digits)


def _mutate_header(rng: random.Random, h: Header) -> Header:
    field = rng.randrange(6)
    return Header(
        rng.choice(("zap", "update")) if field == 0 else h.policy,
        rng.choice(W.MMIO_GEN_BITS) if field == 1 else h.mmio_gen_bits,
        rng.choice(W.MAXPHYADDRS) if field == 2 else h.maxphyaddr,
        rng.choice(W.MMU_PAGES) if field == 3 else h.mmu_pages,
        rng.choice(BOOT_MODES) if field == 4 else h.boot,
        not h.unsync if field == 5 else h.unsync)


@dataclass
class _Draft:
    """A program being mutated: its header and op records, and the program it started as
    (what inserted ops aim at)."""

    header: bytes
    recs: list[bytes]
    start: Program


def _insert(rng: random.Random, d: _Draft) -> None:
    at = rng.randrange(len(d.recs) + 1)
    d.recs[at:at] = _new_records(rng, d.start)


def _delete(rng: random.Random, d: _Draft) -> None:
    if d.recs:
        del d.recs[rng.randrange(len(d.recs))]


def _duplicate(rng: random.Random, d: _Draft) -> None:
    if d.recs:
        d.recs.insert(rng.randrange(len(d.recs) + 1), d.recs[rng.randrange(len(d.recs))])


def _swap(rng: random.Random, d: _Draft) -> None:
    if len(d.recs) > 1:
        i, j = rng.sample(range(len(d.recs)), 2)
        d.recs[i], d.recs[j] = d.recs[j], d.recs[i]


def _change(rng: random.Random, d: _Draft) -> None:
    if d.recs:
        i = rng.randrange(len(d.recs))
        d.recs[i] = _change_field(rng, d.recs[i])


def _reconfigure(rng: random.Random, d: _Draft) -> None:
    """The machine configuration and boot mode."""
    d.header = encode(Program(_mutate_header(rng, decode(d.header).header), ()))


def _random_tail(rng: random.Random, d: _Draft) -> None:
    """Keep a prefix, then uniformly random records: what the random tester would run next
    from there, so the search never explores less than it would."""
    del d.recs[rng.randrange(len(d.recs) + 1):]
    d.recs += [rng.randbytes(RECORD_SIZE) for _ in range(rng.randint(1, 8))]


def _fresh(rng: random.Random, d: _Draft) -> None:
    """A freshly generated program on a random machine, from a random swarm of op kinds: the
    breadth of a random tester, kept among the mutations so that a campaign never explores
    less than one (a mutant of a dozen seeds stays near their configurations)."""
    gen = Generator(rng, kinds=random_swarm(rng))
    program = gen.program(rng.randint(2, 24))
    d.header = encode(Program(program.header, ()))
    d.recs = [r for op in program.ops for r in _op_records(program.header, op)]


def _pick_access(rng: random.Random, d: _Draft) -> tuple[int, Access] | None:
    """One of the draft's accesses and its record's index; None when it has none."""
    spots = [i for i, rec in enumerate(d.recs) if record_digits(rec)[0] is Access]
    if not spots:
        return None
    i = rng.choice(spots)
    op = decode_record(d.recs[i])
    assert isinstance(op, Access)
    return i, op


@dataclass
class _Site:
    """Where one of the draft's accesses runs: its record's index, the access, the program
    before it, a generator over that program (the memslots and SMM state it leaves) and the
    address space the access's vCPU is in there."""

    i: int
    op: Access
    prefix: Program
    gen: Generator
    as_id: int


def _pick_site(rng: random.Random, d: _Draft) -> _Site | None:
    """One of the draft's accesses with where it runs; None when the draft has none."""
    picked = _pick_access(rng, d)
    if picked is None:
        return None
    i, op = picked
    prefix = decode(d.header + b"".join(d.recs[:i]))
    gen = Generator(rng, prefix.header, prefix)
    return _Site(i, op, prefix, gen, int(gen.in_smm[op.vcpu]))


def _as_other_kind(rng: random.Random, op: Access) -> Access:
    """``op`` as another kind of access (a write stores a value: its seed, or a new one)."""
    kind = rng.choice([k for k in _ACCESS_KINDS if k is not op.kind])
    return _as_write(rng, op) if kind is AccessKind.WRITE else replace(op, kind=kind, seed=0)


def _as_write(rng: random.Random, op: Access) -> Access:
    """``op`` as a write (of its seed, or a new one)."""
    return replace(op, kind=AccessKind.WRITE, seed=op.seed or rng.randrange(1, 256))


def _reaccess(rng: random.Random, d: _Draft) -> None:
    """Touch an address the program accessed once more, another way: a copy of one of its
    accesses with the kind, the privilege, EFLAGS.AC or the vCPU changed, somewhere after
    it, now and then behind an INVLPG of the address, a control bit flipped, a memslot update
    or a switch of address space. The second access is checked against what the first left:
    KVM caches a walk's permissions in the spte (and an MMIO translation in the vCPU), and its
    reuse by another kind of access, or in another context, is where a cache that keys too
    little shows. Otherwise it takes a duplicate placed after its original and then a change
    that hits the copy's field."""
    picked = _pick_access(rng, d)
    if picked is None:
        _insert(rng, d)
        return
    i, op = picked
    field = rng.randrange(4)
    if field == 0:
        op = _as_other_kind(rng, op)
    elif field == 1:
        op = replace(op, cpl=3 - op.cpl)
    elif field == 2:
        op = replace(op, ac=not op.ac)
    else:
        op = replace(op, vcpu=1 - op.vcpu)
    new = [op_record(op)]
    if rng.random() < 0.3:
        new.insert(0, op_record(Invlpg(op.vcpu, op.va)))
    at = rng.randint(i + 1, len(d.recs))
    event = rng.random()
    if event < 0.45:
        # Behind a change of what KVM keys its caches on, drawn from where the program is at
        # that point; the copy checks that what the first access left still holds after it:
        # a control bit of the access's vCPU flipped (shadow pages are built under a role
        # that holds the guest context, CR0.WP, CR4.SMEP/SMAP/PSE, EFER.NX;
        # kvm_calc_cpu_role()), a memslot update (MMIO sptes and the vCPU's MMIO cache carry
        # the memslot generation they were made under; kvm_mmu_invalidate_mmio_sptes()), or
        # an SMI or RSM of the vCPU (the other address space, role.smm).
        prefix = decode(d.header + b"".join(d.recs[:at]))
        gen = Generator(rng, prefix.header, prefix)
        change: Op = (gen.flip(op.vcpu) if event < 0.3 else
                      gen.memslot_update() if event < 0.375 else gen.switch_space(op.vcpu))
        new.insert(0, op_record(change))
    d.recs[at:at] = new


def _vacate(rng: random.Random, d: _Draft) -> None:
    """Take the memory from under an access and give it back: a memslot of the address space
    the access's vCPU is in is deleted just before the access, and created again (its base
    and host pages, as much of it as one update of the world's sizes brings back) somewhere
    after it, followed by the same access once more. KVM caches that a gfn has no memslot,
    and trusts that only while the memslot generation stays (MMIO sptes and the vCPU's MMIO
    cache carry it: mark_mmio_spte(), vcpu_cache_mmio_info()) or until it rebuilds what it
    cached (a dummy root, a PAE root entry left empty: mmu_alloc_shadow_roots()); the
    copy checks that what the first access made of the absence does not outlive it."""
    site = _pick_site(rng, d)
    if site is None:
        _insert(rng, d)
        return
    i, as_id = site.i, site.as_id
    slots = [m for m in site.gen.memslots.slots(as_id)
             if m.base_gfn in W.SLOT_BASES and m.hva in W.SLOT_HVAS]
    if not slots:
        _reaccess(rng, d)
        return
    slot = rng.choice(slots)
    npages = max(n for n in W.SLOT_SIZES if n <= slot.npages)  # a slot has a page at least
    back = Memslot(as_id, slot.slot_id, MemslotChange.CREATE, slot.base_gfn, npages, slot.hva)
    at = rng.randint(i + 1, len(d.recs))
    d.recs[at:at] = [op_record(back), d.recs[i]]
    d.recs.insert(i, op_record(Memslot(as_id, slot.slot_id, MemslotChange.DELETE)))


def _fill(rng: random.Random, d: _Draft) -> None:
    """Give memory to a gfn the program maps without any: a frame one of its maps names (at
    the address one of its accesses touches, if there is one) that has no memslot in the
    address space of the access's vCPU gets one, created somewhere after the access (now and
    then with the access inside the update), and the access runs again after that. What KVM
    made of the gfn while it had no memory, an MMIO spte or the vCPU's MMIO cache under the
    memslot generation of then (mark_mmio_spte(), vcpu_cache_mmio_info()), must not outlive
    the memslot; vacate's converse."""
    site = _pick_site(rng, d)
    if site is None:
        _insert(rng, d)
        return
    # The memslot is made where it goes in: what is free there, not at the access.
    at = rng.randint(site.i + 1, len(d.recs))
    there = Generator(rng, site.prefix.header, decode(d.header + b"".join(d.recs[:at])))

    def creates(maps: list[Map]) -> list[Memslot]:
        return [c for t in dict.fromkeys(m.entry.target for m in maps)
                if (c := there.cover(site.as_id, t)) is not None]

    maps = [m for m in site.prefix.flat_ops() if isinstance(m, Map)]
    found = creates([m for m in maps if m.va == site.op.va]) or creates(maps)
    if not found:
        _vacate(rng, d)
        return
    create = rng.choice(found)
    if rng.random() < 0.3:
        # With a vCPU's access to the gfn inside the update, after the new generation is
        # published and before the MMIO sptes of the old one are gone (install_new_memslots(),
        # kvm_mmu_invalidate_mmio_sptes()): whatever it caches there must not outlive it.
        inside = replace(site.op, vcpu=rng.randrange(2))
        race = _op_records(d.start.header, Interleave(Point.MEMSLOT_PUBLISH, create, (inside,)))
        d.recs[at:at] = race
        at += len(race) - 1
    else:
        d.recs.insert(at, op_record(create))
    d.recs.insert(rng.randint(at + 1, len(d.recs)), d.recs[site.i])


# Bits of an entry a rewrite of it may flip: the rights, presence and the A/D bits (KVM keeps
# each in its sptes or its shadow pages' roles: FNAME(sync_spte), kvm_mmu_page_role.access).
_ENTRY_BITS: Final = (PTE_NX, PTE_W, PTE_U, PTE_P, PTE_A, PTE_D)
_FLAG_MASK: Final = sum(FLAG_BITS.values())
# The extras an entry of each size can carry (a 4-byte entry has no bit 62).
_EXTRAS: Final = {4: (Extra.RSVD, Extra.BIT13), 8: (Extra.RSVD, Extra.BIT13, Extra.BIT62)}


def _walked(rng: random.Random, d: _Draft
            ) -> tuple[int, Access, tuple[WalkStep, ...], int] | None:
    """One of the draft's accesses (its record's index and the op), the entries in guest
    frames its walk reads where the program is then (as the reference walks them), and
    their size (4 or 8 bytes); None when the draft has no access whose walk reads one."""
    picked = _pick_access(rng, d)
    if picked is None:
        return None
    i, op = picked
    walked = _walk_after(d.header + b"".join(d.recs[:i]), op)
    return None if walked is None else (i, op, *walked)


# A corpus entry is mutated again and again (libFuzzer picks from a few thousand), so the
# walks of its accesses are kept rather than made once more.
@functools.lru_cache(maxsize=4096)
def _walk_after(prefix: bytes, op: Access) -> tuple[tuple[WalkStep, ...], int] | None:
    """The entries in guest frames that ``op``'s walk reads after the program ``prefix``,
    and their size; None if it reads none. Only the reference runs the program, each access
    taken to see what the reference expects (what a correct model would: the mutator needs
    the guest's tables, not a verdict), an interleave's ops one after the other; a program
    that leaves the reference's contract reads none."""
    program = decode(prefix)
    h = program.header
    r = ReferenceMachine(h.maxphyaddr, speculative=h.unsync)
    boot = [] if h.boot is GuestMode.OFF else [SetMode(v, h.boot, W.BOOT_ROOT) for v in (0, 1)]
    try:
        for o in boot + program.flat_ops():
            for step in lower(o, r):
                got = (r.expected(step.vcpu, step.gva, step.akind, cpl=step.cpl, ac=step.ac,
                                  width=step.width, value=step.value)
                       if isinstance(step, AccessStep) else DONE)
                step.on_ref(r, got)
        if r.cpus[op.vcpu].dead:
            return None
        _, trace = r.trace(op.vcpu, op.va + op.offset, op.kind, cpl=op.cpl, ac=op.ac)
        size = 4 if r.cpu_state(op.vcpu, op.ac).mode is PagingMode.BIT32 else 8
    except OutsideContract:
        return None
    finally:
        r.release()
    steps = tuple(s for s in trace if s.entry_gpa is not None and s.entry_gpa >> 12 < 64)
    return (steps, size) if steps else None


def _entry_read(rng: random.Random, step: WalkStep, size: int) -> Entry:
    """The entry a walk read, as a program writes one (a target out of the world's becomes
    one of its RAM frames)."""
    target = (step.value >> 12) & (0xFFFFF if size == 4 else 0xFFFFFFFFFF)
    flags = step.value & _FLAG_MASK & (0xFFF if size == 4 else ~0)
    return Entry(target if target in W.TARGETS else rng.choice(W.TARGETS[:64]), flags)


def _rewrite(rng: random.Random, d: _Draft) -> None:
    """Write, after one of the program's accesses, to a guest page-table entry its walk read
    (the reference walks it where the program is then): the entry again with one bit among
    its rights, presence and A/D flipped or with a bit only some modes reserve, or a store
    of 2, 4 or 8 bytes that straddles it and the entry next to it; the access runs again
    after that, now and then as another kind of access, or from both vCPUs. Now and then
    the other vCPU writes instead while the access is inside KVM (an interleave). The tables
    an access walks are what KVM shadows for it, write-protects and emulates the guest's
    stores to (kvm_mmu_pte_write(): one spte or two per store, detect_write_misaligned(),
    the 32-bit PDE that maps two shadow PDEs); a store there is where a shadow page and its
    guest table part ways."""
    walked = _walked(rng, d)
    if walked is None:
        _reaccess(rng, d)
        return
    i, op, steps, size = walked
    step = rng.choice(steps)
    assert step.entry_gpa is not None
    frame, at_byte = step.entry_gpa >> 12, step.entry_gpa & 0xFFF
    read = _entry_read(rng, step, size)
    if rng.random() < 0.25:
        # A bit that is reserved in some modes, levels or page sizes only, not the others
        # (SDM 4.3, 4.4.2, 4.5.4): what the walk of each vCPU, in its own mode, must check
        # of a table that both reach (a shadow page's role keys its mode; is_rsvd_spte()).
        entry = replace(read, extra=rng.choice(_EXTRAS[size]))
    else:
        bits = _ENTRY_BITS[1:] if size == 4 else _ENTRY_BITS  # a 4-byte entry has no NX
        entry = replace(read, flags=read.flags ^ rng.choice(bits))
    index = at_byte // size
    straddle = [(o, w) for w in (2, 4, 8) for b in (at_byte, at_byte + size)
                for o in range(b - w + 1, b) if o in _STORE_OFFSET_SET and o + w <= 4096]
    vcpu = rng.choice((op.vcpu, op.vcpu, 1 - op.vcpu))
    write: Store | WritePte
    if straddle and (rng.random() < 0.5 or index not in W.SLOTS):
        o, w = rng.choice(straddle)
        write = Store(vcpu, frame, o, w, entry)
    elif index in W.SLOTS:
        write = WritePte(vcpu, frame, index, entry, size)
    else:
        _reaccess(rng, d)
        return
    again = _as_other_kind(rng, op) if rng.random() < 0.3 else op
    # Behind an INVLPG, after which the guest must see the entry as written (SDM 4.10.4.1):
    # without one, the translation the access made before may stand.
    flush = rng.random() < 0.5
    new: list[Op] = [write, again]
    if rng.random() < 0.3:
        # And from the other vCPU: both walk the table through one shadow page when their
        # roles agree, whatever each one's own context says of the entry.
        new.append(replace(again, vcpu=1 - again.vcpu))
    if rng.random() < 0.3 and _top_level(d.recs, i):
        # Or the other vCPU writes the entry while the access is inside KVM, between its
        # walk and its spte (an interleave), and then walks the same way itself: KVM walks
        # the guest's tables unlocked and must see the entry change before it links what the
        # walk read (FNAME(gpte_changed), mmu_invalidate_retry, the gpte re-read of
        # FNAME(fetch)); the access runs again behind an INVLPG.
        write = replace(write, vcpu=1 - op.vcpu)
        second = (write, replace(op, vcpu=1 - op.vcpu)) if rng.random() < 0.5 else (write,)
        race = _op_records(d.start.header, Interleave(rng.choice(_RACE_POINTS), op, second))
        d.recs[i:i + 1] = race
        i += len(race) - 1
        new[0] = Invlpg(op.vcpu, op.va)
    elif flush:
        new.insert(1, Invlpg(op.vcpu, op.va))
    at = rng.randint(i + 1, len(d.recs))
    d.recs[at:at] = [op_record(x) for x in new]


def _top_level(recs: list[bytes], i: int) -> bool:
    """Whether record ``i`` is an op of its own, not part of an interleave."""
    j = 0
    while j < i:
        kind, digits = record_digits(recs[j])
        j += 3 + digits[-1][0] if kind is Interleave else 1  # header, first, 1 + seconds
    return j == i


# Where in KVM's fault path another vCPU can act while an access is inside it.
_RACE_POINTS: Final = (Point.WALKED, Point.FAULTIN, Point.PRE_LEAF, Point.EMULATE)


def _share(rng: random.Random, d: _Draft) -> None:
    """Point a second entry of a table one of the program's accesses walks through where the
    walk's entry there points (the table below, or the page), with one right (W, U or NX)
    changed, after the access; then the program's accesses that went through the first entry
    (up to four, in their order) once more through the second (addresses that differ from
    theirs at that level only), now and then the first access through the first entry again,
    and now and then a write each way. A guest table linked from two parents with different
    rights is shadowed once per access the walk down to it allows (role.access,
    kvm_mmu_get_child_sp()); a page reached twice is two sptes in one rmap. The traffic of
    both ways through the shared table is what shows whether KVM keys its shadow by what
    each way allows."""
    walked = _walked(rng, d)
    if walked is None:
        _reaccess(rng, d)
        return
    i, op, steps, size = walked
    # The address bits the mode translates: 64 in long mode, else 32.
    mask = (1 << 64) - 1 if size == 8 and any(s.level == 4 for s in steps) else 0xFFFFFFFF
    vas = _VAS_BY_LOW[mask]
    bits = 10 if size == 4 else 9  # index bits per level
    shares = []
    for step in steps:
        assert step.entry_gpa is not None
        shift = 12 + bits * (step.level - 1)
        index = (step.entry_gpa & 0xFFF) // size
        # The bits of an address that pick the way down to the entry's table and the entry.
        above = mask & -(1 << shift)
        for other in W.SLOTS:
            va = vas.get((op.va & mask & ~(((1 << bits) - 1) << shift)) | (other << shift))
            if other != index and other < 1 << bits and va is not None:
                shares.append((step, other, va, above))
    if not shares:
        _rewrite(rng, d)
        return
    step, index, va, above = rng.choice(shares)
    assert step.entry_gpa is not None
    read = _entry_read(rng, step, size)
    rights = _RIGHTS if size == 8 else _RIGHTS[:2]
    link = WritePte(op.vcpu, step.entry_gpa >> 12, index,
                    replace(read, flags=read.flags ^ rng.choice(rights)), size)
    ways: list[Access] = []
    for rec in d.recs:
        if record_digits(rec)[0] is Access and len(ways) < 4:
            access = decode_record(rec)
            assert isinstance(access, Access)
            moved = vas.get((access.va & mask & ~above) | (va & above))
            if (access.va ^ op.va) & above == 0 and moved is not None:
                ways.append(replace(access, va=moved))
    if rng.random() < 0.5:
        ways.append(op)
    new: list[Op] = [link, *ways]
    if ways and rng.random() < 0.3:
        # Then both ways written, the second one first. A writable entry with D clear is
        # shadowed read-only until its first write sets D (FNAME(fetch), the dirty-bit
        # trick), in a shadow page that a way with fewer rights may share; what the first
        # write makes writable must be only what its own way allows.
        new += [_as_write(rng, ways[0]), Invlpg(op.vcpu, op.va), _as_write(rng, op)]
    at = rng.randint(i + 1, len(d.recs))
    d.recs[at:at] = [op_record(x) for x in new]


_STORE_OFFSET_SET: Final = frozenset(W.STORE_OFFSETS)
# The world's addresses by the bits a mode translates (long mode: all; otherwise the low 32,
# each standing for the first address that has them).
_VAS_BY_LOW: Final = {(1 << 64) - 1: {va: va for va in W.VAS},
                      0xFFFFFFFF: {va & 0xFFFFFFFF: va for va in reversed(W.VAS)}}

# The bit of the address that picks the neighbouring entry of the table a map's leaf is in,
# per level (PAE and long-mode tables; in 32-bit tables a level-2 neighbour is the same PDE).
_NEIGHBOUR: Final = {1: 1 << 12, 2: 1 << 21, 3: 1 << 30}
_RIGHTS: Final = (PTE_W, PTE_U, PTE_NX)


def _alias(rng: random.Random, d: _Draft) -> None:
    """Map a frame the program maps once more, with one right (W, U or NX) changed, through
    the neighbouring entry of the same table (a copy of a map at the next address of its level,
    or of a PTE write at the next slot), somewhere after the original; a map is then touched
    through the alias, and now and then through the original again. One guest frame reached
    through several guest entries is what KVM's rmaps (several sptes per gfn) and parent
    lists (several parents per shadow page) exist for, and the rights differ along the ways:
    a table is shadowed once per role, whose access is what the walk above it allowed
    (kvm_mmu_get_child_sp(), role.access), and a large page's direct shadow page is shared
    by every PDE that maps it with the same access."""
    spots = [i for i, rec in enumerate(d.recs)
             if record_digits(rec)[0] in (Map, WritePte, Store)]
    if not spots:
        _insert(rng, d)
        return
    i = rng.choice(spots)
    op = decode_record(d.recs[i])
    assert isinstance(op, Map | WritePte | Store)
    entry = replace(op.entry, flags=op.entry.flags ^ rng.choice(_RIGHTS))
    new: list[Op]
    if isinstance(op, WritePte):
        slots = 4096 // op.width
        near = [s for s in (op.index ^ 1, op.index + 1, op.index - 1)
                if s != op.index and s in W.SLOTS and s < slots]
        index = near[0] if near else rng.choice([s for s in W.SLOTS if s < slots])
        new = [replace(op, index=index, entry=entry)]
    elif isinstance(op, Store):
        # The entry next to the one stored to, as a table of 8-byte entries has it (a store
        # may be of any width and offset; the world's offsets sit around its slots and leave
        # room for a store of any width).
        near = [o for o in (op.offset ^ 8, op.offset + 8, op.offset - 8)
                if o in W.STORE_OFFSETS]
        new = [replace(op, offset=rng.choice(near) if near else
                       rng.choice(W.STORE_OFFSETS), entry=entry)]
    else:
        va = op.va ^ _NEIGHBOUR[op.level]
        if va not in W.VAS:
            va = rng.choice([v for v in W.VAS if v != op.va])
        kind = rng.choices(_ACCESS_KINDS, (5, 4, 1))[0]
        touch = Access(op.vcpu, kind, va, 0, 8, rng.choice((0, 0, 3)), False,
                       rng.randrange(1, 256) if kind is AccessKind.WRITE else 0)
        new = [replace(op, va=va, entry=entry), touch]
        if rng.random() < 0.5:
            new.append(replace(touch, va=op.va))
    at = rng.randint(i + 1, len(d.recs))
    d.recs[at:at] = [op_record(x) for x in new]


_ACCESS_KINDS = tuple(AccessKind)
_MUTATIONS = ((_insert, 25), (_delete, 12), (_duplicate, 7), (_swap, 7), (_change, 36),
              (_reconfigure, 8), (_random_tail, 5), (_fresh, 5), (_reaccess, 8), (_alias, 6),
              (_vacate, 4), (_fill, 4), (_rewrite, 5), (_share, 4))
_KINDS = [m for m, _ in _MUTATIONS]
_WEIGHTS = [w for _, w in _MUTATIONS]


def mutate(data: bytes, max_size: int, seed: int,
           byte_mutator: Callable[[bytes, int], bytes] | None = None,
           byte_share: float = 0.2) -> bytes:
    """The custom mutator: deterministic in (data, max_size, seed). Stacks 1, 2 or 4 op-level
    mutations, as AFL's havoc stage stacks byte mutations."""
    rng = random.Random(seed)
    if byte_mutator is not None and rng.random() < byte_share:
        return byte_mutator(data, max_size)
    header, recs = _records(data)
    draft = _Draft(header, recs, decode(data))
    if not recs:
        _insert(rng, draft)
    for mutation in rng.choices(_KINDS, _WEIGHTS, k=1 << rng.randrange(3)):
        mutation(rng, draft)
    return _join(draft.header, draft.recs, max_size)


# The exit status of a target whose mutator raised (EX_SOFTWARE, sysexits.h).
MUTATOR_FAILED: Final = 70


def exit_on_error(fn: Callable[..., bytes]) -> Callable[..., bytes]:
    """``fn`` (the custom mutator), ending the process when it raises. libFuzzer calls it
    from C++, and an exception escaping it prints its traceback and then leaves the process
    hanging (Atheris 3): a campaign would sit without running a program until its time ran
    out. Instead the call that reproduces it (it is deterministic in its arguments) and the
    traceback go to stderr, whose last lines the campaign reports, and the process exits
    with MUTATOR_FAILED."""

    names = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def guarded(*args: bytes | int) -> bytes:
        try:
            return fn(*args)
        except Exception:
            given = ", ".join(f"{n}=bytes.fromhex({a.hex()!r})" if isinstance(a, bytes)
                              else f"{n}={a!r}" for n, a in zip(names, args, strict=False))
            print(f"fuzzmmu: {fn.__name__} raised on {given} (mutate() of "
                  "fuzzmmu.campaign.harness is deterministic in these)", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(MUTATOR_FAILED)

    return guarded
