"""MMIO sptes (docs/model.md §8): an access to a gfn without a memslot leaves an MMIO spte carrying
the memslot generation; a stale generation sends the next access down the slow path (which finds
RAM after a memslot change); MAXPHYADDR 52 disables MMIO caching; a wrap of the stored
generation bits zaps every shadow page."""

from __future__ import annotations

from guest import AD, PW, Guest, long_mode_guest, map4k, pa

from fuzzmmu.arch.bits import PFERR_P, PFERR_W, PTE_P
from fuzzmmu.model.machine import Machine
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.internal import MmuConfig
from fuzzmmu.model.mmu.trace import Event
from fuzzmmu.world.memslots import MemslotChange, MemslotUpdate
from fuzzmmu.world.observe import ObsKind, mmio_read_value

HOLE = 50  # a gfn in the MMIO hole of address space 0
HOLE_HVA = 64  # host pages 64..71 back SMRAM; reused here to fill the hole with RAM


def _mmio(obs, gpa: int, width: int = 4) -> None:
    assert obs.kind is ObsKind.MMIO, str(obs)
    assert obs.addr == gpa, str(obs)
    assert obs.value == mmio_read_value(gpa, width)


def test_mmio_spte_carries_the_generation():
    g = long_mode_guest()
    va = map4k(g, 0, 1, HOLE, PW | AD)
    _mmio(g.read(0, va + 8, width=4), pa(HOLE, 8))
    spte = g.leaf(0, va)
    assert S.is_mmio_spte(spte)
    assert not spte & S.SPTE_MMU_PRESENT
    assert S.get_mmio_spte_gfn(spte) == HOLE
    assert S.get_mmio_spte_generation(spte) == g.m.phys.slots.generation[0]
    # no rmap entry for an MMIO spte
    assert all(HOLE not in arch.rmap for arch in g.kvm.slot_arch.values())
    # the next access (fast path) and a write
    _mmio(g.read(0, va + 8, width=4), pa(HOLE, 8))
    obs = g.write(0, va + 16, 0xABCD, width=2)
    assert obs.kind is ObsKind.MMIO and obs.addr == pa(HOLE, 16) and obs.value == 0xABCD
    # from the other vCPU, without its MMIO info cache
    long_mode_guest(v=1, guest=g)
    _mmio(g.read(1, va + 8, width=4), pa(HOLE, 8))


def test_stale_generation_takes_slow_path_and_finds_ram():
    g = long_mode_guest()
    va = map4k(g, 0, 1, HOLE, PW | AD)
    _mmio(g.read(0, va, width=4), pa(HOLE))
    old = g.leaf(0, va)
    gen0 = g.m.phys.slots.generation[0]
    g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.CREATE, 0, 2, 48, 8, HOLE_HVA)))
    assert g.m.phys.slots.generation[0] != gen0
    # a CREATE zaps nothing: the stale MMIO spte is still there
    assert g.leaf(0, va) == old
    g.poke(pa(HOLE), 0x5A5A)
    obs = g.read(0, va)
    g.ram(obs, pa(HOLE))
    assert obs.addr == pa(HOLE_HVA + HOLE - 48)
    assert obs.value == 0x5A5A
    spte = g.leaf(0, va)
    assert spte & S.SPTE_MMU_PRESENT and S.spte_pfn(spte) == HOLE_HVA + HOLE - 48


def test_stale_mmio_spte_refreshed_when_still_mmio():
    g = long_mode_guest()
    va = map4k(g, 0, 1, HOLE, PW | AD)
    _mmio(g.read(0, va, width=4), pa(HOLE))
    # an unrelated slot appears elsewhere: the generation moves, the gfn is still MMIO
    g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.CREATE, 0, 2, 100, 1, 70)))
    _mmio(g.read(0, va, width=4), pa(HOLE))
    spte = g.leaf(0, va)
    assert S.is_mmio_spte(spte)
    assert S.get_mmio_spte_generation(spte) == g.m.phys.slots.generation[0]


def test_maxphyaddr_52_creates_no_mmio_spte():
    g = long_mode_guest(config=MmuConfig(maxphyaddr=52))
    va = map4k(g, 0, 1, HOLE, PW | AD)
    for _ in range(2):
        _mmio(g.read(0, va + 8, width=4), pa(HOLE, 8))
        spte = g.leaf(0, va)
        assert not S.is_mmio_spte(spte)
        assert not spte & S.SPTE_MMU_PRESENT
    obs = g.write(0, va, 1, width=1)
    assert obs.kind is ObsKind.MMIO and obs.addr == pa(HOLE)
    # and RAM still works
    g.ram(g.read(0, map4k(g, 0, 2, 20, PW | AD)), pa(20))


