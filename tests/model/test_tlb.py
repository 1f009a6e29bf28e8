"""The hardware TLB of two vCPUs (docs/model.md §5 TLB flush rules, §12 I9): write-protecting a
newly shadowed table must flush the other vCPU's TLB, else its cached writable translation lets
a store to the table bypass KVM and the shadow spte goes stale."""

from __future__ import annotations

from guest import AD, LONG_PD, PAGE_SHIFT, PW, PWU, Guest, long_mode_guest, pa

from fuzzmmu.arch.bits import PTE_A
from fuzzmmu.model.bugs import BugSet
from fuzzmmu.model.machine import Machine

TABLE = 7
DATA, OTHER = 20, 30


def _scenario(g: Guest) -> int:
    long_mode_guest(v=1, guest=g)
    # vCPU 1 writes frame TABLE (not a page table yet): a writable translation in its TLB
    dm = g.dm(1, pa(TABLE))
    g.ram(g.write(1, dm + 8, pa(DATA) | PW | AD), pa(TABLE, 8))
    assert (dm >> PAGE_SHIFT) in g.m.vcpus[1].tlb
    # vCPU 0 starts using the frame as a page table: PDE 1 -> TABLE, entry 1 -> DATA
    g.pte(0, LONG_PD, 1, pa(TABLE) | PWU | PTE_A)
    va = (1 << 21) | (1 << 12)
    g.ram(g.read(0, va), pa(DATA))
    # vCPU 1 rewrites entry 1 through what it believes is still a writable mapping
    g.ram(g.write(1, dm + 8, pa(OTHER) | PW | AD), pa(TABLE, 8))
    return va


def test_write_protection_flushes_other_vcpus_tlb():
    g = long_mode_guest()
    va = _scenario(g)
    assert g.sps(TABLE, level=1)
    assert g.writable_sptes(TABLE) == []
    # the store was intercepted and emulated: vCPU 0's spte for entry 1 is gone
    g.ram(g.read(0, va), pa(OTHER))


def test_write_protection_of_upper_level_table_flushes_other_vcpu():
    g = long_mode_guest()
    long_mode_guest(v=1, guest=g)
    table = 8
    dm = g.dm(1, pa(table))
    g.ram(g.write(1, dm, pa(9) | PWU | PTE_A), pa(table))  # will be PDPTE 0 of a new PDPT
    g.pte(0, 9, 0, pa(10) | PWU | PTE_A)  # PD 9 -> PT 10
    g.pte(0, 10, 0, pa(DATA) | PW | AD)
    g.pte(0, 2, 1, pa(table) | PWU | PTE_A)  # PML4E 1 -> PDPT in frame 8
    va = 1 << 39
    g.ram(g.read(0, va), pa(DATA))
    assert g.write_track(table) == 1
    g.ram(g.write(1, dm, 0), pa(table))  # vCPU 1 unmaps the whole 1 GiB
    g.pf(g.read(0, va), va, 0)


def test_scenario_detects_missing_remote_flush():
    """With the kvm-28 mutant (only the local TLB flushed), vCPU 1's store bypasses KVM and
    vCPU 0 keeps using the stale spte: the scenario above is sensitive to the bug."""
    bugs = BugSet(["no-remote-flush-on-permission-reduction"])
    g = long_mode_guest(guest=Guest(Machine(bugs=bugs), audit=False))
    va = _scenario(g)
    g.ram(g.read(0, va), pa(DATA))  # stale: the guest is owed OTHER
