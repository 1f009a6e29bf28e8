"""The VMM's memslots: what KVM's per-gfn write tracking cannot follow is kept up to date."""

from __future__ import annotations

from fuzzmmu.world.layout import new_world
from fuzzmmu.world.memslots import Memslot, MemslotChange, MemslotUpdate


def test_the_default_world_has_no_aliases() -> None:
    _, slots, _ = new_world()
    assert slots.aliases == {} and slots.split == frozenset() and not slots.irregular


def test_a_moved_memslot_aliases_the_other_address_space() -> None:
    _, slots, _ = new_world()
    for upd in (MemslotUpdate(MemslotChange.DELETE, 0, 1),
                MemslotUpdate(MemslotChange.MOVE, 0, 0, base_gfn=0x20)):
        slots.install(*slots.check(upd))
    # AS0 gfn 0x24 and AS1 gfn 4 are host page 4; gfn 0x24 in AS1 is host page 0x24.
    assert slots.aliases[4] == (4, 0x24)
    assert 0x24 in slots.split and 4 not in slots.split  # AS0 gfn 4 is MMIO now
    assert slots.irregular
    copy = slots.copy()
    slots.install(*slots.check(MemslotUpdate(MemslotChange.MOVE, 0, 0, base_gfn=0)))
    assert not slots.irregular and copy.irregular  # the copy kept its own


def test_two_memslots_over_one_host_page() -> None:
    _, slots, _ = new_world()
    slots.install(None, Memslot(0, 2, 0x30, 1, 0))  # gfn 0x30 (the MMIO hole) = host page 0
    assert slots.aliases[0] == (0, 0x30)
    assert 0x30 in slots.split  # in SMM gfn 0x30 is SMRAM, another host page


def test_what_is_derived_follows_every_install_and_every_copy() -> None:
    """The alias sets are derived when first read: a copy taken before then, or an install
    after, must still see the tables' own."""
    _, slots, _ = new_world()
    moved = MemslotUpdate(MemslotChange.MOVE, 0, 0, base_gfn=0x20)
    slots.install(*slots.check(MemslotUpdate(MemslotChange.DELETE, 0, 1)))
    slots.install(*slots.check(moved))
    copy = slots.copy()  # nothing read yet
    assert copy.aliases[4] == (4, 0x24) and slots.aliases[4] == (4, 0x24)
    copy.install(*copy.check(MemslotUpdate(MemslotChange.MOVE, 0, 0, base_gfn=0)))
    assert not copy.irregular and copy.aliases == {} and slots.irregular


def test_a_copy_and_its_source_change_their_tables_apart() -> None:
    """A copy shares the tables until one side installs a memslot."""
    _, slots, _ = new_world()
    before = {(a, g): slots.lookup(a, g) for a in (0, 1) for g in range(0x40)}
    copy = slots.copy()
    copy.install(*copy.check(MemslotUpdate(MemslotChange.DELETE, 0, 1)))
    assert {(a, g): slots.lookup(a, g) for a in (0, 1) for g in range(0x40)} == before
    assert copy.lookup(0, 56) is None and slots.lookup(0, 56) is not None
    again = slots.copy()
    slots.install(*slots.check(MemslotUpdate(MemslotChange.DELETE, 1, 0)))
    assert again.lookup(1, 0) is not None and slots.lookup(1, 0) is None
    assert copy.lookup(1, 0) is not None
