"""A tiny guest "assembler" for the directed shadow-MMU scenarios: each scenario is a short
program of guest operations (control-register writes, loads, stores, fetches, INVLPG, SMI/RSM)
and VMM/host operations (memslots, migration, zaps) against :class:`Machine`, plus helpers
to look at the model's internals (shadow pages, sptes, write tracking).

Every operation that goes through :class:`Guest` is followed by :meth:`Guest.check`, which
runs the structural audit (``fuzzmmu.oracle.audit``) when that module exists.
"""

from __future__ import annotations

from collections.abc import Iterable

from fuzzmmu.arch.bits import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    CR4_PSE,
    EFER_LME,
    PAGE_SHIFT,
    PTE_A,
    PTE_D,
    PTE_P,
    PTE_U,
    PTE_W,
    PagingMode,
    paging_mode,
)
from fuzzmmu.model.machine import Machine
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.context import PAE_ROOT, shadow_walk
from fuzzmmu.model.mmu.internal import MmuConfig
from fuzzmmu.model.mmu.page import ShadowPage
from fuzzmmu.world.layout import DM_LINK, direct_map_va
from fuzzmmu.world.memslots import MemslotUpdate
from fuzzmmu.world.observe import AccessKind, Observation, ObsKind

try:  # the structural audit is being written concurrently; use it once it is there
    from fuzzmmu.oracle.audit import audit as _audit
except ImportError:  # pragma: no cover - depends on the state of the tree
    _audit = None

OFF, BIT32, PAE, LONG4 = PagingMode.OFF, PagingMode.BIT32, PagingMode.PAE, PagingMode.LONG4
PW = PTE_P | PTE_W
PWU = PTE_P | PTE_W | PTE_U
AD = PTE_A | PTE_D
AUDIT_AVAILABLE = _audit is not None

# Observations a correct KVM never produces for a well-formed guest.
BAD_KINDS = (ObsKind.HANG, ObsKind.VM_ERROR)


def pa(frame: int, offset: int = 0) -> int:
    return (frame << PAGE_SHIFT) + offset


