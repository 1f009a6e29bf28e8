"""The reference's choice between the current tables and a cached translation when both give
the model's outcome (SDM §4.10.2.3): it follows the tables and keeps the walk revocable, and
takes it back only when the state comparison needs it. With unsync pages: which speculative
translations it accepts, and the invalidations that end them."""

from __future__ import annotations

from fuzzmmu.oracle.executor import Executor
from fuzzmmu.oracle.reference import ReferenceMachine
from fuzzmmu.program.text import parse_program
from fuzzmmu.world.layout import DIRECT_MAP
from fuzzmmu.world.observe import AccessKind, Observation, ObsKind

# A 1-GiB leaf written with D clear; cpu1 writes through it (D set, a dirty translation
# cached); the leaf is rewritten with D clear again, and nothing invalidates cpu1's TLB.
PROGRAM = """\
# fuzzmmu program v1
config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level
map cpu0 root=current current 0x40000000 -> 0x0 P|W level=3 upper=W pool=0x8
write cpu1 0x40201000+0x0 width=1 cpl=0 seed=0x0
map cpu0 root=current current 0x40000000 -> 0x0 P|W level=3 upper=NX pool=0x8
"""
GVA = 0x40201000
LEAF = (0x8 << 12) + 8  # the PDPTE of 0x40000000 in pool frame 8
PTE_A, PTE_D = 1 << 5, 1 << 6


def _booted() -> ReferenceMachine:
    ex = Executor(parse_program(PROGRAM))
    assert ex.run().divergence is None
    return ex.ref


def _leaf(ref: ReferenceMachine) -> int:
    return ref.phys.backing.read(LEAF, 8)


def _write(ref: ReferenceMachine) -> bool:
    model = ref.expected(1, GVA, AccessKind.WRITE, width=1)  # the model agrees with the tables
    ok, _ = ref.access(1, GVA, AccessKind.WRITE, model, width=1)
    return ok


def test_write_with_a_dirty_cached_translation_may_skip_the_d_bit() -> None:
    ref = _booted()
    assert not _leaf(ref) & PTE_D
    assert _write(ref)
    assert _leaf(ref) & PTE_D  # the tables' outcome first
    assert ref.forgo_optional_walk()
    assert not _leaf(ref) & PTE_D  # taken back: the cached dirty translation served the write
    assert not ref.forgo_optional_walk()  # once only


def test_without_a_cached_translation_the_d_bit_is_due() -> None:
    ref = _booted()
    ref.invlpg(1, GVA)
    assert _write(ref)
    assert _leaf(ref) & PTE_D
    assert not ref.forgo_optional_walk()
    assert _leaf(ref) & PTE_D


def test_a_later_walk_through_the_entries_keeps_only_the_bits_it_sets_itself() -> None:
    ref = _booted()
    assert _write(ref)
    model = ref.expected(0, GVA, AccessKind.READ, width=1)
    assert ref.access(0, GVA, AccessKind.READ, model, width=1)[0]
    # cpu0's read walked through the leaf: it needs A there, never D (SDM 4.8)
    assert ref.forgo_optional_walk()
    assert _leaf(ref) & PTE_A and not _leaf(ref) & PTE_D


def test_a_later_write_through_the_entries_keeps_the_d_bit() -> None:
    ref = _booted()
    assert _write(ref)
    model = ref.expected(0, GVA, AccessKind.WRITE, width=1)
    assert ref.access(0, GVA, AccessKind.WRITE, model, width=1)[0]
    ref.forgo_optional_walk()
    assert _leaf(ref) & PTE_A and _leaf(ref) & PTE_D


def test_a_later_read_of_the_entry_as_data_makes_the_walk_final() -> None:
    ref = _booted()
    assert _write(ref)
    va = DIRECT_MAP + LEAF  # the leaf itself, through the kernel's direct map
    model = ref.expected(0, va, AccessKind.READ, width=8)
    assert model.value & PTE_D  # it read the D bit the walk set
    assert ref.access(0, va, AccessKind.READ, model, width=8)[0]
    assert not ref.forgo_optional_walk()
    assert _leaf(ref) & PTE_D


def test_copy_keeps_the_record() -> None:
    ref = _booted()
    assert _write(ref)
    other = ref.copy()
    assert other.forgo_optional_walk()
    assert not _leaf(other) & PTE_D
    assert _leaf(ref) & PTE_D


# -- speculative translations (machines with unsync pages)

SPEC = """\
# fuzzmmu program v1
config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level{unsync}
map cpu0 root=current current 0x40001000 -> 0x5 P|W|A|D level=1 upper=W|A pool=0x8
map cpu0 root=current current 0x40008000 -> 0x6 P|W|D level=1 upper=W|A pool=0x8
read cpu1 0x40001000+0x0 width=8 cpl=0
map cpu0 root=current current 0x40001000 -> 0x7 P|W|A|D level=1 upper=W|A pool=0x8
map cpu0 root=current current 0x40008000 -> 0x7 P|W|A|D level=1 upper=W|A pool=0x8
"""
VA1, VA2 = 0x40001000, 0x40008000


def _spec(unsync: bool = True) -> ReferenceMachine:
    ex = Executor(parse_program(SPEC.format(unsync=" unsync" if unsync else "")))
    assert ex.run().divergence is None
    return ex.ref


def _reads(ref: ReferenceMachine, v: int, va: int, frame: int) -> bool:
    """Whether the reference accepts a read of ``va`` by vCPU ``v`` that lands in ``frame``."""
    model = Observation(ObsKind.RAM, frame << 12, ref.phys.backing.read(frame << 12, 8))
    return ref.access(v, va, AccessKind.READ, model)[0]


def test_a_translation_never_used_may_be_stale_until_invalidated() -> None:
    # cpu0 never read VA1; its gpte had A set (frame 5) before the remap to frame 7.
    assert _reads(_spec(), 0, VA1, 5)
    ref = _spec()
    ref.invlpg(0, VA1)
    assert not _reads(ref, 0, VA1, 5)  # INVLPG: only the current tables
    ref = _spec()
    ref.write_cr3(0, ref.cpus[0].cr3)
    assert not _reads(ref, 0, VA1, 5)  # a CR3 load flushes everything


def test_a_flush_on_one_vcpu_leaves_the_others_stale_translations_legal() -> None:
    ref = _spec()
    ref.invlpg(1, VA1)
    assert not _reads(ref, 1, VA1, 5)
    assert _reads(ref, 0, VA1, 5)


def test_a_speculative_translation_needs_the_accessed_flags_already_set() -> None:
    # VA2's leaf had A clear while it mapped frame 6: no speculative walk could have cached it
    # without setting A, and nothing did.
    assert not _reads(_spec(), 0, VA2, 6)
    assert _reads(_spec(), 0, VA2, 7)  # the current tables, always


def test_without_unsync_pages_a_translation_never_used_cannot_be_stale() -> None:
    ref = _spec(unsync=False)
    assert not _reads(ref, 0, VA1, 5)
    assert _reads(ref, 1, VA1, 5)  # cpu1 used it: an ordinary TLB entry


def test_an_access_that_does_not_read_the_walks_entries_leaves_it_optional() -> None:
    ref = _booted()
    assert _write(ref)
    other = 0xFFFFFF80C0000000  # the direct map: no entry of 0x40201000's walk on its way
    model = ref.expected(1, other, AccessKind.READ, width=1)
    assert ref.access(1, other, AccessKind.READ, model, width=1)[0]
    assert ref.forgo_optional_walk()
    assert not _leaf(ref) & PTE_D
