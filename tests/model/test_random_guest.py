"""A small random guest: seeded sequences of guest and host operations over the fixed world
(page tables in a handful of frames, the direct map, the MMIO hole, SMM, memslot churn, page
migration, zaps and page limits). Whatever the guest does, a correct KVM neither crashes nor
livelocks nor fails KVM_RUN: the model must never raise, never report HANG or VM_ERROR, and
(when the audit exists) keep its structural invariants after every step."""

from __future__ import annotations

import random

import pytest
from guest import BAD_KINDS, BIT32, LONG4, OFF, PAE, Guest, pa

from fuzzmmu.arch.bits import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LME,
    EFER_NXE,
    PTE_A,
    PTE_D,
    PTE_NX,
    PTE_P,
    PTE_PS,
    PTE_U,
    PTE_W,
    PagingMode,
)
from fuzzmmu.model.machine import Machine
from fuzzmmu.model.mmu.internal import MmuConfig, Point
from fuzzmmu.model.x86 import Vcpu
from fuzzmmu.world.layout import DM_LINK, direct_map_va
from fuzzmmu.world.memslots import MemslotChange, MemslotUpdate
from fuzzmmu.world.observe import DONE, AccessKind, Observation

TABLES = [2, 3, 4, 5, 6, 7, 8, 9]
DATA = [20, 21, 22, 23, 3, 5, 50, 56, 100]  # includes tables, the MMIO hole, no-slot gfns
INDICES = [0, 1, 2, 3, 511, 257, 768]
FLAG_BITS = [PTE_P, PTE_W, PTE_U, PTE_A, PTE_D, PTE_PS, PTE_NX]
FLAG_P = [0.9, 0.7, 0.6, 0.5, 0.5, 0.15, 0.1]
MODES = [OFF, BIT32, PAE, LONG4]