class Guest:
    """Drives a :class:`Machine` like a small guest kernel would."""

    def __init__(self, machine: Machine | None = None, *, config: MmuConfig | None = None,
                 audit: bool = True) -> None:
        if machine is None:
            machine = Machine(config) if config is not None else Machine()
        self.m = machine
        self.kvm = machine.kvm
        self.audit = audit
        self.log: list[tuple[str, Observation]] = []

    # ------------------------------------------------------------------ checking

    def check(self, what: str = "") -> None:
        """After every step: the model's structural invariants hold (when the audit exists)."""
        if self.audit and _audit is not None:
            violations = _audit(self.m)
            assert not violations, f"audit after {what}: {violations}"

    def _done(self, what: str, obs: Observation) -> Observation:
        self.log.append((what, obs))
        self.check(what)
        return obs

    # ------------------------------------------------------------------ registers

    def mode(self, v: int) -> PagingMode:
        c = self.m.vcpus[v]
        return paging_mode(c.cr0, c.cr4, c.efer)

    def cr0(self, v: int, value: int) -> Observation:
        return self._done(f"cr0 v{v} {value:#x}", self.m.write_cr0(v, value))

    def cr3(self, v: int, value: int) -> Observation:
        return self._done(f"cr3 v{v} {value:#x}", self.m.write_cr3(v, value))

    def cr4(self, v: int, value: int) -> Observation:
        return self._done(f"cr4 v{v} {value:#x}", self.m.write_cr4(v, value))

    def efer(self, v: int, value: int) -> Observation:
        return self._done(f"efer v{v} {value:#x}", self.m.write_efer(v, value))

    def paging(self, v: int, mode: PagingMode, root_frame: int, *, pse: bool = False,
               wp: bool = True, cr4: int = 0, efer: int = 0, link: bool = True) -> None:
        """Turn paging on in ``mode`` with the root table in ``root_frame``: with paging still
        off, copy the kernel's direct-map link into the root by a guest store (what Linux's
        pgd_alloc() does), then the architectural sequence: CR3 and CR4 (and EFER.LME for
        4-level) first, CR0.PG last. ``cr4``/``efer`` add bits (SMEP, SMAP, NXE, ...)."""
        assert self.mode(v) is OFF, "paging() starts from paging off"
        if link:
            off, size, value = DM_LINK[mode]
            self.ok(self.write(v, pa(root_frame, off), value, width=size))
        self.expect_done(self.cr3(v, pa(root_frame)))
        cr4_value = cr4 | (CR4_PSE if pse else 0) | (CR4_PAE if mode >= PAE else 0)
        self.expect_done(self.cr4(v, cr4_value))
        self.expect_done(self.efer(v, efer | (EFER_LME if mode >= LONG4 else 0)))
        self.expect_done(self.cr0(v, CR0_PE | CR0_PG | (CR0_WP if wp else 0)))
        assert self.mode(v) is mode

    # ------------------------------------------------------------------ accesses

    def access(self, v: int, va: int, kind: AccessKind, *, cpl: int = 0, ac: bool = False,
               width: int = 8, value: int = 0) -> Observation:
        obs = self.m.access(v, va, kind, cpl=cpl, ac=ac, width=width, value=value)
        return self._done(f"{kind.value} v{v} {va:#x} cpl{cpl}", obs)

    def read(self, v: int, va: int, *, cpl: int = 0, ac: bool = False, width: int = 8
             ) -> Observation:
        return self.access(v, va, AccessKind.READ, cpl=cpl, ac=ac, width=width)

    def write(self, v: int, va: int, value: int = 0, *, cpl: int = 0, ac: bool = False,
              width: int = 8) -> Observation:
        return self.access(v, va, AccessKind.WRITE, cpl=cpl, ac=ac, width=width, value=value)

    def fetch(self, v: int, va: int, *, cpl: int = 0, width: int = 1) -> Observation:
        return self.access(v, va, AccessKind.FETCH, cpl=cpl, width=width)

    def dm(self, v: int, gpa: int) -> int:
        """The kernel's virtual address of ``gpa`` in vCPU ``v``'s current mode."""
        return direct_map_va(self.mode(v), gpa)

    def pte(self, v: int, table_frame: int, index: int, value: int, width: int | None = None,
            *, byte_offset: int = 0) -> Observation:
        """Store ``value`` into entry ``index`` of the guest table in ``table_frame`` through
        the direct map (identity with paging off), as a supervisor guest store."""
        mode = self.mode(v)
        esize = mode.entry_size if mode is not OFF else 8
        width = esize if width is None else width
        gpa = pa(table_frame, index * esize + byte_offset)
        return self.ok(self.write(v, self.dm(v, gpa), value, width=width))

    def peek(self, gpa: int, width: int = 8, as_id: int = 0) -> int:
        """Guest memory as the VMM sees it (no guest access, no side effects)."""
        value = self.m.phys.read(as_id, gpa, width)
        assert value is not None, f"gpa {gpa:#x} is not RAM in address space {as_id}"
        return value

    def poke(self, gpa: int, value: int, width: int = 8, as_id: int = 0) -> None:
        """The VMM writes guest memory behind KVM's back (test setup only)."""
        assert self.m.phys.write(as_id, gpa, width, value)

    def invlpg(self, v: int, va: int) -> Observation:
        return self._done(f"invlpg v{v} {va:#x}", self.m.invlpg(v, va))

    def smi(self, v: int) -> Observation:
        return self._done(f"smi v{v}", self.m.smi(v))

    def rsm(self, v: int) -> Observation:
        return self._done(f"rsm v{v}", self.m.rsm(v))

    # ------------------------------------------------------------------ VMM / host

    def set_memslot(self, upd: MemslotUpdate) -> Observation:
        return self._done(f"memslot {upd}", self.m.set_memslot(upd))

    def migrate(self, as_id: int, gfn: int) -> Observation:
        return self._done(f"migrate {as_id}:{gfn:#x}", self.m.migrate_page(as_id, gfn))

    def zap_all(self) -> Observation:
        return self._done("zap_all", self.m.zap_all())

    def shrink(self, n: int) -> Observation:
        return self._done(f"shrink {n}", self.m.shrink(n))

    def set_max_pages(self, n: int) -> Observation:
        return self._done(f"max_pages {n}", self.m.set_max_pages(n))

    # ------------------------------------------------------------------ expectations

    @staticmethod
    def ok(obs: Observation) -> Observation:
        assert obs.kind is ObsKind.RAM, str(obs)
        return obs

    @staticmethod
    def expect_done(obs: Observation) -> Observation:
        assert obs.kind is ObsKind.DONE, str(obs)
        return obs

    def ram(self, obs: Observation, gpa: int, as_id: int = 0) -> None:
        """``obs`` is a RAM access at guest-physical ``gpa`` (through the current host map)."""
        assert obs.kind is ObsKind.RAM, str(obs)
        pfn = self.m.phys.gfn_to_pfn(as_id, gpa >> PAGE_SHIFT)
        assert obs.addr == (pfn << PAGE_SHIFT) | (gpa & 0xFFF), (
            f"{obs} is not gpa {gpa:#x} (hpa {(pfn << PAGE_SHIFT) | (gpa & 0xFFF):#x})")

    @staticmethod
    def pf(obs: Observation, addr: int, error_code: int) -> None:
        assert obs.kind is ObsKind.PF, str(obs)
        assert obs.addr == addr, str(obs)
        assert obs.error_code == error_code, str(obs)

    # ------------------------------------------------------------------ model internals

    def sps(self, gfn: int | None = None, *, level: int | None = None,
            direct: bool | None = None, smm: int | None = None, valid: bool = True
            ) -> list[ShadowPage]:
        """Shadow pages still in the hash (valid = not obsolete)."""
        pages: Iterable[ShadowPage]
        if gfn is None:
            pages = [sp for bucket in self.kvm.page_hash.values() for sp in bucket]
        else:
            pages = self.kvm.page_hash.get(gfn, [])
        out = []
        for sp in pages:
            if valid and self.kvm.is_obsolete_sp(sp):
                continue
            if level is not None and sp.level != level:
                continue
            if direct is not None and sp.direct != direct:
                continue
            if smm is not None and sp.smm != smm:
                continue
            out.append(sp)
        return sorted(out, key=lambda sp: sp.hpfn)

    def path(self, v: int, va: int) -> list[tuple[ShadowPage, int, int]]:
        """The shadow walk of ``va`` in vCPU ``v``'s current root: (sp, index, level)."""
        return shadow_walk(self.kvm, self.m.vcpus[v], va)

    def leaf(self, v: int, va: int) -> int:
        """The last spte on the shadow walk of ``va`` (0 when nothing is there)."""
        p = self.path(v, va)
        if not p:
            return 0
        sp, i, _level = p[-1]
        return sp.sptv[i]

    def leaf_sp(self, v: int, va: int) -> ShadowPage:
        p = self.path(v, va)
        assert p, f"no shadow path for {va:#x}"
        return p[-1][0]

    def write_track(self, gfn: int, as_id: int = 0) -> int:
        slot = self.m.phys.slots.lookup(as_id, gfn)
        assert slot is not None
        return self.kvm.slot_arch[slot].write_track.get(gfn, 0)

    def writable_sptes(self, gfn: int) -> list[int]:
        """Present sptes (any address space) that map ``gfn`` writable."""
        out = []
        for slot, arch in self.kvm.slot_arch.items():
            if not slot.contains(gfn):
                continue
            for sp, i in arch.rmap.get(gfn, ()):
                if sp.sptv[i] & (S.SPTE_W | S.SPTE_MMU_WRITABLE):
                    out.append(sp.sptv[i])
        return out

    def roots(self, v: int) -> list[ShadowPage]:
        mmu = self.m.vcpus[v].mmu
        if mmu.root_hpa == PAE_ROOT:
            hpas = [e & S.SPTE_BASE_ADDR_MASK for e in mmu.pae_root if e]
        elif mmu.root_hpa >= 0:
            hpas = [mmu.root_hpa]
        else:
            hpas = []
        out = []
        for hpa in hpas:
            sp = self.kvm.root_to_sp(hpa)
            assert sp is not None
            out.append(sp)
        return out


