"""The architectural x86 page walker: what a guest is entitled to see.

One walker for every paging mode; the modes differ only in parameters (entry size, levels,
index shifts, reserved-bit masks, where page sizes are allowed), as in KVM's paging_tmpl.h.
The rules it implements, each with its source (SDM Vol. 3A §4.1-4.8, APM Vol. 2 §5), are
docs/x86-paging.md §1-§8; §10 there is the walk step by step.

This is the ground truth of the differential oracle. It knows nothing about KVM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

from fuzzmmu.arch.bits import (
    ACC_U,
    ACC_W,
    ACC_X,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PKE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PFERR_FETCH,
    PFERR_P,
    PFERR_PK,
    PFERR_RSVD,
    PFERR_U,
    PFERR_W,
    PTE_A,
    PTE_D,
    PTE_NX,
    PTE_P,
    PTE_PKEY_SHIFT,
    PTE_PS,
    PTE_U,
    PTE_W,
    PagingMode,
    bits,
    paging_mode,
)


class Memory(Protocol):
    """What the walker needs of guest-physical memory. ``read`` raises ``LookupError`` (for
    example ``GuestMemoryError``) where there is no memory."""

    def read(self, gpa: int, size: int) -> int: ...

    def write(self, gpa: int, size: int, value: int) -> None: ...


class NonCanonicalAddress(ValueError):
    """A long-mode linear address that is not canonical: #GP (or #SS), never #PF (SDM §4.5)."""


class PdpteLoadError(ValueError):
    """Loading the PAE PDPTE registers failed: #GP(0) at the MOV to CR3/CR0/CR4 (SDM §4.4.1)."""

    def __init__(self, index: int, value: int | None, reason: str) -> None:
        self.index = index
        self.value = value
        super().__init__(f"#GP(0) loading PDPTE{index}: {reason}")


@dataclass(frozen=True)
class Access:
    """One memory access. ``implicit`` marks a supervisor access to a system structure (GDT, IDT,
    TSS...): it is a supervisor access whatever ``user`` says and EFLAGS.AC cannot override SMAP."""

    write: bool = False
    user: bool = False
    fetch: bool = False
    implicit: bool = False

    def __post_init__(self) -> None:
        if self.write and self.fetch:
            raise ValueError("an access is a read, a write or a fetch, not both write and fetch")