def test_mmio_generation_wrap_zaps_all_pages():
    events: list[Event] = []
    m = Machine(MmuConfig(mmio_gen_bits=3), trace=events.append)
    g = long_mode_guest(m)
    va = map4k(g, 0, 1, HOLE, PW | AD)
    data = map4k(g, 0, 2, 20, PW | AD)
    _mmio(g.read(0, va, width=4), pa(HOLE))  # MMIO spte with generation 0
    g.ram(g.read(0, data), pa(20))
    assert S.get_mmio_spte_generation(g.leaf(0, va)) == 0
    # the hole becomes RAM (generation 2): the spte is stale but stays
    g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.CREATE, 0, 2, 48, 8, HOLE_HVA)))
    pages_before = g.sps()
    assert pages_before
    # new unrelated slots (CREATE zaps nothing by itself) until the 3 stored generation bits
    # wrap: generation 8 & 7 == 0
    for slot_id, gfn in ((3, 100), (4, 101), (5, 102)):
        assert not any(e.name == "mmio_gen_wrap" for e in events)
        assert not any(g.kvm.is_obsolete_sp(sp) for sp in pages_before)
        g.expect_done(g.set_memslot(MemslotUpdate(MemslotChange.CREATE, 0, slot_id, gfn, 1, 71)))
    assert g.m.phys.slots.generation[0] == 8
    assert any(e.name == "mmio_gen_wrap" for e in events)
    assert all(g.kvm.is_obsolete_sp(sp) for sp in pages_before), "wrap must zap every page"
    assert g.sps() == []
    # the generation-0 MMIO spte is gone, so it cannot match generation 8: RAM is seen
    g.poke(pa(HOLE), 0x77)
    obs = g.read(0, va)
    g.ram(obs, pa(HOLE))
    assert obs.value == 0x77
    g.ram(g.read(0, data), pa(20))


def test_generation_wrap_with_smm_address_space_updates():
    """Updates of address space 1 wrap too (the space bit is stripped before the check)."""
    events: list[Event] = []
    g = Guest(Machine(MmuConfig(mmio_gen_bits=3), trace=events.append))
    g.ok(g.read(0, pa(5)))
    pages_before = g.sps()
    for slot_id in range(3, 7):  # generations 3, 5, 7, 9: the last one wraps
        assert not any(g.kvm.is_obsolete_sp(sp) for sp in pages_before)
        upd = MemslotUpdate(MemslotChange.CREATE, 1, slot_id, 100 + slot_id, 1, 71)
        g.expect_done(g.set_memslot(upd))
    assert g.m.phys.slots.generation[1] == 9
    assert any(e.name == "mmio_gen_wrap" for e in events)
    assert all(g.kvm.is_obsolete_sp(sp) for sp in pages_before)
    g.ok(g.read(0, pa(5)))


def test_emulated_page_fault_clears_the_mmio_cache_of_its_address():
    """kvm_inject_emulated_page_fault(): a present, non-reserved #PF from the emulator
    invalidates the address, MMIO gva cache included. Without it (a clean campaign found this)
    a later access there, once remapped, took the stale cached gfn."""
    g = long_mode_guest()
    long_mode_guest(v=1, guest=g)
    va = map4k(g, 0, 1, HOLE, PTE_P | AD)  # read-only MMIO
    _mmio(g.read(1, va, width=4), pa(HOLE))
    vcpu = g.m.vcpus[1]
    assert vcpu.mmio_gva == va
    # the write takes the MMIO spte, is emulated, and faults in the emulator's walk
    g.pf(g.write(1, va, 1, width=4), va, PFERR_P | PFERR_W)
    assert vcpu.mmio_gva == 0


def test_every_cr3_write_forgets_the_mmio_cache():
    """kvm_invalidate_pcid() makes KVM_REQ_MMU_SYNC, and kvm_mmu_sync_roots() drops the MMIO
    gva cache, even for a MOV to CR3 of the value it holds (a benchmark run on the clean model
    found the model keeping it). vCPU 1 then remaps the VA to another MMIO gfn; vCPU 0's next
    access there must go to the new gfn, not the cached one."""
    g = long_mode_guest()
    long_mode_guest(v=1, guest=g)
    va = map4k(g, 0, 1, HOLE, PTE_P | AD)
    _mmio(g.read(0, va, width=4), pa(HOLE))
    assert g.m.vcpus[0].mmio_gva == va
    g.expect_done(g.cr3(0, g.m.vcpus[0].cr3))
    map4k(g, 1, 1, HOLE + 1, PTE_P | AD)  # no INVLPG needed: vCPU 0's CR3 write came first
    _mmio(g.read(1, va, width=4), pa(HOLE + 1))
    _mmio(g.read(0, va, width=4), pa(HOLE + 1))


def test_a_new_root_forgets_the_mmio_cache():
    """kvm_mmu_load() syncs the new roots, which drops the MMIO gva cache: a MOV to CR3 that
    does not reuse a cached root leaves no stale MMIO translation behind."""
    g = long_mode_guest()
    va = map4k(g, 0, 1, HOLE, PTE_P | AD)
    _mmio(g.read(0, va, width=4), pa(HOLE))
    vcpu = g.m.vcpus[0]
    g.expect_done(g.cr3(0, vcpu.cr3 + pa(1)))  # a fresh root page, not in the root cache
    vcpu.service_requests()
    assert vcpu.mmu.root_valid and vcpu.mmio_gva == 0
