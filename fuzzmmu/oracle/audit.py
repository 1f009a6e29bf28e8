"""Structural audit of the shadow MMU: KVM's old ``mmu_audit.c`` done right.

``audit(machine)`` inspects the model's state from the outside, between two operations (when
every zap has been committed and no vCPU is inside KVM), and returns the invariants of
docs/model.md §12 that the state breaks. It reports and never repairs: nothing it
touches is written, and it is deterministic (shadow pages are visited by host frame, sptes by
index, memslots by address space and base gfn, TLB entries by page).

Which parts of §12 apply to the model, and how:

* **I1** (permission soundness against the guest's own walk) is not structural: it needs the
  guest page tables and an architectural walker, and is what the differential oracle checks.
* **I2 write protection.** For every valid indirect page S that is in sync, no MMU-present
  leaf spte in *any* address space whose recorded gfn is S.gfn has W or MMU-writable set. An
  unsync page exists only on a machine with unsync pages on, is an indirect level-1 page, and
  its gfn is write-tracked in no address space.
  A leaf spte "is in address space a" when its page has ``role.smm == a``. Also the
  (host-writable, MMU-writable, W) triple of every leaf is one of KVM's valid states.
* **I3 counters.** ``write_track`` of each memslot = number of valid (not zapped) upper-level
  indirect pages of that address space at each gfn; ``indirect_shadow_pages`` = valid indirect
  pages; ``n_used_mmu_pages`` = pages not yet freed (invalid roots included). There is no
  ``disallow_lpage``: the world's memslots are smaller than 2 MiB, so every huge frame straddles
  a slot edge and is disallowed for good; the state form of that is "no huge spte exists".
  Every memslot has its arch data (rmaps, counters), and no deleted memslot keeps one.
* **I4 rmap.** The model has 4K rmaps only: ``slot_arch[slot].rmap[gfn]`` is exactly the
  MMU-present leaf sptes whose recorded gfn is gfn, in pages of the slot's address space. Each
  such spte maps the gfn's current host frame (a spte left with the frame a migrated page had
  is stale) with U and X exactly as recorded and W only if recorded. A non-zero spte is either
  MMU-present or an MMIO spte (anything else escapes the rmaps).
* **I5 parent links.** ``parent_ptes`` is exactly the set of present non-leaf sptes pointing at
  the page; every non-leaf spte is ``make_nonleaf_spte`` of a page that is not freed, and not
  obsolete unless its parent is. ``unsync_children`` is the number of bits in
  ``unsync_child_bitmap``, and each parent of a page that is unsync or has unsync children has
  the page's bit set (stale bits are allowed: KVM's walks clear them lazily).
* **I6 keys.** The gfn hash holds exactly the pages not yet freed, in the bucket of their gfn;
  at most one non-obsolete page per (gfn, role); every child's role derives from each parent
  linking it (``kvm_mmu_child_role``): level one lower, the same base bits, the quadrant of a
  4-byte-gpte child from the parent spte index, direct below direct, access no wider than the
  parent's (equal between direct pages), a direct page's gfn aligned to its range and, below a
  direct parent, the parent's gfn for that entry. Leaves of indirect pages get no U or X beyond
  ``role.access``, nor W unless the page was built with CR0.WP=0 (kernel-page conversion).
* **I7 MMIO.** MMIO sptes exist only with MMIO caching on; one whose generation still matches
  its address space's memslot generation names a gfn without a memslot there (stale ones are
  refreshed lazily and may name RAM); a direct page's MMIO spte names the gfn of its entry. No
  MMU-present leaf maps a gfn without a memslot in its space. That MMIO sptes live only in
  valid pages is I8's "an invalid page holds no spte"; that a mismatching generation is never
  *used* is a property of the fault path, not of state.
* **I8 roots.** Every root slot of every vCPU (current root, the four PAE roots, prev_roots)
  names a page not yet freed, ``root_count`` equals the number of slots naming the page, and an
  invalid page with no root slot left has been freed. "Only non-obsolete roots receive sptes" in
  state form: an invalid page holds no spte, and no merely obsolete (old generation) page
  outlives the zap that obsoleted it. Valid pages are on the active list, invalid ones are
  not. The vCPU's MMU context matches its registers, and its roots match the context (role,
  gfn from CR3 or the PDPTRs, ``root_pgd``).
* **I9 flush before rely.** Every host TLB entry of a vCPU that will use it (a vCPU with a root
  and no pending flush or root reload) maps the frame the shadow tables map now for that page,
  with no right the shadow walk (``walk_shadow_tables``) does not grant. One exception is KVM's
  own and harmless: the CR0.WP=0 kernel-page conversion turns a read-only user spte into a
  writable supervisor one without a flush (``mmu_spte_update()`` flushes only for a lost
  MMU-writable, A or D bit), so another vCPU may keep the read-only user view (U, and X under
  SMEP) for the same frame; that view grants nothing beyond the guest's own gpte.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from fuzzmmu.arch.bits import ACC_U, ACC_W, ACC_X, PAGE_SHIFT, acc_str
from fuzzmmu.model.hardware import walk_shadow_tables
from fuzzmmu.model.mmu import spte as S
from fuzzmmu.model.mmu.context import (
    INVALID_PAGE,
    PAE_ROOT,
    PT32E_ROOT_LEVEL,
    calc_root_role,
    is_obsolete_root,
    kvm_calc_cpu_role,
    shadow_walk,
)
from fuzzmmu.model.mmu.internal import ModelError
from fuzzmmu.model.mmu.role import (
    ACCESS_MASK,
    CR0_WP,
    DIRECT,
    HAS_4_BYTE_GPTE,
    INVALID,
    LEVEL_MASK,
    QUADRANT_MASK,
    role_access,
    role_level,
    role_quadrant,
    role_smm,
    role_str,
    with_level,
    with_quadrant,
)
from fuzzmmu.world.memslots import GEN_UPDATE_IN_PROGRESS

if TYPE_CHECKING:
    from fuzzmmu.model.machine import Machine
    from fuzzmmu.model.mmu.page import ShadowPage
    from fuzzmmu.model.x86 import Vcpu
    from fuzzmmu.world.memslots import Memslot

INVARIANTS: Final = ("I2", "I3", "I4", "I5", "I6", "I7", "I8", "I9")

# Role bits a child copies unchanged from its parent (everything but level, quadrant, direct,
# access and invalid).
_INHERITED_ROLE_BITS: Final = ~(LEVEL_MASK | QUADRANT_MASK | DIRECT | ACCESS_MASK | INVALID)
_UX: Final = ACC_U | ACC_X

Sptep = tuple["ShadowPage", int]


@dataclass(frozen=True)
class AuditViolation:
    """One broken invariant. ``kind`` is a short stable slug (for deduplication); ``message``
    names the shadow page(s), spte index and gfn concerned."""

    invariant: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.invariant} {self.kind}: {self.message}"


def audit(machine: Machine) -> list[AuditViolation]:
    """Check invariants I2-I9 on ``machine``'s state; an empty list means the state is sound."""
    return _Auditor(machine).run()