class RandomGuest:
    """A seeded random guest on a fresh machine; ``step()`` runs one random operation."""

    def __init__(self, seed: int, config: MmuConfig) -> None:
        self.r = random.Random(seed)
        self.g = Guest(Machine(config))
        self.m = self.g.m
        self.steps: list[str] = []

    # ------------------------------------------------------------------ values

    def entry(self) -> int:
        r = self.r
        if r.random() < 0.08:
            return 0
        frame = r.choice(TABLES if r.random() < 0.5 else DATA)
        flags = sum(b for b, p in zip(FLAG_BITS, FLAG_P, strict=True) if r.random() < p)
        return pa(frame) | flags

    def va(self, v: int) -> int:
        r = self.r
        mode = self.g.mode(v)
        if r.random() < 0.25:
            return direct_map_va(mode, pa(r.choice(TABLES + DATA[:4])))
        idx = [r.choice([0, 1, 2, 3]) for _ in range(4)]
        va = (idx[0] << 39) | (idx[1] << 30) | (idx[2] << 21) | (idx[3] << 12)
        return va | r.randrange(0, 4096, 8)

    # ------------------------------------------------------------------ operations

    def op_access(self, v: int) -> Observation:
        r = self.r
        kind = r.choice([AccessKind.READ, AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH])
        width = r.choice([1, 2, 4, 8])
        va = self.va(v) & ~7
        return self.m.access(v, va, kind, cpl=r.choice([0, 0, 3]), ac=r.random() < 0.2,
                             width=width, value=r.getrandbits(8 * width))

    def op_pte(self, v: int) -> Observation:
        r = self.r
        mode = self.g.mode(v)
        esize = mode.entry_size if mode is not OFF else 8
        frame = r.choice(TABLES)
        index = r.choice(INDICES) % (4096 // esize)
        gpa = pa(frame, index * esize)
        width, value = esize, self.entry()
        if r.random() < 0.15:  # partial or misaligned stores
            width = r.choice([1, 2, 4, 8])
            gpa += r.choice([0, 0, 2, 4, 6]) if width > 1 else 0
            gpa = min(gpa, pa(frame, 4096 - width))
        value &= (1 << (8 * width)) - 1
        return self.m.access(v, direct_map_va(mode, gpa), AccessKind.WRITE, width=width,
                             value=value)

    def op_mode(self, v: int) -> Observation:
        """Leave paging, then enter a random mode with a random root the way a kernel does."""
        r = self.r
        m = self.m
        mode: PagingMode = r.choice(MODES)
        root = r.choice(TABLES)
        cr0 = m.regs(v)[0]
        obs = m.write_cr0(v, cr0 & ~CR0_PG | CR0_PE)
        if mode is OFF:
            return obs
        if r.random() < 0.8:
            off, size, value = DM_LINK[mode]
            m.access(v, pa(root, off), AccessKind.WRITE, width=size, value=value)
        m.write_cr3(v, pa(root))
        cr4 = (CR4_PAE if mode >= PAE else 0) | (CR4_PSE if r.random() < 0.5 else 0)
        cr4 |= (CR4_SMEP if r.random() < 0.2 else 0) | (CR4_SMAP if r.random() < 0.2 else 0)
        m.write_cr4(v, cr4)
        m.write_efer(v, (EFER_LME if mode >= LONG4 else 0) | (EFER_NXE if r.random() < 0.5
                                                              else 0))
        wp = CR0_WP if r.random() < 0.7 else 0
        return m.write_cr0(v, CR0_PE | CR0_PG | wp)

    def op_toggle(self, v: int) -> Observation:
        r = self.r
        m = self.m
        cr0, cr3, cr4, efer, _smm = m.regs(v)
        which = r.randrange(6)
        if which == 0:
            return m.write_cr0(v, cr0 ^ CR0_WP)
        if which == 1:
            return m.write_cr4(v, cr4 ^ r.choice([CR4_SMEP, CR4_SMAP, CR4_PSE]))
        if which == 2:
            return m.write_efer(v, efer ^ EFER_NXE)
        if which == 3:
            return m.write_cr3(v, cr3 if r.random() < 0.5 else pa(r.choice(TABLES)))
        if which == 4:
            return m.invlpg(v, self.va(v))
        return m.smi(v) if r.random() < 0.5 else m.rsm(v)

    def op_host(self) -> Observation:
        r = self.r
        m = self.m
        which = r.randrange(6)
        if which == 0:
            slots = m.phys.slots.spaces[0]
            if 2 in slots:
                if r.random() < 0.5:
                    return m.set_memslot(MemslotUpdate(MemslotChange.DELETE, 0, 2))
                base = r.choice([48, 100])  # a move to the same base is a no-op
                return m.set_memslot(MemslotUpdate(MemslotChange.MOVE, 0, 2, base))
            return m.set_memslot(MemslotUpdate(MemslotChange.CREATE, 0, 2, r.choice([48, 100]),
                                               2, 64))
        if which == 1:
            return m.migrate_page(r.randrange(2), r.choice(TABLES + DATA))
        if which == 2:
            return m.zap_all()
        if which == 3:
            return m.shrink(r.randrange(1, 20))
        if which == 4:
            return m.set_max_pages(r.choice([16, 24, 64, 2000]))
        # a new slot far away: only moves the generation (MMIO sptes go stale)
        sid = 3 + r.randrange(3)
        if sid in m.phys.slots.spaces[1]:
            return m.set_memslot(MemslotUpdate(MemslotChange.DELETE, 1, sid))
        return m.set_memslot(MemslotUpdate(MemslotChange.CREATE, 1, sid, 200 + sid, 1, 71))

    def op_interleaved(self, v: int) -> Observation:
        """An access by vCPU ``v`` during which, once, at a random concurrency point, the
        host or the other vCPU acts: a store or access by the other vCPU, a zap, the shrinker,
        a page migration. Not a memslot update: it waits for the SRCU readers of the fault
        path (synchronize_srcu), so it cannot land inside a fault."""
        r = self.r
        m = self.m
        where = r.choice([Point.WALKED, Point.FAULTIN, Point.MMIO_LOCKLESS, Point.EMULATE])
        other = 1 - v
        actions = [
            lambda: self.op_pte(other),
            lambda: self.op_access(other),
            lambda: m.zap_all(),
            lambda: m.migrate_page(r.randrange(2), r.choice(TABLES + DATA)),
            lambda: m.shrink(r.randrange(1, 20)),
            lambda: m.set_max_pages(r.choice([16, 24, 2000])),
        ]
        action = r.choice(actions)
        fired: list[Observation] = []

        def hook(point: Point, vcpu: Vcpu | None) -> None:
            if not fired and point is where and vcpu is m.vcpus[v]:
                fired.append(DONE)
                fired[0] = action()

        m.kvm.hook = hook
        try:
            obs = self.op_pte(v) if r.random() < 0.4 else self.op_access(v)
        finally:
            m.kvm.hook = None
        if fired:
            self.steps.append(f"  interleaved at {where.value}: {fired[0]}")
            assert fired[0].kind not in BAD_KINDS, self.history()
        return obs

    def step(self) -> None:
        r = self.r
        v = r.randrange(2)
        x = r.random()
        if x < 0.1:
            name, obs = "interleaved", self.op_interleaved(v)
        elif x < 0.45:
            name, obs = "access", self.op_access(v)
        elif x < 0.75:
            name, obs = "pte", self.op_pte(v)
        elif x < 0.83:
            name, obs = "mode", self.op_mode(v)
        elif x < 0.95:
            name, obs = "toggle", self.op_toggle(v)
        else:
            name, obs = "host", self.op_host()
        self.steps.append(f"{name} v{v}: {obs}")
        assert obs.kind not in BAD_KINDS, self.history()
        self.g.check(name)

    def history(self) -> str:
        return "\n".join(self.steps[-25:])


STEPS = 1000
CONFIGS = [
    MmuConfig(),
    MmuConfig(mmio_gen_bits=3, n_max_mmu_pages=24),
    MmuConfig(maxphyaddr=52),
]


@pytest.mark.parametrize("seed", range(6))
def test_random_guest_never_hangs_or_fails(seed: int):
    rg = RandomGuest(seed, CONFIGS[seed % len(CONFIGS)])
    # start both vCPUs in some paging mode
    for v in (0, 1):
        rg.g.paging(v, [BIT32, PAE, LONG4][(seed + v) % 3], TABLES[v])
    for _ in range(STEPS):
        try:
            rg.step()
        except AssertionError:
            raise
        except Exception as exc:  # the model must not crash
            raise AssertionError(f"{type(exc).__name__}: {exc}\n{rg.history()}") from exc