# ---------------------------------------------------------------------- standard layouts

LONG_ROOT, LONG_PDPT, LONG_PD, LONG_PT = 2, 3, 4, 5


def long_mode_guest(machine: Machine | None = None, *, v: int = 0, upper: int = PWU | PTE_A,
                    config: MmuConfig | None = None, cr4: int = 0, efer: int = 0,
                    wp: bool = True, guest: Guest | None = None) -> Guest:
    """vCPU ``v`` in 4-level paging, root in frame 2: PML4E 0 -> PDPT 3, PDPTE 0 -> PD 4,
    PDE 0 -> PT 5, upper entries with flags ``upper``. Entry i of PT 5 maps VA ``i << 12``
    (use :func:`map4k`)."""
    g = guest if guest is not None else Guest(machine, config=config)
    g.paging(v, LONG4, LONG_ROOT, cr4=cr4, efer=efer, wp=wp)
    g.pte(v, LONG_ROOT, 0, pa(LONG_PDPT) | upper)
    g.pte(v, LONG_PDPT, 0, pa(LONG_PD) | upper)
    g.pte(v, LONG_PD, 0, pa(LONG_PT) | upper)
    return g


def map4k(g: Guest, v: int, index: int, frame: int, flags: int) -> int:
    """Entry ``index`` of the standard PT (frame 5) -> ``frame``; returns the VA it maps."""
    g.pte(v, LONG_PT, index, pa(frame) | flags)
    return index << PAGE_SHIFT