class CpuState:
    """The architectural state a walk depends on.

    ``pdptrs`` is the PAE PDPTE register file (four entries), loaded by :func:`load_pdptrs` at the
    architectural load points; later writes to the PDPT in memory do not affect it. Linear
    addresses are 32 bits wide outside long mode. ``pse36_width`` is the number of physical
    address bits a 4 MiB PSE page can reach on this CPU model: min(MAXPHYADDR, 40) on current
    CPUs (SDM Table 4-4); 36 on the original PSE-36 CPUs.

    Immutable by convention: a value object compared and hashed by its fields (a plain class,
    not a frozen dataclass, so that the compiled reference builds one without the interpreter).
    """

    __slots__ = ("_p", "cr0", "cr3", "cr4", "efer", "eflags_ac", "maxphyaddr", "pdptrs", "pkru",
                 "pse36_width")

    def __init__(self, cr0: int = 0, cr3: int = 0, cr4: int = 0, efer: int = 0,
                 pdptrs: tuple[int, int, int, int] | None = None, maxphyaddr: int = 40,
                 eflags_ac: bool = False, pkru: int = 0, pse36_width: int = 40) -> None:
        if not 32 <= maxphyaddr <= 52:
            raise ValueError(f"MAXPHYADDR must be between 32 and 52, got {maxphyaddr}")
        if cr0 & CR0_PG and efer & EFER_LME and not cr4 & CR4_PAE:
            raise ValueError("illegal CPU state: CR0.PG=1 with EFER.LME=1 needs CR4.PAE=1 (#GP)")
        mode = paging_mode(cr0, cr4, efer)
        if mode is PagingMode.PAE and (pdptrs is None or len(pdptrs) != 4):
            raise ValueError("PAE paging needs the four PDPTE registers: use load_pdptrs()")
        if mode >= PagingMode.LONG4 and cr3 & bits(51, maxphyaddr):
            raise ValueError(f"CR3 {cr3:#x} sets bits above MAXPHYADDR={maxphyaddr} (#GP)")
        self.cr0 = cr0
        self.cr3 = cr3
        self.cr4 = cr4
        self.efer = efer
        self.pdptrs = pdptrs
        self.maxphyaddr = maxphyaddr
        self.eflags_ac = eflags_ac
        self.pkru = pkru
        self.pse36_width = pse36_width
        nxe = bool(efer & EFER_NXE) and mode >= PagingMode.PAE
        pke = bool(cr4 & CR4_PKE) and mode >= PagingMode.LONG4
        self._p = _params(mode, nxe, bool(cr4 & CR4_PSE), maxphyaddr, pse36_width, pke)

    def _key(self) -> tuple[int, int, int, int, tuple[int, int, int, int] | None, int, bool, int,
                            int]:
        return (self.cr0, self.cr3, self.cr4, self.efer, self.pdptrs, self.maxphyaddr,
                self.eflags_ac, self.pkru, self.pse36_width)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CpuState):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"CpuState(cr0={self.cr0:#x}, cr3={self.cr3:#x}, cr4={self.cr4:#x}, "
                f"efer={self.efer:#x}, pdptrs={self.pdptrs!r}, maxphyaddr={self.maxphyaddr}, "
                f"eflags_ac={self.eflags_ac}, pkru={self.pkru:#x}, "
                f"pse36_width={self.pse36_width})")

    def replace(self, *, cr0: int | None = None, cr3: int | None = None, cr4: int | None = None,
                efer: int | None = None, eflags_ac: bool | None = None,
                pkru: int | None = None, maxphyaddr: int | None = None) -> CpuState:
        """A copy with the given registers changed (checked as a new state is)."""
        return CpuState(self.cr0 if cr0 is None else cr0, self.cr3 if cr3 is None else cr3,
                        self.cr4 if cr4 is None else cr4, self.efer if efer is None else efer,
                        self.pdptrs, self.maxphyaddr if maxphyaddr is None else maxphyaddr,
                        self.eflags_ac if eflags_ac is None else eflags_ac,
                        self.pkru if pkru is None else pkru, self.pse36_width)

    @property
    def mode(self) -> PagingMode:
        return self._p.mode

    @classmethod
    def build(cls, mode: PagingMode | str, cr3: int = 0, *, mem: Memory | None = None,
              pdptrs: tuple[int, int, int, int] | None = None, wp: bool = True,
              nxe: bool = False, smep: bool = False, smap: bool = False, pse: bool = False,
              pke: bool = False, maxphyaddr: int = 40, eflags_ac: bool = False,
              pkru: int = 0, pse36_width: int = 40) -> CpuState:
        """A CpuState for ``mode`` with the usual control bits. For PAE the PDPTE registers come
        from ``pdptrs`` or are loaded from ``mem`` at ``cr3`` (as a MOV to CR3 would)."""
        if isinstance(mode, str):
            mode = mode_from_label(mode)
        cr0 = CR0_PE | (CR0_WP if wp else 0)
        cr4 = (CR4_SMEP if smep else 0) | (CR4_SMAP if smap else 0) | (CR4_PSE if pse else 0)
        efer = EFER_NXE if nxe else 0
        if mode is not PagingMode.OFF:
            cr0 |= CR0_PG
        if mode >= PagingMode.PAE:
            cr4 |= CR4_PAE
        if mode >= PagingMode.LONG4:
            efer |= EFER_LME | EFER_LMA
            cr4 |= CR4_PKE if pke else 0
        if mode is PagingMode.LONG5:
            cr4 |= CR4_LA57
        if mode is PagingMode.PAE and pdptrs is None:
            if mem is None:
                raise ValueError("PAE mode: pass mem= (to load the PDPTEs at cr3) or pdptrs=")
            pdptrs = load_pdptrs(mem, cr3, maxphyaddr)
        return cls(cr0=cr0, cr3=cr3, cr4=cr4, efer=efer, pdptrs=pdptrs, maxphyaddr=maxphyaddr,
                   eflags_ac=eflags_ac, pkru=pkru, pse36_width=pse36_width)


