"""Guest page tables and a step driver for the audit tests.

The tables are laid out in guest frames 1-15 of the fixed world (fuzzmmu/machine/layout.py) and
written by the guest itself: in real mode with identity stores, later through the kernel's
direct map (``DM_LINK``), so that every store to a shadowed table is intercepted and emulated
the way KVM sees it. ``Driver`` runs one machine operation at a time and audits after each.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuzzmmu.arch.bits import (
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    CR4_PSE,
    EFER_LME,
    EFER_NXE,
    PTE_A,
    PTE_D,
    PTE_P,
    PTE_PS,
    PTE_U,
    PTE_W,
    PagingMode,
)
from fuzzmmu.model.machine import Machine
from fuzzmmu.oracle.audit import AuditViolation, audit, format_violations
from fuzzmmu.world.layout import DM_LINK, direct_map_va
from fuzzmmu.world.observe import AccessKind, Observation, ObsKind

R, W, X = AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH
PWUA = PTE_P | PTE_W | PTE_U | PTE_A
LEAF = PWUA | PTE_D

# 4-level: PML4 1 (and 5, a second address space sharing the PDPT), PDPT 2, PD 3, PT 4.
PML4, PML4_B, PDPT, PD, PT = 1, 5, 2, 3, 4
# PAE: PDPT 6 (PDPTE 0 -> PD 7, PDPTE 3 -> kernel), PT 8.
PAE_PDPT, PAE_PD, PAE_PT = 6, 7, 8
# 32-bit: PD 9 (PDE 1 -> PT 10, PDE 768 -> kernel), PT 10 (4-byte entries, both quadrants).
PD32, PT32 = 9, 10
DATA = 16  # user data frames 16..31
MMIO_GFN = 48  # in the MMIO hole of address space 0, SMRAM in address space 1

USER = 0x400000  # PT covering 0x400000-0x5FFFFF (4-level, PAE) / 0x400000-0x7FFFFF (32-bit)
BIG = 0x600000  # PAE: 2 MiB page at gpa 0; 32-bit: PSE 4 MiB page at gpa 0 (VA 0x800000)
BIG32 = 0x800000


def user_va(k: int) -> int:
    return USER + k * 0x1000


@dataclass
class Driver:
    """Runs machine operations and audits the state after every one of them."""

    m: Machine
    log: list[str]

    def __init__(self, machine: Machine | None = None) -> None:
        self.m = machine if machine is not None else Machine()
        self.log = []

    def check(self, what: str) -> None:
        violations = audit(self.m)
        assert not violations, (f"after step {len(self.log)} ({what}):\n"
                                + format_violations(violations)
                                + "\nsteps:\n" + "\n".join(self.log))

    def do(self, op: str, *args: object, **kw: object) -> Observation:
        obs = getattr(self.m, op)(*args, **kw)
        what = f"{op}{args}{kw or ''} -> {obs}"
        self.log.append(what)
        self.check(what)
        return obs

    def acc(self, v: int, gva: int, kind: AccessKind = R, **kw: object) -> Observation:
        return self.do("access", v, gva, kind, **kw)

    def store(self, v: int, gva: int, value: int, width: int = 8, **kw: object) -> Observation:
        obs = self.do("access", v, gva, W, value=value, width=width, **kw)
        assert obs.kind is ObsKind.RAM, obs
        return obs

    def violations(self) -> list[AuditViolation]:
        return audit(self.m)


# ---------------------------------------------------------------------- table contents


def long4_entries() -> list[tuple[int, int, int]]:
    """(gpa, size, value) of the 4-level tables."""
    out = [
        (PML4 << 12, 8, (PDPT << 12) | PWUA),
        (PML4_B << 12, 8, (PDPT << 12) | PTE_P | PTE_W | PTE_A),  # supervisor-only view
        (PDPT << 12, 8, (PD << 12) | PWUA),
        ((PD << 12) + 2 * 8, 8, (PT << 12) | PWUA),
    ]
    for root in (PML4, PML4_B):
        off, size, value = DM_LINK[PagingMode.LONG4]
        out.append(((root << 12) + off, size, value))
    out += _pt_entries(PT, 8)
    return out


def pae_entries() -> list[tuple[int, int, int]]:
    off, size, value = DM_LINK[PagingMode.PAE]
    out = [
        (PAE_PDPT << 12, 8, (PAE_PD << 12) | PTE_P),
        ((PAE_PDPT << 12) + off, size, value),
        ((PAE_PD << 12) + 2 * 8, 8, (PAE_PT << 12) | PWUA),
        ((PAE_PD << 12) + 3 * 8, 8, PTE_PS | PWUA),  # 2 MiB page at gpa 0, clean
    ]
    out += _pt_entries(PAE_PT, 8)
    return out


def bit32_entries() -> list[tuple[int, int, int]]:
    off, size, value = DM_LINK[PagingMode.BIT32]
    out = [
        ((PD32 << 12) + off, size, value),
        ((PD32 << 12) + 1 * 4, 4, (PT32 << 12) | PWUA),
        ((PD32 << 12) + 2 * 4, 4, PTE_PS | PWUA | PTE_D),  # 4 MiB page at gpa 0
    ]
    out += _pt_entries(PT32, 4)
    # the second quadrant of the 32-bit PT: VA 0x600000 + k*4K -> DATA + 8 + k
    out += [((PT32 << 12) + (512 + k) * 4, 4, ((DATA + 8 + k) << 12) | LEAF) for k in range(4)]
    return out


def _pt_entries(pt: int, size: int) -> list[tuple[int, int, int]]:
    """PT slots: 0-7 user data (2/3 clean, 4 read-only, 5 supervisor, 6 NX in 8-byte tables);
    8 the MMIO gfn; 9 the PT itself (writable: stores to it are emulated); 10 SMRAM gfn 49."""
    nx = (1 << 63) if size == 8 else 0
    out = []
    for k in range(8):
        value = ((DATA + k) << 12) | LEAF
        if k in (2, 3):
            value &= ~PTE_D
        if k == 4:
            value &= ~PTE_W
        if k == 5:
            value &= ~PTE_U
        if k == 6:
            value |= nx
        out.append(((pt << 12) + k * size, size, value))
    out.append(((pt << 12) + 8 * size, size, (MMIO_GFN << 12) | LEAF))
    out.append(((pt << 12) + 9 * size, size, (pt << 12) | LEAF))
    out.append(((pt << 12) + 10 * size, size, ((MMIO_GFN + 1) << 12) | LEAF))
    return out


# ---------------------------------------------------------------------- mode switches


def write_tables(d: Driver, v: int, entries: list[tuple[int, int, int]],
                 mode: PagingMode = PagingMode.OFF) -> None:
    """Guest stores of table entries, through the direct map of ``mode``."""
    for gpa, size, value in entries:
        d.store(v, direct_map_va(mode, gpa), value, width=size)


def to_real_mode(d: Driver, v: int) -> None:
    cr0, _cr3, _cr4, efer, _smm = d.m.regs(v)
    if cr0 & CR0_PG:
        d.do("write_cr0", v, CR0_PE | (cr0 & CR0_WP))
    if efer & EFER_LME:
        d.do("write_efer", v, 0)
    d.do("write_cr4", v, 0)


def enter_long4(d: Driver, v: int, root: int = PML4, *, nx: bool = True, wp: bool = True
                ) -> None:
    to_real_mode(d, v)
    d.do("write_cr3", v, root << 12)
    d.do("write_cr4", v, CR4_PAE)
    d.do("write_efer", v, EFER_LME | (EFER_NXE if nx else 0))
    d.do("write_cr0", v, CR0_PE | CR0_PG | (CR0_WP if wp else 0))
    assert d.m.regs(v)[3] & (1 << 10), "EFER.LMA not set"


def enter_pae(d: Driver, v: int, *, nx: bool = True, wp: bool = True) -> None:
    to_real_mode(d, v)
    d.do("write_cr3", v, PAE_PDPT << 12)
    d.do("write_cr4", v, CR4_PAE)
    d.do("write_efer", v, EFER_NXE if nx else 0)
    d.do("write_cr0", v, CR0_PE | CR0_PG | (CR0_WP if wp else 0))


def enter_32bit(d: Driver, v: int, *, wp: bool = True) -> None:
    to_real_mode(d, v)
    d.do("write_cr3", v, PD32 << 12)
    d.do("write_cr4", v, CR4_PSE)
    d.do("write_cr0", v, CR0_PE | CR0_PG | (CR0_WP if wp else 0))


def build_all_tables(d: Driver, v: int = 0) -> None:
    """Write every table from real mode (identity stores)."""
    write_tables(d, v, long4_entries() + pae_entries() + bit32_entries())


def dm(mode: PagingMode, gpa: int) -> int:
    return direct_map_va(mode, gpa)


LONG4, PAE, BIT32 = PagingMode.LONG4, PagingMode.PAE, PagingMode.BIT32