def format_violations(violations: Iterable[AuditViolation]) -> str:
    return "\n".join(str(v) for v in violations)


def _sptep_key(sptep: Sptep) -> tuple[int, int]:
    return sptep[0].hpfn, sptep[1]


def _slot_key(slot: Memslot) -> tuple[int, int, int, int, int]:
    return slot.as_id, slot.base_gfn, slot.slot_id, slot.npages, slot.hva


def _slot_str(slot: Memslot) -> str:
    return (f"memslot {slot.as_id}:{slot.slot_id} (gfns {slot.base_gfn:#x}-"
            f"{slot.end_gfn - 1:#x})")


def _sptep_str(sptep: Sptep) -> str:
    return f"{sptep[0]!r}[{sptep[1]}]"


def _spte_rights(spte: int) -> str:
    bits = [name for bit, name in ((S.SPTE_HOST_WRITABLE, "host-w"),
                                   (S.SPTE_MMU_WRITABLE, "mmu-w"), (S.SPTE_W, "W"))
            if spte & bit]
    return "|".join(bits) or "read-only"


class _Auditor:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.kvm = machine.kvm
        self.memslots = machine.kvm.memslots
        self.out: list[AuditViolation] = []
        self.sps: list[ShadowPage] = [sp for _, sp in sorted(self.kvm.sp_by_hpfn.items())]
        self.leaves: list[tuple[ShadowPage, int, int]] = []
        self.nonleaves: list[tuple[ShadowPage, int, int]] = []
        self.mmio: list[tuple[ShadowPage, int, int]] = []
        self.junk: list[tuple[ShadowPage, int, int]] = []
        self.no_slot_leaves: list[tuple[ShadowPage, int, int]] = []  # found by I4, told by I7
        self.links: list[tuple[ShadowPage, int, ShadowPage]] = []  # found by I5, used by I6
        for sp in self.sps:
            for idx in np.flatnonzero(sp.spt):
                i = int(idx)
                spte = sp.sptv[i]
                if spte & S.SPTE_MMU_PRESENT:
                    if S.is_last_spte(spte, sp.level):
                        self.leaves.append((sp, i, spte))
                    else:
                        self.nonleaves.append((sp, i, spte))
                elif S.is_mmio_spte(spte):
                    self.mmio.append((sp, i, spte))
                else:
                    self.junk.append((sp, i, spte))

    def report(self, invariant: str, kind: str, message: str) -> None:
        self.out.append(AuditViolation(invariant, kind, message))

    def live(self, sp: ShadowPage) -> bool:
        """Not freed: the page is what sp_by_hpfn holds for its frame."""
        return self.kvm.sp_by_hpfn.get(sp.hpfn) is sp

    def run(self) -> list[AuditViolation]:
        self.check_write_protection()
        self.check_counters()
        self.check_rmaps()
        self.check_parent_links()
        self.check_keys()
        self.check_mmio()
        self.check_roots()
        self.check_tlbs()
        return self.out

    # ------------------------------------------------------------------ I2

    def check_write_protection(self) -> None:
        kvm = self.kvm
        shadowed: dict[int, list[ShadowPage]] = defaultdict(list)
        for sp in self.sps:
            if sp.unsync:
                self.check_unsync_page(sp)
            elif not sp.direct and not kvm.is_obsolete_sp(sp):
                shadowed[sp.gfn].append(sp)
        for sp, i, spte in self.leaves:
            host_w = bool(spte & S.SPTE_HOST_WRITABLE)
            mmu_w = bool(spte & S.SPTE_MMU_WRITABLE)
            w = bool(spte & S.SPTE_W)
            if (w and not mmu_w) or (mmu_w and not host_w):
                self.report("I2", "spte-w-state",
                            f"{sp!r}[{i}] spte {spte:#x} has {_spte_rights(spte)}: not one of "
                            "the valid (host-w, mmu-w, W) states 111, 110, 100, 000")
            if not spte & (S.SPTE_W | S.SPTE_MMU_WRITABLE):
                continue
            gfn = sp.get_gfn(i)
            owners = shadowed.get(gfn)
            if not owners:
                continue
            same_space = any(o.smm == sp.smm for o in owners)
            kind = "writable-shadowed-gfn" if same_space else "writable-shadowed-gfn-other-as"
            more = f" (and {len(owners) - 1} more)" if len(owners) > 1 else ""
            self.report("I2", kind,
                        f"{sp!r}[{i}] maps gfn {gfn:#x} in address space {sp.smm} with "
                        f"{_spte_rights(spte)} (spte {spte:#x}), but gfn {gfn:#x} is shadowed "
                        f"by {owners[0]!r}{more} in address space {owners[0].smm}")

    # ------------------------------------------------------------------ I3

    def check_counters(self) -> None:
        kvm = self.kvm
        expected: dict[Memslot, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        indirect = 0
        for sp in self.sps:
            if sp.invalid or sp.direct:
                continue
            indirect += 1
            slot = self.memslots.lookup(sp.smm, sp.gfn)
            if slot is None:
                self.report("I3", "shadowed-gfn-no-memslot",
                            f"{sp!r} shadows gfn {sp.gfn:#x}, which has no memslot in address "
                            f"space {sp.smm}: nowhere to account it")
            elif sp.level > 1:
                expected[slot][sp.gfn] += 1
        slots = self.memslots.all_slots()
        current = set(slots)
        for slot in slots:
            if slot not in kvm.slot_arch:
                self.report("I3", "slot-arch-missing",
                            f"{_slot_str(slot)} has no rmaps/write-track counters")
        for slot in sorted(kvm.slot_arch, key=_slot_key):
            if slot not in current:
                stale = kvm.slot_arch[slot]
                self.report("I3", "slot-arch-stale",
                            f"{_slot_str(slot)} is not installed but keeps its arch data "
                            f"({sum(map(len, stale.rmap.values()))} rmap entries, "
                            f"{sum(stale.write_track.values())} write tracks)")
        for slot in slots:
            arch = kvm.slot_arch.get(slot)
            if arch is None:
                continue
            exp = expected.get(slot, {})
            for gfn in sorted(set(arch.write_track) | set(exp)):
                have = arch.write_track.get(gfn, 0)
                want = exp.get(gfn, 0)
                if have != want:
                    owners = [sp for sp in self.sps if sp.gfn == gfn and sp.smm == slot.as_id
                              and not sp.invalid and not sp.direct and sp.level > 1]
                    names = ", ".join(map(repr, owners)) or "none"
                    self.report("I3", "write-track",
                                f"gfn {gfn:#x} in {_slot_str(slot)}: write-track count {have}, "
                                f"but {want} valid upper-level indirect page(s) shadow it "
                                f"({names})")
        if kvm.indirect_shadow_pages != indirect:
            self.report("I3", "indirect-shadow-pages",
                        f"indirect_shadow_pages is {kvm.indirect_shadow_pages}, but {indirect} "
                        "valid indirect shadow pages exist")
        if kvm.n_used_mmu_pages != len(self.sps):
            self.report("I3", "n-used-mmu-pages",
                        f"n_used_mmu_pages is {kvm.n_used_mmu_pages}, but {len(self.sps)} "
                        "shadow pages are not freed")
        for sp, i, spte in self.leaves:
            if sp.level > 1:
                self.report("I3", "huge-spte",
                            f"{sp!r}[{i}] is a huge leaf (spte {spte:#x}) for gfn "
                            f"{sp.get_gfn(i):#x}; every huge frame straddles a memslot edge, "
                            "so disallow_lpage forbids it")

    # ------------------------------------------------------------------ I4

    def check_rmaps(self) -> None:
        kvm = self.kvm
        phys = self.machine.phys
        expected: dict[Memslot, dict[int, set[Sptep]]] = defaultdict(lambda: defaultdict(set))
        for sp, i, spte in self.leaves:
            gfn = sp.get_gfn(i)
            slot = self.memslots.lookup(sp.smm, gfn)
            if slot is None:
                self.no_slot_leaves.append((sp, i, gfn))  # reported as I7
                continue
            expected[slot][gfn].add((sp, i))
            pfn = phys.gfn_to_pfn(sp.smm, gfn)
            if S.spte_pfn(spte) != pfn:
                self.report("I4", "stale-pfn",
                            f"{sp!r}[{i}] maps gfn {gfn:#x} to host frame "
                            f"{S.spte_pfn(spte):#x}, but the gfn is backed by frame {pfn:#x} "
                            f"in address space {sp.smm}")
            acc = sp.get_access(i)
            spte_u = bool(spte & S.SPTE_U)
            spte_x = not spte & S.SPTE_NX
            if (spte_u != bool(acc & ACC_U) or spte_x != bool(acc & ACC_X)
                    or (spte & S.SPTE_W and not acc & ACC_W)):
                self.report("I4", "leaf-access",
                            f"{sp!r}[{i}] (gfn {gfn:#x}) grants {acc_str(S.spte_access(spte))} "
                            f"(spte {spte:#x}), but the recorded access is {acc_str(acc)}")
        for slot in self.memslots.all_slots():
            arch = kvm.slot_arch.get(slot)
            if arch is None:
                continue
            exp = expected.get(slot, {})
            for gfn in sorted(set(arch.rmap) | set(exp)):
                have = arch.rmap.get(gfn, set())
                want = exp.get(gfn, set())
                for sptep in sorted(want - have, key=_sptep_key):
                    self.report("I4", "rmap-missing",
                                f"{_sptep_str(sptep)} maps gfn {gfn:#x} but is not in the rmap "
                                f"of {_slot_str(slot)}")
                for sptep in sorted(have - want, key=_sptep_key):
                    self.report("I4", "rmap-extra",
                                f"the rmap of gfn {gfn:#x} in {_slot_str(slot)} holds "
                                f"{_sptep_str(sptep)}, which {self._why_not_mapping(sptep, gfn)}")
        for sp, i, spte in self.junk:
            self.report("I4", "junk-spte",
                        f"{sp!r}[{i}] is {spte:#x}: neither MMU-present (so in no rmap) nor an "
                        "MMIO spte")

    def _why_not_mapping(self, sptep: Sptep, gfn: int) -> str:
        sp, i = sptep
        if not 0 <= i < 512:
            return "is not an spte index"
        if not self.live(sp):
            return "lies in a freed shadow page"
        spte = sp.sptv[i]
        if not spte & S.SPTE_MMU_PRESENT:
            return f"is not present (spte {spte:#x})"
        if not S.is_last_spte(spte, sp.level):
            return f"is a non-leaf spte ({spte:#x})"
        if sp.get_gfn(i) != gfn:
            return f"records gfn {sp.get_gfn(i):#x}"
        return f"lies in a page of address space {sp.smm}"

    # ------------------------------------------------------------------ I5

    def check_parent_links(self) -> None:
        kvm = self.kvm
        expected: dict[ShadowPage, set[Sptep]] = defaultdict(set)
        for sp, i, spte in self.nonleaves:
            child = kvm.sp_by_hpfn.get(S.spte_pfn(spte))
            if child is None:
                self.report("I5", "nonleaf-freed-child",
                            f"{sp!r}[{i}] (spte {spte:#x}) points at host frame "
                            f"{S.spte_pfn(spte):#x}, which is not a shadow page (freed)")
                continue
            if spte != S.make_nonleaf_spte(child.hpfn):
                self.report("I5", "nonleaf-format",
                            f"{sp!r}[{i}] is {spte:#x}, not the full-rights non-leaf spte "
                            f"{S.make_nonleaf_spte(child.hpfn):#x} for {child!r}")
            if kvm.is_obsolete_sp(child) and not kvm.is_obsolete_sp(sp):
                self.report("I5", "nonleaf-to-obsolete",
                            f"{sp!r}[{i}] links the obsolete {child!r}")
            expected[child].add((sp, i))
            self.links.append((sp, i, child))
        for sp in self.sps:
            have = sp.parent_ptes
            want = expected.get(sp, set())
            for sptep in sorted(want - have, key=_sptep_key):
                self.report("I5", "parent-missing",
                            f"{_sptep_str(sptep)} points at {sp!r}, but is not in its "
                            "parent_ptes")
            for sptep in sorted(have - want, key=_sptep_key):
                psp, i = sptep
                if not self.live(psp):
                    why = "lies in a freed shadow page"
                elif not 0 <= i < 512:
                    why = "is not an spte index"
                else:
                    why = f"is {psp.sptv[i]:#x}"
                self.report("I5", "parent-extra",
                            f"parent_ptes of {sp!r} holds {_sptep_str(sptep)}, which {why}")
            self.check_unsync_bits(sp)

    def check_unsync_page(self, sp: ShadowPage) -> None:
        """An unsync page is an indirect leaf table of a gfn no address space write-tracks
        (mmu_try_to_unsync_pages()), on a machine that lets pages go unsync."""
        kvm = self.kvm
        if not kvm.config.unsync:
            self.report("I2", "unsync-sp", f"{sp!r} is unsync on a machine without unsync "
                        "pages: every indirect page must stay write-protected")
        if sp.direct or sp.level != 1:
            self.report("I2", "unsync-not-leaf", f"{sp!r} is unsync but not an indirect "
                        "level-1 page")
        for as_id, space in enumerate(kvm.memslots.by_gfn):
            slot = space.get(sp.gfn)
            if slot is not None and sp.gfn in kvm.slot_arch[slot].write_track:
                self.report("I2", "unsync-write-tracked",
                            f"{sp!r} is unsync, but gfn {sp.gfn:#x} is write-tracked in "
                            f"address space {as_id}")

    def check_unsync_bits(self, sp: ShadowPage) -> None:
        """unsync_children counts the bitmap's bits; every parent of a page that is unsync or
        leads to one has the bit for it (a bit may outlive its reason: walks clear it)."""
        if sp.unsync_children != sp.unsync_child_bitmap.bit_count():
            self.report("I5", "unsync-children-count",
                        f"{sp!r} has unsync_children={sp.unsync_children}, but bitmap "
                        f"{sp.unsync_child_bitmap:#x}")
        if sp.unsync or sp.unsync_children:
            for psp, i in sorted(sp.parent_ptes, key=_sptep_key):
                if not psp.unsync_child_bitmap >> i & 1:
                    why = "is unsync" if sp.unsync else "leads to unsync pages"
                    self.report("I5", "unsync-bit-missing",
                                f"{sp!r} {why}, but bit {i} of its parent {psp!r} is clear")

    # ------------------------------------------------------------------ I6

    def check_keys(self) -> None:
        kvm = self.kvm
        for hpfn, sp in sorted(kvm.sp_by_hpfn.items()):
            if sp.hpfn != hpfn:
                self.report("I6", "hpfn-mismatch",
                            f"sp_by_hpfn[{hpfn:#x}] is {sp!r}, whose frame is {sp.hpfn:#x}")
        for sp in self.sps:
            role = sp.role
            fields_ok = (sp.level == role_level(role) and 1 <= sp.level <= 5
                         and sp.direct == bool(role & DIRECT)
                         and sp.has_4_byte_gpte == bool(role & HAS_4_BYTE_GPTE)
                         and sp.quadrant == role_quadrant(role)
                         and sp.access == role_access(role) and sp.smm == role_smm(role)
                         and (sp.shadowed is None) == sp.direct)
            if not fields_ok:
                self.report("I6", "role-fields",
                            f"{sp!r}: cached fields (level {sp.level}, direct {sp.direct}, "
                            f"quadrant {sp.quadrant}, access {acc_str(sp.access)}, smm {sp.smm})"
                            f" disagree with the role word {role:#x}")
        in_hash: set[ShadowPage] = set()
        for gfn in sorted(kvm.page_hash):
            for sp in kvm.page_hash[gfn]:
                if sp.gfn != gfn:
                    self.report("I6", "hash-bucket",
                                f"{sp!r} sits in the hash bucket of gfn {gfn:#x}")
                if not self.live(sp):
                    self.report("I6", "hash-freed",
                                f"{sp!r} is freed but still in the hash bucket of gfn "
                                f"{gfn:#x}")
                if sp in in_hash:
                    self.report("I6", "hash-duplicate", f"{sp!r} is hashed twice")
                in_hash.add(sp)
        keys: dict[tuple[int, int], list[ShadowPage]] = defaultdict(list)
        for sp in self.sps:
            if sp not in in_hash:
                self.report("I6", "hash-missing",
                            f"{sp!r} is not freed but missing from the gfn hash")
            if not kvm.is_obsolete_sp(sp):
                keys[(sp.gfn, sp.role)].append(sp)
        for (gfn, role), sps in sorted(keys.items()):
            if len(sps) > 1:
                self.report("I6", "duplicate-key",
                            f"{len(sps)} non-obsolete shadow pages share gfn {gfn:#x} and role "
                            f"{role_str(role)}: " + ", ".join(map(repr, sps)))
        for parent, i, child in self.links:
            self._check_child_role(parent, i, child)
        for sp, i, spte in self.leaves:
            if sp.direct:
                continue
            acc = sp.get_access(i)
            extra = acc & ~sp.access & 7
            if extra & _UX or (extra & ACC_W and sp.role & CR0_WP):
                self.report("I6", "leaf-exceeds-role",
                            f"{sp!r}[{i}] (gfn {sp.get_gfn(i):#x}) records access "
                            f"{acc_str(acc)}, wider than the page's role access "
                            f"{acc_str(sp.access)} (spte {spte:#x})")

    def _check_child_role(self, parent: ShadowPage, i: int, child: ShadowPage) -> None:
        where = f"{parent!r}[{i}] -> {child!r}"
        if child.level != parent.level - 1:
            self.report("I6", "child-level", f"{where}: child level is not parent level - 1")
        if (child.role ^ parent.role) & _INHERITED_ROLE_BITS:
            self.report("I6", "child-role-bits",
                        f"{where}: child role bits differ from the parent's outside "
                        "level/quadrant/direct/access")
        want_q = i & 1 if parent.has_4_byte_gpte else 0
        if child.quadrant != want_q:
            self.report("I6", "child-quadrant", f"{where}: quadrant {child.quadrant}, expected "
                        f"{want_q}")
        if parent.direct and not child.direct:
            self.report("I6", "child-direct", f"{where}: indirect child of a direct page")
        if parent.direct and child.direct:
            access_ok = child.access == parent.access
        elif child.direct:
            extra = child.access & ~parent.access & 7
            access_ok = not extra & _UX and not (extra & ACC_W and child.role & CR0_WP)
        else:
            access_ok = not child.access & ~parent.access & 7
        if not access_ok:
            self.report("I6", "child-access",
                        f"{where}: child access {acc_str(child.access)} is not derived from "
                        f"the parent's {acc_str(parent.access)}")
        if child.direct:
            span = 1 << (9 * child.level)
            if child.gfn % span:
                self.report("I6", "direct-gfn",
                            f"{where}: direct page gfn {child.gfn:#x} is not aligned to its "
                            f"range of {span:#x} pages")
            elif parent.direct and child.gfn != parent.get_gfn(i):
                self.report("I6", "direct-gfn",
                            f"{where}: direct page gfn {child.gfn:#x}, but the parent entry "
                            f"maps gfn {parent.get_gfn(i):#x}")

    # ------------------------------------------------------------------ I7

    def check_mmio(self) -> None:
        kvm = self.kvm
        gen_mask = (1 << kvm.config.mmio_gen_bits) - 1
        for sp, i, spte in self.mmio:
            gfn = S.get_mmio_spte_gfn(spte)
            gen = S.get_mmio_spte_generation(spte)
            where = f"{sp!r}[{i}] (MMIO spte {spte:#x}, gfn {gfn:#x}, gen {gen:#x})"
            if not kvm.config.enable_mmio_caching:
                self.report("I7", "mmio-caching-disabled",
                            f"{where} exists although MMIO caching is off "
                            f"(MAXPHYADDR {kvm.config.maxphyaddr})")
            if sp.direct and gfn != sp.get_gfn(i):
                self.report("I7", "mmio-gfn",
                            f"{where}: the direct page maps gfn {sp.get_gfn(i):#x} there")
            current = self.memslots.generation[sp.smm]
            if current & GEN_UPDATE_IN_PROGRESS:
                continue
            if gen == current & gen_mask and self.memslots.lookup(sp.smm, gfn) is not None:
                self.report("I7", "mmio-shadows-ram",
                            f"{where} matches the current generation of address space "
                            f"{sp.smm}, but gfn {gfn:#x} has a memslot there")
        for sp, i, gfn in self.no_slot_leaves:
            self.report("I7", "present-no-memslot",
                        f"{sp!r}[{i}] is present for gfn {gfn:#x}, which has no memslot in "
                        f"address space {sp.smm}")

    # ------------------------------------------------------------------ I8

    def check_roots(self) -> None:
        kvm = self.kvm
        refs: dict[int, list[str]] = defaultdict(list)
        for vcpu in self.machine.vcpus:
            for name, hpa in self._root_slots(vcpu):
                refs[hpa >> PAGE_SHIFT].append(f"vcpu{vcpu.id} {name}")
            self._check_context(vcpu)
        for hpfn in sorted(refs):
            if hpfn not in kvm.sp_by_hpfn:
                self.report("I8", "root-freed",
                            f"{', '.join(refs[hpfn])} names host frame {hpfn:#x}, which is "
                            "not a shadow page (freed)")
        for sp in self.sps:
            names = refs.get(sp.hpfn, [])
            if sp.root_count != len(names):
                self.report("I8", "root-count",
                            f"{sp!r} has root_count {sp.root_count}, but {len(names)} root "
                            f"slot(s) name it ({', '.join(names) or 'none'})")
            if sp.invalid and not names:
                self.report("I8", "invalid-not-freed",
                            f"{sp!r} is invalid and no root slot names it, yet it is not freed")
            elif not sp.invalid and kvm.is_obsolete_sp(sp):
                self.report("I8", "obsolete-not-zapped",
                            f"{sp!r} is of an old generation ({sp.mmu_valid_gen}) but was not "
                            "zapped")
            if sp.invalid and np.any(sp.spt):
                self.report("I8", "invalid-sp-populated",
                            f"{sp!r} is invalid but holds {int(np.count_nonzero(sp.spt))} "
                            "spte(s)")
            active = sp in kvm.active_mmu_pages
            if sp.invalid == active:
                state = "on" if active else "off"
                self.report("I8", "active-list",
                            f"{sp!r} is {'invalid' if sp.invalid else 'valid'} but {state} "
                            "the active list")
        for sp in kvm.active_mmu_pages:
            if not self.live(sp):
                self.report("I8", "active-list", f"{sp!r} is freed but on the active list")

    def _root_slots(self, vcpu: Vcpu) -> list[tuple[str, int]]:
        mmu = vcpu.mmu
        out = []
        if mmu.root_hpa >= 0:
            out.append(("root", mmu.root_hpa))
        for i, entry in enumerate(mmu.pae_root):
            if entry:
                out.append((f"pae_root[{i}]", entry & S.SPTE_BASE_ADDR_MASK))
        for i, (_pgd, hpa) in enumerate(mmu.prev_roots):
            if hpa >= 0:
                out.append((f"prev_roots[{i}]", hpa))
        return out

    def _check_context(self, vcpu: Vcpu) -> None:
        kvm = self.kvm
        mmu = vcpu.mmu
        who = f"vcpu{vcpu.id}"
        cpu_role = kvm_calc_cpu_role(vcpu.cr0, vcpu.cr4, vcpu.efer, vcpu.smm)
        if cpu_role != mmu.cpu_role or calc_root_role(kvm, cpu_role) != mmu.root_role:
            self.report("I8", "stale-context",
                        f"{who}: MMU context (root role {role_str(mmu.root_role)}) does not "
                        f"match CR0 {vcpu.cr0:#x} CR4 {vcpu.cr4:#x} EFER {vcpu.efer:#x} "
                        f"SMM {vcpu.smm}: a role-bit change without kvm_mmu_reset_context")
        if mmu.root_hpa != PAE_ROOT and any(mmu.pae_root):
            self.report("I8", "pae-root-leftover",
                        f"{who}: pae_root {[hex(e) for e in mmu.pae_root]} outlives the PAE "
                        f"root (root {mmu.root_hpa:#x})")
        for i, (pgd, hpa) in enumerate(mmu.prev_roots):
            if hpa < 0 and hpa != INVALID_PAGE:
                self.report("I8", "prev-root-special",
                            f"{who}: prev_roots[{i}] caches the special root {hpa} "
                            f"(pgd {pgd:#x})")
        if mmu.root_hpa == INVALID_PAGE:
            return
        role = mmu.cpu_role
        if role is None:
            return
        if role.pg and mmu.root_pgd != vcpu.cr3:
            self.report("I8", "root-pgd",
                        f"{who}: root loaded for pgd {mmu.root_pgd:#x}, CR3 is {vcpu.cr3:#x}")
        expected: list[tuple[str, int, int, int]] = []  # (slot, hpa, role, gfn)
        if mmu.root_hpa >= 0:
            gfn = (mmu.root_pgd & S.SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT
            expected.append(("root", mmu.root_hpa, mmu.root_role, gfn))
        elif mmu.root_hpa == PAE_ROOT:
            for i, entry in enumerate(mmu.pae_root):
                if not entry:
                    continue
                quadrant = i if role.level == 2 else 0
                if not role.pg:
                    gfn = i << (30 - PAGE_SHIFT)
                elif role.level == PT32E_ROOT_LEVEL:
                    if not mmu.pdptrs[i] & S.SPTE_P:
                        self.report("I8", "root-gfn",
                                    f"{who}: pae_root[{i}] is loaded, but PDPTR {i} "
                                    f"({mmu.pdptrs[i]:#x}) is not present")
                        continue
                    gfn = (mmu.pdptrs[i] & S.SPTE_BASE_ADDR_MASK) >> PAGE_SHIFT
                else:
                    gfn = (mmu.root_pgd & 0xFFFFF000) >> PAGE_SHIFT
                expected.append((f"pae_root[{i}]", entry & S.SPTE_BASE_ADDR_MASK,
                                 with_quadrant(with_level(mmu.root_role, 2), quadrant), gfn))
        for name, hpa, want_role, want_gfn in expected:
            sp = kvm.sp_by_hpfn.get(hpa >> PAGE_SHIFT)
            if sp is None:
                continue  # reported as root-freed
            if sp.role & ~INVALID != want_role:
                self.report("I8", "root-role",
                            f"{who} {name} is {sp!r}, but the context wants role "
                            f"{role_str(want_role)}")
            elif sp.gfn != want_gfn:
                self.report("I8", "root-gfn",
                            f"{who} {name} is {sp!r}, but the context wants gfn "
                            f"{want_gfn:#x}")

    # ------------------------------------------------------------------ I9

    def check_tlbs(self) -> None:
        kvm = self.kvm
        if self.machine.dead:
            return
        for vcpu in self.machine.vcpus:
            if vcpu.dead or not vcpu.tlb or vcpu.mmu.root_hpa == INVALID_PAGE:
                continue  # kvm_mmu_load() flushes before the next guest entry
            reqs = vcpu.requests
            if "tlb_flush_current" in reqs or "tlb_flush_guest" in reqs:
                continue
            if "free_obsolete_roots" in reqs and is_obsolete_root(kvm, vcpu.mmu.root_hpa):
                continue  # the root is reloaded, and the TLB flushed, before the next entry
            for page in sorted(vcpu.tlb):
                pfn, rights = vcpu.tlb[page]
                gva = page << PAGE_SHIFT
                try:
                    spfn, srights = walk_shadow_tables(kvm, vcpu, gva)
                except ModelError:
                    continue  # a freed page on the path: reported as I5/I8
                where = (f"vcpu{vcpu.id} TLB entry for gva {gva:#x} -> frame {pfn:#x} "
                         f"{acc_str(rights)}")
                if spfn < 0:
                    self.report("I9", "tlb-unmapped",
                                f"{where}, but the shadow tables no longer map the page")
                elif spfn != pfn:
                    self.report("I9", "tlb-pfn",
                                f"{where}, but the shadow tables map it to frame {spfn:#x}")
                elif rights & ~srights and not self._stale_user_view(vcpu, gva, rights,
                                                                      srights):
                    self.report("I9", "tlb-rights",
                                f"{where}, but the shadow tables grant only {acc_str(srights)}")

    def _stale_user_view(self, vcpu: Vcpu, gva: int, rights: int, srights: int) -> bool:
        """The one reduction KVM makes without a flush: the CR0.WP=0 kernel-page conversion
        rewrites a read-only user spte as a writable supervisor one (U gone, X too under SMEP)
        and mmu_spte_update() flushes only for a lost MMU-writable, A or D bit. A TLB entry
        left with the old read-only user rights grants nothing the guest's gpte does not."""
        if rights & ACC_W or rights & ~srights & ~_UX or srights & ACC_U or not srights & ACC_W:
            return False
        path = shadow_walk(self.kvm, vcpu, gva)
        if not path:
            return False
        sp, _index, _level = path[-1]
        return not sp.direct and not sp.role & CR0_WP