class WalkResult:
    """Outcome of a walk. ``ok``: ``gpa`` is the translation and ``level`` the leaf level
    (1 = 4 KiB, 2 = 2/4 MiB, 3 = 1 GiB; 0 with paging off). Not ``ok``: ``gpa`` is None,
    ``error_code`` the #PF error code and ``level`` where the walk stopped. ``rights`` are the
    accumulated ACC_U/ACC_W/ACC_X of the translation (also on a protection fault), 0 when the
    walk did not reach a valid leaf. (A plain class: one is made per walk, and a NamedTuple is
    built by a Python-level ``__new__``.)"""

    __slots__ = ("error_code", "gpa", "level", "ok", "rights")

    def __init__(self, ok: bool, gpa: int | None, error_code: int, level: int,
                 rights: int = 0) -> None:
        self.ok = ok
        self.gpa = gpa
        self.error_code = error_code
        self.level = level
        self.rights = rights

    def _key(self) -> tuple[bool, int | None, int, int, int]:
        return (self.ok, self.gpa, self.error_code, self.level, self.rights)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WalkResult):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"WalkResult(ok={self.ok}, gpa={self.gpa!r}, error_code={self.error_code:#x}, "
                f"level={self.level}, rights={self.rights})")


class WalkStep(NamedTuple):
    """One paging-structure entry read by a walk (for traces). ``entry_gpa`` is None for a PAE
    PDPTE register."""

    level: int
    entry_gpa: int | None
    value: int
    rights: int
    note: str


@dataclass(frozen=True)
class _Params:
    """Per-mode walk parameters (the PTTYPE of paging_tmpl.h)."""

    mode: PagingMode
    levels: int
    esize: int
    nxe: bool
    pke: bool
    va_bits: int  # 32 outside long mode, else 48/57
    rsvd: tuple[tuple[int, int], ...]  # [level][ps] reserved-bit mask, index 0 unused
    ps_ok: tuple[bool, ...]  # [level]: PS=1 maps a page here
    table_mask: int  # address of the next table in a non-leaf entry
    pdpte_rsvd: int


@functools.lru_cache(maxsize=256)
def _params(mode: PagingMode, nxe: bool, pse: bool, maxphy: int, pse36: int, pke: bool) -> _Params:
    above_m = bits(51, maxphy)
    nx_rsvd = 0 if nxe else PTE_NX
    none = (0, 0)
    rsvd: tuple[tuple[int, int], ...]  # [level][ps]
    if mode is PagingMode.BIT32:
        # SDM §4.3 Table 4-4: a 4 MiB PDE holds PA bits (M'-1):32 in bits (M'-20):13, with
        # M' = min(MAXPHYADDR, PSE-36 width); bit 21 and the bits above M'-20 are reserved.
        limit = min(maxphy, pse36)
        pse_pde = bits(21, limit - 19) if limit > 32 else bits(21, 13)
        rsvd = (none, (0, 0), (0, pse_pde if pse else 0))
        return _Params(mode, 2, 4, False, False, 32, rsvd, (False, False, pse), 0xFFFFF000, 0)
    if mode is PagingMode.PAE:
        # SDM §4.4: PDE/PTE bits 62:M reserved (no ignored high bits in PAE), 63 unless NXE;
        # a 2 MiB PDE also 20:13.
        hi = bits(62, maxphy) | nx_rsvd
        rsvd = (none, (hi, hi), (hi, hi | bits(20, 13)))
        pdpte = bits(2, 1) | bits(8, 5) | bits(63, maxphy)
        return _Params(mode, 3, 8, nxe, False, 32, rsvd, (False, False, True), bits(maxphy - 1, 12),
                       pdpte)
    if mode in (PagingMode.LONG4, PagingMode.LONG5):
        # SDM §4.5: bits 51:M everywhere, 63 unless NXE; PS reserved in PML4E/PML5E; 1 GiB
        # leaf 29:13, 2 MiB leaf 20:13 (PAT is bit 12).
        base = above_m | nx_rsvd
        levels = 5 if mode is PagingMode.LONG5 else 4
        rsvd = (none, (base, base), (base, base | bits(20, 13)), (base, base | bits(29, 13)),
                *[(base | PTE_PS, base | PTE_PS)] * (levels - 3))
        ps_ok = (False, False, True, True, False, False)
        return _Params(mode, levels, 8, nxe, pke, 9 * levels + 12, rsvd, ps_ok,
                       bits(maxphy - 1, 12), 0)
    return _Params(mode, 0, 0, False, False, 32, (), (), 0, 0)


