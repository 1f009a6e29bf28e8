"""Concurrency points (docs/model.md §4 fault path: is_page_fault_stale, mmu_invalidate_seq,
gpte_changed; §8 lockless MMIO): while vCPU 0 is inside KVM's fault handler, the host zaps
everything, migrates the faulting page, or vCPU 1 rewrites the gpte. The fault must be retried
and end with the right mapping, never one to a stale frame or through a stale gpte."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from guest import AD, LONG_PD, LONG_PT, PW, PWU, Guest, long_mode_guest, map4k, pa

from fuzzmmu.arch.bits import PTE_A
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.internal import Point
from fuzzmmu.model.x86 import Vcpu
from fuzzmmu.world.observe import AccessKind, ObsKind

DATA = 20
OTHER = 30


class OneShot:
    """A hook that runs ``action`` once, at the first ``point`` reached by vCPU ``v``, and
    records every point vCPU ``v`` passes."""

    def __init__(self, g: Guest, point: Point, action: Callable[[], None], v: int = 0) -> None:
        self.g = g
        self.point = point
        self.action = action
        self.v = v
        self.fired = False
        self.seen: list[Point] = []

    def __call__(self, point: Point, vcpu: Vcpu | None) -> None:
        if vcpu is None or vcpu.id != self.v:
            return
        self.seen.append(point)
        if point is self.point and not self.fired:
            self.fired = True
            self.action()

    def install(self) -> OneShot:
        self.g.kvm.hook = self
        return self


def _two_vcpus() -> tuple[Guest, int]:
    """Both vCPUs in the same 4-level paging; PT entry 1 -> DATA (not yet faulted in)."""
    g = long_mode_guest()
    long_mode_guest(v=1, guest=g)
    va = map4k(g, 0, 1, DATA, PW | AD)
    return g, va


POINTS = [Point.WALKED, Point.FAULTIN]


@pytest.mark.parametrize("point", POINTS)
def test_zap_all_during_fault_retries(point: Point):
    g, va = _two_vcpus()
    g.poke(pa(DATA), 0xDA7A)
    old_roots = g.roots(0)

    def act() -> None:
        g.expect_done(g.m.zap_all())

    hook = OneShot(g, point, act).install()
    obs = g.read(0, va)
    g.kvm.hook = None
    assert hook.fired
    g.ram(obs, pa(DATA))
    assert obs.value == 0xDA7A
    assert hook.seen.count(Point.WALKED) >= 2, "the fault must be retried"
    assert all(sp.invalid for sp in old_roots)
    new_roots = g.roots(0)
    assert new_roots and not any(g.kvm.is_obsolete_sp(sp) for sp in new_roots)
    assert S.spte_pfn(g.leaf(0, va)) == DATA
    # the old roots were freed once both vCPUs let go of them
    g.ram(g.read(1, va), pa(DATA))
    assert all(sp.root_count == 0 for sp in old_roots)
    assert all(sp.hpfn not in g.kvm.sp_by_hpfn for sp in old_roots)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("write", [False, True])
def test_migration_during_fault_never_maps_old_frame(point: Point, write: bool):
    g, va = _two_vcpus()
    g.poke(pa(DATA, 8), 0x01D)
    old_pfn = g.m.phys.gfn_to_pfn(0, DATA)

    def act() -> None:
        g.expect_done(g.m.migrate_page(0, DATA))

    hook = OneShot(g, point, act).install()
    obs = g.write(0, va + 8, 0x4E3) if write else g.read(0, va + 8)
    g.kvm.hook = None
    assert hook.fired
    new_pfn = g.m.phys.gfn_to_pfn(0, DATA)
    assert new_pfn != old_pfn
    assert obs.kind is ObsKind.RAM
    assert obs.addr == pa(new_pfn, 8), f"mapped the old frame: {obs}"
    spte = g.leaf(0, va)
    assert S.spte_pfn(spte) == new_pfn
    if write:
        assert g.peek(pa(DATA, 8)) == 0x4E3
        assert g.m.phys.backing.read(pa(old_pfn, 8), 8) == 0x01D
    else:
        assert obs.value == 0x01D
    if point is Point.FAULTIN:
        assert hook.seen.count(Point.FAULTIN) >= 2, "the stale pfn must be retried"


def test_migration_of_a_mapped_page_zaps_its_spte():
    g, va = _two_vcpus()
    g.ram(g.read(0, va), pa(DATA))
    g.ram(g.read(1, va), pa(DATA))
    old_pfn = g.m.phys.gfn_to_pfn(0, DATA)
    g.expect_done(g.migrate(0, DATA))
    assert not g.leaf(0, va) & S.SPTE_MMU_PRESENT
    for v in (0, 1):
        obs = g.write(v, va, 0x99 + v)
        g.ram(obs, pa(DATA))
        assert obs.addr != pa(old_pfn)


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("shadowed", [False, True])
def test_gpte_change_by_other_vcpu_during_fault(point: Point, shadowed: bool):
    """vCPU 1 stores a new gpte while vCPU 0 is between its walk and the shadow update. If the
    PT was not shadowed yet, vCPU 1's store goes straight through its own writable mapping,
    and only gpte_changed() after write-protecting the table catches it."""
    g, va = _two_vcpus()
    g.poke(pa(DATA), 0xD)
    g.poke(pa(OTHER), 0x0)
    if shadowed:
        other = map4k(g, 0, 2, DATA + 1, PW | AD)
        g.ram(g.read(0, other), pa(DATA + 1))  # PT 5 now shadowed and write-protected
    else:
        # vCPU 1 caches a writable translation of the PT frame through the direct map
        g.pte(1, LONG_PT, 100, 0)
        assert not g.sps(LONG_PT)
    new_gpte = pa(OTHER) | PW | AD

    def act() -> None:
        obs = g.m.access(1, g.dm(1, pa(LONG_PT, 8)), kind=AccessKind.WRITE, width=8, value=new_gpte)
        assert obs.kind is ObsKind.RAM, str(obs)

    hook = OneShot(g, point, act).install()
    obs = g.read(0, va)
    g.kvm.hook = None
    assert hook.fired
    assert g.peek(pa(LONG_PT, 8)) == new_gpte
    g.ram(obs, pa(OTHER))
    assert S.spte_pfn(g.leaf(0, va)) == OTHER, "a mapping through the old gpte was installed"
    assert hook.seen.count(Point.WALKED) >= 2
    # the PT is write-protected everywhere now
    assert g.writable_sptes(LONG_PT) == []


def test_zap_during_lockless_mmio_walk_retries():
    g, _va = _two_vcpus()
    va = map4k(g, 0, 3, 50, PW | AD)
    obs = g.read(0, va, width=4)
    assert obs.kind is ObsKind.MMIO
    g.invlpg(0, va)  # drop the vCPU's MMIO info cache: the next access walks the sptes

    def act() -> None:
        g.expect_done(g.m.zap_all())

    hook = OneShot(g, Point.MMIO_LOCKLESS, act).install()
    obs2 = g.read(0, va, width=4)
    g.kvm.hook = None
    assert hook.fired
    assert obs2 == obs


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("fresh_pd", [False, True])
def test_pde_change_by_other_vcpu_during_fault(point: Point, fresh_pd: bool):
    """The same race one level up: vCPU 1 redirects the PDE. With ``fresh_pd`` the PD (frame
    9, reached through PDPTE 1) has never been shadowed, so the store is not intercepted and
    only the re-check after creating the PD's shadow page sees it."""
    g, _va = _two_vcpus()
    pd = 9 if fresh_pd else LONG_PD
    if fresh_pd:
        g.pte(0, 3, 1, pa(pd) | PWU | PTE_A)  # PDPTE 1 -> PD 9
    g.pte(0, pd, 5, pa(6) | PWU | PTE_A)  # PDE 5 -> PT 6 -> DATA
    g.pte(0, 6, 1, pa(DATA) | PW | AD)
    g.pte(0, 7, 1, pa(OTHER) | PW | AD)  # PT 7 -> OTHER
    va = ((1 << 30) if fresh_pd else 0) | (5 << 21) | (1 << 12)
    if fresh_pd:
        g.pte(1, pd, 100, 0)  # vCPU 1 caches a writable translation of the PD frame
        assert not g.sps(pd)
    new_pde = pa(7) | PWU | PTE_A

    def act() -> None:
        obs = g.m.access(1, g.dm(1, pa(pd, 5 * 8)), AccessKind.WRITE, width=8, value=new_pde)
        assert obs.kind is ObsKind.RAM, str(obs)

    hook = OneShot(g, point, act).install()
    obs = g.read(0, va)
    g.kvm.hook = None
    assert hook.fired
    g.ram(obs, pa(OTHER))
    assert S.spte_pfn(g.leaf(0, va)) == OTHER
    assert [sp.gfn for sp, _i, _l in g.path(0, va)] == [2, 3, pd, 7]
    assert g.writable_sptes(pd) == []