def mode_from_label(label: str) -> PagingMode:
    for m in PagingMode:
        if m.label == label.lower():
            return m
    choices = ", ".join(m.label for m in PagingMode)
    raise ValueError(f"unknown paging mode {label!r}; choose one of: {choices}")


def load_pdptrs(mem: Memory, cr3: int, maxphyaddr: int = 40) -> tuple[int, int, int, int]:
    """Load the four PAE PDPTE registers from the 32-byte PDPT at CR3[31:5] (SDM §4.4.1).

    A present PDPTE with a reserved bit set (bits 2:1, 8:5, 63:M) raises :class:`PdpteLoadError`,
    the #GP(0) of the MOV that loads them; so does a PDPT outside memory (all-ones reads there
    would set reserved bits), which is also what KVM's load_pdptrs() does.
    """
    base = cr3 & 0xFFFFFFE0
    rsvd = _params(PagingMode.PAE, False, False, maxphyaddr, 40, False).pdpte_rsvd
    out = []
    for i in range(4):
        try:
            value = mem.read(base + 8 * i, 8)
        except LookupError as exc:
            raise PdpteLoadError(i, None, f"PDPT at {base:#x} is not in guest memory") from exc
        if value & PTE_P and value & rsvd:
            raise PdpteLoadError(i, value, f"reserved bits {value & rsvd:#x} set in {value:#x}")
        out.append(value)
    return (out[0], out[1], out[2], out[3])


Walked = list[tuple[int, int]]  # the entries a walk read: (entry gpa, value), root first


def walk(mem: Memory, cpu: CpuState, gva: int, acc: Access = Access(), set_ad: bool = True
         ) -> WalkResult:
    """Translate ``gva`` for ``acc`` under ``cpu``; with ``set_ad``, update A/D bits in ``mem``
    as the processor does (only on success)."""
    return _walk(mem, cpu, gva, acc, set_ad, None, [])[0]


def walk_leaf(mem: Memory, cpu: CpuState, gva: int, acc: Access = Access()
              ) -> tuple[WalkResult, int, Walked]:
    """Like :func:`walk` without A/D updates, also returning the leaf entry as read (0 unless
    the walk reached a valid leaf: a TLB caches its D bit and protection key, SDM §4.10.2.2)
    and the entries read, for :func:`set_accessed_dirty` once the caller knows that the
    access takes place."""
    walked: Walked = []
    res, leaf = _walk(mem, cpu, gva, acc, False, None, walked)
    return res, leaf, walked


def walk_trace(mem: Memory, cpu: CpuState, gva: int, acc: Access = Access(), set_ad: bool = False
               ) -> tuple[WalkResult, list[WalkStep]]:
    """Like :func:`walk`, also returning every entry read, for humans."""
    steps: list[WalkStep] = []
    return _walk(mem, cpu, gva, acc, set_ad, steps, [])[0], steps


def set_accessed_dirty(mem: Memory, cpu: CpuState, walked: Walked, write: bool,
                       log: list[tuple[int, int, int, int]] | None = None) -> bool:
    """SDM §4.8: A in every entry of a successful walk, D in the leaf for a write, once the
    access is known to succeed (KVM's update_accessed_dirty_bits after walk_addr).
    Read-modify-write the current value: an entry may be walked twice when tables alias.
    Returns whether an entry changed; each write is appended to ``log`` as (entry gpa, entry
    size, old value, new value) when one is given."""
    esize = cpu._p.esize
    last = len(walked) - 1
    changed = False
    for i, (egpa, e) in enumerate(walked):
        want = PTE_A | (PTE_D if write and i == last else 0)
        if e & want == want:
            continue  # set when walked; the writes here only add bits, so still set
        cur = mem.read(egpa, esize)
        if cur & want != want:
            mem.write(egpa, esize, cur | want)
            changed = True
            if log is not None:
                log.append((egpa, esize, cur, cur | want))
    return changed


def _fault(p: _Params, cpu: CpuState, acc: Access, code: int, level: int, rights: int = 0
           ) -> tuple[WalkResult, int]:
    # SDM §4.7: W/R, U/S and I/D describe the access and are set alike for every kind of #PF.
    # I/D only if CR4.SMEP=1 or (PAE/long paging and EFER.NXE=1).
    if acc.write:
        code |= PFERR_W
    if acc.user and not acc.implicit:
        code |= PFERR_U
    if acc.fetch and (p.nxe or cpu.cr4 & CR4_SMEP):
        code |= PFERR_FETCH
    return WalkResult(False, None, code, level, rights), 0


_IDENTITY_RIGHTS: Final = ACC_U | ACC_W | ACC_X
# Address bits of a leaf entry at each level (8-byte entries): 51:12, 51:21, 51:30.
_LEAF_ADDR: Final = (0, bits(51, 12), bits(51, 21), bits(51, 30))


def _walk(mem: Memory, cpu: CpuState, gva: int, acc: Access, set_ad: bool,
          trace: list[WalkStep] | None, walked: Walked) -> tuple[WalkResult, int]:
    p = cpu._p
    if p.levels == 0:
        # SDM §4.1.1: without paging the linear address is the physical address (32 bits).
        gpa = gva & 0xFFFFFFFF
        if trace is not None:
            trace.append(WalkStep(0, None, 0, _IDENTITY_RIGHTS, "paging off: identity"))
        return WalkResult(True, gpa, 0, 0, _IDENTITY_RIGHTS), 0

    if p.va_bits == 32:
        gva &= 0xFFFFFFFF
    else:
        top = gva >> (p.va_bits - 1)
        if top not in (0, (1 << (65 - p.va_bits)) - 1):
            raise NonCanonicalAddress(f"{gva:#x} is not canonical for {p.mode.label} paging (#GP)")

    esize = p.esize
    if esize == 4:
        index_bits, index_mask = 10, 1023
    else:
        index_bits, index_mask = 9, 511
    level = p.levels
    w_all = PTE_W
    u_all = PTE_U
    nx_any = 0

    if p.mode is PagingMode.PAE:
        # SDM §4.4.1: the PDPTE registers, not memory; they carry no rights and no A bit.
        assert cpu.pdptrs is not None
        pdpte = cpu.pdptrs[(gva >> 30) & 3]
        if trace is not None:
            trace.append(WalkStep(3, None, pdpte, ACC_U | ACC_W | ACC_X, "PDPTE register"))
        if not pdpte & PTE_P:
            return _fault(p, cpu, acc, 0, 3)
        if pdpte & p.pdpte_rsvd:  # only reachable with hand-made registers (AMD-style #PF)
            return _fault(p, cpu, acc, PFERR_P | PFERR_RSVD, 3)
        table = pdpte & p.table_mask
        level = 2
    elif p.mode is PagingMode.BIT32:
        table = cpu.cr3 & 0xFFFFF000
    else:
        table = cpu.cr3 & p.table_mask

    while True:
        index = (gva >> (12 + index_bits * (level - 1))) & index_mask
        egpa = table + index * esize
        try:
            e = mem.read(egpa, esize)
        except LookupError:
            # A paging structure outside RAM: treated as not present (KVM's walk_addr does the
            # same; what hardware reads there is platform-defined).
            if trace is not None:
                trace.append(WalkStep(level, egpa, 0, 0, "no memory: not present"))
            return _fault(p, cpu, acc, 0, level)
        if not e & PTE_P:
            if trace is not None:
                trace.append(WalkStep(level, egpa, e, 0, "not present"))
            return _fault(p, cpu, acc, 0, level)
        is_leaf = level == 1 or (e & PTE_PS and p.ps_ok[level])
        rsvd = p.rsvd[level][1 if is_leaf and level > 1 else 0] & e
        if rsvd:
            if trace is not None:
                trace.append(WalkStep(level, egpa, e, 0, f"reserved bits {rsvd:#x}"))
            return _fault(p, cpu, acc, PFERR_P | PFERR_RSVD, level)
        w_all &= e
        u_all &= e
        if p.nxe:
            nx_any |= e & PTE_NX
        walked.append((egpa, e))
        if trace is not None:
            rights = _rights(w_all, u_all, nx_any)
            trace.append(WalkStep(level, egpa, e, rights, "leaf" if is_leaf else "table"))
        if is_leaf:
            break
        table = e & p.table_mask
        level -= 1

    if esize == 4:
        if level == 2:
            gpa = (e & 0xFFC00000) | (((e >> 13) & 0xFF) << 32) | (gva & 0x3FFFFF)
        else:
            gpa = (e & 0xFFFFF000) | (gva & 0xFFF)
    else:
        gpa = (e & _LEAF_ADDR[level]) | (gva & ((1 << (3 + 9 * level)) - 1))

    rights = _rights(w_all, u_all, nx_any)
    code = access_fault(cpu, acc, rights, (e >> PTE_PKEY_SHIFT) & 0xF)
    if code:
        return _fault(p, cpu, acc, code, level, rights)

    if set_ad:
        set_accessed_dirty(mem, cpu, walked, acc.write)
    return WalkResult(True, gpa, 0, level, rights), e


def access_fault(cpu: CpuState, acc: Access, rights: int, pkey: int = 0) -> int:
    """The rights check of SDM §4.6 for a translation with ``rights`` (and, with CR4.PKE in
    long mode, protection key ``pkey``): 0 when the access is allowed, else the P (and PK)
    bits of the #PF error code (the access bits are added by the caller). CR0.WP, SMEP, SMAP,
    EFLAGS.AC and PKRU are applied at use, so the check also serves cached translations."""
    user = acc.user and not acc.implicit
    write = acc.write
    fetch = acc.fetch
    u_page = bool(rights & ACC_U)
    w_ok = bool(rights & ACC_W)
    x_ok = bool(rights & ACC_X)
    if user:
        denied = not u_page or (write and not w_ok) or (fetch and not x_ok)
    elif fetch:
        denied = not x_ok or (u_page and bool(cpu.cr4 & CR4_SMEP))
    else:
        denied = bool(write and not w_ok and cpu.cr0 & CR0_WP) or bool(
            u_page and cpu.cr4 & CR4_SMAP and (acc.implicit or not cpu.eflags_ac))
    code = PFERR_P if denied else 0
    if cpu._p.pke and u_page and not fetch:
        # SDM §4.6.2: PKRU applies to data accesses to user-mode addresses, by user and
        # supervisor code; WD blocks supervisor writes only with CR0.WP=1.
        ad = (cpu.pkru >> (2 * pkey)) & 1
        wd = (cpu.pkru >> (2 * pkey + 1)) & 1
        if ad or (wd and write and (user or cpu.cr0 & CR0_WP)):
            code = PFERR_P | PFERR_PK
    return code


def fault_error_code(cpu: CpuState, acc: Access, code: int) -> int:
    """Complete a #PF error code with the bits that describe the access (SDM §4.7)."""
    return _fault(cpu._p, cpu, acc, code, 0)[0].error_code


def _rights(w_all: int, u_all: int, nx_any: int) -> int:
    return (ACC_W if w_all else 0) | (ACC_U if u_all else 0) | (0 if nx_any else ACC_X)


__all__ = [
    "Access",
    "CpuState",
    "Memory",
    "NonCanonicalAddress",
    "PdpteLoadError",
    "WalkResult",
    "WalkStep",
    "access_fault",
    "fault_error_code",
    "load_pdptrs",
    "mode_from_label",
    "set_accessed_dirty",
    "walk",
    "walk_leaf",
    "walk_trace",
]
