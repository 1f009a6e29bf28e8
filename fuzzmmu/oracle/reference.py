"""The reference machine: what the guest is architecturally owed.

It has its own guest memory, memslots and host mappings (the same world as the model machine,
changed by the same VMM operations), architectural CPU state per vCPU (CR loads with their
#GP conditions and PDPTE loads, SMM entry and RSM, per the SDM), the reference walker of
fuzzmmu.arch, and an architectural TLB model. It never looks at the shadow MMU.

An access has a set of allowed outcomes: the walk of the current tables, and any translation
still cached since the last invalidation (fuzzmmu.arch.tlb). ``access`` is given the model's
outcome, adopts the allowed outcome that matches it and returns whether one did.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Final, NamedTuple

from fuzzmmu.arch.bits import (
    CR0_CD,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PGE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    PAGE_SHIFT,
    PTE_A,
    PTE_D,
    PTE_PKEY_SHIFT,
    PagingMode,
    bits,
)
from fuzzmmu.arch.tlb import Tlb, TlbEntry
from fuzzmmu.arch.walker import (
    Access,
    CpuState,
    Memory,
    PdpteLoadError,
    Walked,
    WalkResult,
    WalkStep,
    access_fault,
    fault_error_code,
    load_pdptrs,
    set_accessed_dirty,
    walk,
    walk_leaf,
    walk_trace,
)
from fuzzmmu.world.layout import new_world
from fuzzmmu.world.memslots import MemslotChange, MemslotError, MemslotUpdate, PhysMemory
from fuzzmmu.world.observe import DONE, GP, AccessKind, Observation, ObsKind, mmio_read_value

CR0_PDPTR_BITS: Final = CR0_CD | CR0_NW | CR0_PG  # SDM §4.4.1
CR4_PDPTR_BITS: Final = CR4_PGE | CR4_PSE | CR4_PAE | CR4_SMEP
PSE36_WIDTH: Final = 36  # the CPU KVM presents: PSE-36 reaches 36 physical address bits
# The walker's Access for each (kind, CPL 3); Access is immutable, so one of each is shared.
_ACCESSES: Final = {(kind, user): Access(write=kind is AccessKind.WRITE, user=user,
                                         fetch=kind is AccessKind.FETCH)
                    for kind in AccessKind for user in (False, True)}


class OutsideContract(Exception):
    """The program left what KVM promises to shadow correctly: a guest store reached a page
    the guest walked as a paging structure through another gfn than the one it walked, or
    through a gfn that names different host pages in the two address spaces. KVM tracks guest
    page tables per gfn (kvm_gfn_is_write_tracked(), kvm_mmu_pte_write()), so a VMM must not
    alias them; what follows such a store is not compared (docs/x86-paging.md §12)."""


class RefCpu:
    __slots__ = ("cr0", "cr3", "cr4", "dead", "efer", "flushed_at", "invalidated_at", "pdptrs",
                 "saved", "smm", "states", "tlb")

    def __init__(self) -> None:
        self.cr0 = CR0_PE | CR0_WP  # the world's reset state: protected mode, paging off
        self.cr3 = 0
        self.cr4 = 0
        self.efer = 0
        self.pdptrs: tuple[int, int, int, int] = (0, 0, 0, 0)
        self.smm = 0
        self.saved: tuple[int, int, int, int] | None = None
        self.dead = False
        self.tlb = Tlb()
        self.states: dict[bool, CpuState] = {}  # the walker's view per EFLAGS.AC
        # Where in the machine's journal of memory writes the TLB was last flushed, and each
        # linear page last invalidated (for speculative translations, ReferenceMachine).
        self.flushed_at = 0
        self.invalidated_at: dict[int, int] = {}

    def copy(self) -> RefCpu:
        other = RefCpu()
        other.cr0, other.cr3, other.cr4, other.efer = self.cr0, self.cr3, self.cr4, self.efer
        other.pdptrs = self.pdptrs
        other.smm = self.smm
        other.saved = self.saved
        other.dead = self.dead
        other.tlb = self.tlb.copy()
        other.states = dict(self.states)
        other.flushed_at = self.flushed_at
        other.invalidated_at = dict(self.invalidated_at)
        return other


class ReferenceMachine:
    def __init__(self, maxphyaddr: int = 40, *, speculative: bool = False,
                 _copy_of: ReferenceMachine | None = None) -> None:
        """``speculative``: also accept translations the processor may have cached without
        the guest using them (see ``_speculative_match``)."""
        self.maxphyaddr = maxphyaddr
        self.speculative = speculative
        # With ``speculative``: every write to guest memory as (host address, size, old
        # value), and where the last memslot deletion or move happened (walks replayed over
        # the journal use today's memslots, so none is searched from before it).
        self.journal: list[tuple[int, int, int]] = list(_copy_of.journal) if _copy_of else []
        self.barrier: int = _copy_of.barrier if _copy_of else 0
        # Every gfn a walk has read a paging-structure entry from (for OutsideContract).
        self.tables: set[int] = set(_copy_of.tables) if _copy_of else set()
        self.phys: PhysMemory
        self.cpus: list[RefCpu]
        if _copy_of is not None:
            self.phys = _copy_of.phys.copy()
            self.cpus = [c.copy() for c in _copy_of.cpus]
        else:
            backing, slots, host = new_world()
            self.phys = PhysMemory(backing, slots, host)
            self.cpus = [RefCpu(), RefCpu()]
        self.views = (self.phys.view(0), self.phys.view(1))  # per address space (SMM: 1)
        # This op's walks that a cached (or speculative) translation explained too, oldest
        # first; an access that depends on one makes it final.
        self.optional: list[OptionalWalk] = list(_copy_of.optional) if _copy_of else []

    def copy(self) -> ReferenceMachine:
        return ReferenceMachine(self.maxphyaddr, speculative=self.speculative, _copy_of=self)

    def release(self) -> None:
        """Done with this machine: its guest memory goes to a later copy (GuestMemory.release).
        It cannot run anymore."""
        self.phys.release()

    def regs(self, v: int) -> tuple[int, int, int, int, int]:
        c = self.cpus[v]
        return c.cr0, c.cr3, c.cr4, c.efer, c.smm

    def cpu_state(self, v: int, ac: bool = False) -> CpuState:
        """The walker's view of vCPU ``v`` (cached, for either EFLAGS.AC, until a register
        changes)."""
        c = self.cpus[v]
        state = c.states.get(ac)
        if state is None:
            state = CpuState(cr0=c.cr0, cr3=c.cr3 if c.efer & EFER_LMA else c.cr3 & 0xFFFFFFFF,
                             cr4=c.cr4, efer=c.efer, pdptrs=c.pdptrs,
                             maxphyaddr=self.maxphyaddr, eflags_ac=ac, pse36_width=PSE36_WIDTH)
            c.states[ac] = state
        return state

    # ------------------------------------------------------------------ accesses

    def _outcome(self, v: int, gpa: int, write: bool, width: int, value: int,
                 as_id: int | None = None) -> Observation:
        """What an access to ``gpa`` gives, in address space ``as_id`` (default: the vCPU's)."""
        pfn = self.phys.gfn_to_pfn(self.cpus[v].smm if as_id is None else as_id,
                                   gpa >> PAGE_SHIFT)
        if pfn < 0:
            return Observation(ObsKind.MMIO, gpa, value if write else mmio_read_value(gpa, width))
        hpa = (pfn << PAGE_SHIFT) | (gpa & 0xFFF)
        if write:
            return Observation(ObsKind.RAM, hpa, value)
        return Observation(ObsKind.RAM, hpa, self.phys.backing.read(hpa, width))

    def _perform(self, obs: Observation, write: bool, width: int, as_id: int, gfn: int
                 ) -> None:
        if write and obs.kind is ObsKind.RAM:
            if self.phys.slots.irregular:
                self._check_contract(as_id, gfn)
            backing = self.phys.backing
            if self.speculative:
                self.journal.append((obs.addr, width, backing.read(obs.addr, width)))
            backing.write(obs.addr, width, obs.value)

    def _check_contract(self, as_id: int, gfn: int) -> None:
        """Raise OutsideContract if a store through ``gfn`` changes a paging structure behind
        KVM's back (see the class)."""
        slots, tables = self.phys.slots, self.tables
        if gfn in slots.split and gfn in tables:
            raise OutsideContract(f"a store through gfn {gfn:#x} in address space {as_id}, "
                                  "which the guest walked as a paging structure and which "
                                  "names different host pages in the two address spaces")
        hva = slots.hva_table[as_id].get(gfn)
        for other in slots.aliases.get(hva, ()) if hva is not None else ():
            if other != gfn and other in tables:
                raise OutsideContract(
                    f"a store through gfn {gfn:#x} in address space {as_id} reaches host page "
                    f"{hva:#x}, which gfn {other:#x} maps too and the guest walked as a paging "
                    "structure: KVM tracks guest page tables per gfn")

    def _walked(self, walked: Walked) -> None:
        tables = self.tables
        for gpa, _value in walked:
            tables.add(gpa >> PAGE_SHIFT)

    def _stored_ad(self, as_id: int, log: list[tuple[int, int, int, int]]) -> None:
        if self.phys.slots.irregular:
            for gpa, _size, _old, _new in log:
                self._check_contract(as_id, gpa >> PAGE_SHIFT)

    def _journal_ad(self, as_id: int, log: list[tuple[int, int, int, int]]) -> None:
        """Journal the A/D writes of a walk (logged as guest-physical addresses)."""
        phys = self.phys
        for gpa, size, old, _new in log:
            pfn = phys.gfn_to_pfn(as_id, gpa >> PAGE_SHIFT)
            self.journal.append(((pfn << PAGE_SHIFT) | (gpa & 0xFFF), size, old))

    def _flush_tlb(self, c: RefCpu) -> None:
        c.tlb.flush()
        c.flushed_at = len(self.journal)
        c.invalidated_at.clear()

    def _invalidate_page(self, c: RefCpu, page: int) -> None:
        c.tlb.invalidate(page)
        c.invalidated_at[page] = len(self.journal)

    def expected(self, v: int, gva: int, kind: AccessKind, *, cpl: int = 0, ac: bool = False,
                 width: int = 8, value: int = 0) -> Observation:
        """The outcome of the walk of the current tables (nothing is changed)."""
        c = self.cpus[v]
        if c.dead:
            return Observation(ObsKind.SHUTDOWN)
        write = kind is AccessKind.WRITE
        acc = _ACCESSES[kind, cpl == 3]
        gva = gva if c.efer & EFER_LMA else gva & 0xFFFFFFFF
        res = walk(self.views[c.smm], self.cpu_state(v, ac), gva, acc, set_ad=False)
        if not res.ok:
            return Observation(ObsKind.PF, gva, 0, res.error_code)
        assert res.gpa is not None
        return self._outcome(v, res.gpa, write, width, value)

    def trace(self, v: int, gva: int, kind: AccessKind, *, cpl: int = 0, ac: bool = False
              ) -> tuple[WalkResult, list[WalkStep]]:
        """The walk of the current tables with every entry it reads (for the replay's
        explanation and the mutator's aim; nothing is changed)."""
        c = self.cpus[v]
        gva = gva if c.efer & EFER_LMA else gva & 0xFFFFFFFF
        return walk_trace(self.views[c.smm], self.cpu_state(v, ac), gva, _ACCESSES[kind, cpl == 3])

    def speculative_walk(self, v: int, gva: int, kind: AccessKind, *, cpl: int = 0,
                         ac: bool = False) -> None:
        """A translation made ahead of an access that then runs on: the A flags of a successful
        walk are set and the translation may be cached (SDM §4.8, §4.10.2.3); nothing is
        accessed, and a walk that faults leaves no trace."""
        c = self.cpus[v]
        if c.dead:
            return
        acc = _ACCESSES[kind, cpl == 3]
        if not c.efer & EFER_LMA:
            gva &= 0xFFFFFFFF
        cpu = self.cpu_state(v, ac)
        view = self.views[c.smm]
        res, leaf, walked = walk_leaf(view, cpu, gva, acc)
        self._walked(walked)
        if not res.ok or cpu.mode is PagingMode.OFF:
            return  # a walk that faults sets no A flag: it depends on no earlier walk's
        if self.optional:
            self._settle(c.smm, cpu, walked, False)
        assert res.gpa is not None
        log: list[tuple[int, int, int, int]] = []
        set_accessed_dirty(view, cpu, walked, False, log)
        self._stored_ad(c.smm, log)
        if self.speculative:
            self._journal_ad(c.smm, log)
        c.tlb.fill(gva >> PAGE_SHIFT, TlbEntry(res.gpa >> PAGE_SHIFT, res.rights,
                                               bool(leaf & PTE_D),
                                               (leaf >> PTE_PKEY_SHIFT) & 0xF))

    def access(self, v: int, gva: int, kind: AccessKind, model: Observation, *, cpl: int = 0,
               ac: bool = False, width: int = 8, value: int = 0) -> tuple[bool, Observation]:
        """Adopt the allowed outcome equal to ``model``; return (matched, expected outcome).
        Without a match the reference follows the current-tables outcome."""
        c = self.cpus[v]
        if c.dead:
            obs = Observation(ObsKind.SHUTDOWN)
            return model.kind is ObsKind.SHUTDOWN, obs
        write = kind is AccessKind.WRITE
        acc = _ACCESSES[kind, cpl == 3]
        if not c.efer & EFER_LMA:
            gva &= 0xFFFFFFFF
        cpu = self.cpu_state(v, ac)
        view = self.views[c.smm]
        page = gva >> PAGE_SHIFT
        res, leaf, walked = walk_leaf(view, cpu, gva, acc)
        self._walked(walked)
        if res.ok:
            assert res.gpa is not None
            fresh = self._outcome(v, res.gpa, write, width, value)
        else:
            fresh = Observation(ObsKind.PF, gva, 0, res.error_code)
        if _same_target(fresh, model):
            # The current tables: A/D bits first (the data read may be a paging entry), then
            # the access; the translation may now be cached.
            if res.ok:
                assert res.gpa is not None
                log: list[tuple[int, int, int, int]] = []
                cached = None
                if set_accessed_dirty(view, cpu, walked, write, log):
                    if page in c.tlb.entries:
                        # Could a cached translation have served the access with no A/D
                        # write at all (SDM §4.10.2.3)? Asked of the memory before the writes.
                        undone = _undo(view, log)
                        cached = self._cached_match(v, cpu, acc, page, gva, write, width, value,
                                                    model)
                        _redo(view, undone)
                    fresh = self._outcome(v, res.gpa, write, width, value)  # data may be an entry
                if cached is not None and fresh != model:
                    _undo(view, log)
                    self._perform(cached[0], write, width, c.smm, cached[1])
                    return True, cached[0]
                if cached is None and fresh != model and self.speculative:
                    # The walk's A/D writes landed in the data it reads (a table that maps
                    # itself): a translation cached speculatively before, used with no walk
                    # now, reads the data without them (SDM §4.10.2.3).
                    undone = _undo(view, log)
                    unwalked = self._speculative_match(v, cpu, acc, page, gva, write, width,
                                                       value, model)
                    if unwalked is not None:
                        obs, gfn = unwalked
                        self._settle(c.smm, cpu, (), write, (gfn << PAGE_SHIFT) | (gva & 0xFFF),
                                     width)
                        self._perform(obs, write, width, c.smm, gfn)
                        return True, obs
                    _redo(view, undone)
                self._stored_ad(c.smm, log)
                search = None
                if cached is None and log and self.speculative:
                    # A speculative translation may explain the access without the A/D
                    # writes too; searching for one costs a walk per journalled write, so
                    # only when the state comparison fails (forgo_optional_walk).
                    search = (cpu, acc, gva, write, width, value, model,
                              self._search_start(c, page), c.smm)
                if self.optional:
                    # An access that needed this walk depends on what earlier optional walks
                    # wrote into its entries; one that may not have walked (it is optional
                    # itself, or a translation cached before it serves it) depends only on
                    # its data.
                    served = cached is not None or search is not None or (
                        self._cached_match(v, cpu, acc, page, gva, write, width, value, model)
                        is not None) or (
                        self.speculative and not log
                        and self._speculative_without_optional(v, cpu, acc, page, gva, write,
                                                               width, value, model))
                    self._settle(c.smm, cpu, () if served else walked, write, res.gpa, width)
                at = len(self.journal)
                if self.speculative:
                    self._journal_ad(c.smm, log)
                self._perform(fresh, write, width, c.smm, res.gpa >> PAGE_SHIFT)
                filled = None
                if cpu.mode is not PagingMode.OFF:
                    made = TlbEntry(res.gpa >> PAGE_SHIFT, res.rights,
                                    write or bool(leaf & PTE_D), (leaf >> PTE_PKEY_SHIFT) & 0xF)
                    if c.tlb.fill(page, made):
                        filled = made
                if cached is not None or search is not None:
                    # By host address: taking it back after a memslot change must reach the
                    # memory it wrote, whatever the guest-physical addresses mean by then.
                    self.optional.append(OptionalWalk(
                        tuple((self._host(c.smm, gpa), size, old, new)
                              for gpa, size, old, new in log),
                        v, page, filled, at, search, self._needs(c.smm, cpu, walked, write)))
            else:
                # A walk that faults writes no A/D flag, and A/D flags never decide a fault
                # (SDM §4.7, §4.8): it depends on nothing an optional walk wrote, which may
                # still be taken back.
                self._invalidate_page(c, page)
            return fresh == model, fresh
        for entry in c.tlb.cached(page):
            code = access_fault(cpu, acc, entry.rights, entry.pkey)
            if code:
                stale = Observation(ObsKind.PF, gva, 0, fault_error_code(cpu, acc, code))
            elif write and not entry.dirty:
                continue  # a write through a clean cached entry goes back to the tables
            else:
                stale = self._outcome(v, (entry.gpa_page << PAGE_SHIFT) | (gva & 0xFFF), write,
                                      width, value)
            if stale == model:
                if stale.kind is ObsKind.PF:
                    self._invalidate_page(c, page)
                else:
                    self._perform(stale, write, width, c.smm, entry.gpa_page)
                return True, stale
        if self.speculative:
            found = self._speculative_match(v, cpu, acc, page, gva, write, width, value, model)
            if found is not None:
                spec, gfn = found
                if spec.kind is ObsKind.PF:
                    self._invalidate_page(c, page)
                else:
                    self._perform(spec, write, width, c.smm, gfn)
                return True, spec
        return False, fresh

    def _speculative_match(self, v: int, cpu: CpuState, acc: Access, page: int, gva: int,
                           write: bool, width: int, value: int, model: Observation,
                           start: int | None = None, end: int | None = None,
                           as_id: int | None = None) -> tuple[Observation, int] | None:
        """The outcome equal to ``model`` of a translation the processor may have cached
        since the page was last invalidated without the guest using it: one the tables gave
        at some moment since then, with every A flag already set (a speculative walk needs
        none set: SDM §4.10.2.3 lets a processor cache translations for addresses it never
        accesses). Found by taking the journal of memory writes back one write at a time and
        walking after each; the memory is as it was afterwards. Returns the outcome and the
        gfn it reaches. ``as_id``: the address space the access ran in (default: the vCPU's
        now)."""
        c = self.cpus[v]
        if start is None:
            start = self._search_start(c, page)
        backing, journal = self.phys.backing, self.journal
        if (len(journal) if end is None else end) <= start:
            return None
        space = c.smm if as_id is None else as_id
        view = self.views[space]
        # Rights are checked when a cached translation is used: walk for the translation only.
        bare = cpu.replace(cr4=cpu.cr4 & ~(CR4_SMEP | CR4_SMAP), eflags_ac=True)
        found: list[TlbEntry] = []
        undone: list[tuple[int, int, int]] = []
        for addr, size, old in reversed(journal[start:end]):
            undone.append((addr, size, backing.read(addr, size)))
            backing.write(addr, size, old)
            res, leaf, walked = walk_leaf(view, bare, gva, _ACCESSES[AccessKind.READ, False])
            if res.ok and all(e & PTE_A for _, e in walked):
                assert res.gpa is not None
                entry = TlbEntry(res.gpa >> PAGE_SHIFT, res.rights, bool(leaf & PTE_D),
                                 (leaf >> PTE_PKEY_SHIFT) & 0xF)
                if entry not in found:
                    found.append(entry)
        _put_back(backing, undone)
        for entry in found:
            code = access_fault(cpu, acc, entry.rights, entry.pkey)
            if code:
                spec = Observation(ObsKind.PF, gva, 0, fault_error_code(cpu, acc, code))
            elif write and not entry.dirty:
                continue  # a write through a clean translation walks the tables again
            else:
                spec = self._outcome(v, (entry.gpa_page << PAGE_SHIFT) | (gva & 0xFFF), write,
                                     width, value, space)
            if spec == model:
                return spec, entry.gpa_page
        return None

    def _speculative_without_optional(self, v: int, cpu: CpuState, acc: Access, page: int,
                                      gva: int, write: bool, width: int, value: int,
                                      model: Observation) -> bool:
        """Whether a speculative translation explains the access with this op's optional
        walks taken back (their A/D writes undone and out of the journal): then the access
        need not have walked through what they wrote, and they stay optional. (Another vCPU's
        walk set A, the guest rewrote the leaf clean, and this vCPU uses a translation it may
        have cached speculatively in between: SDM §4.10.2.3.)"""
        backing, journal = self.phys.backing, self.journal
        skipped = {i for opt in self.optional
                   for i in range(opt.journal_at, opt.journal_at + len(opt.writes))}
        start = self._search_start(self.cpus[v], page)
        start -= sum(1 for i in skipped if i < start)
        undone = [_undo(backing, opt.writes) for opt in reversed(self.optional)]
        self.journal = [e for i, e in enumerate(journal) if i not in skipped]
        try:
            return self._speculative_match(v, cpu, acc, page, gva, write, width, value, model,
                                           start) is not None
        finally:
            self.journal = journal
            for writes in reversed(undone):
                _redo(backing, writes)

    def _cached_match(self, v: int, cpu: CpuState, acc: Access, page: int, gva: int,
                      write: bool, width: int, value: int, model: Observation
                      ) -> tuple[Observation, int] | None:
        """The outcome equal to ``model`` that a cached translation gives without a walk, and
        the gfn it reaches."""
        for entry in self.cpus[v].tlb.cached(page):
            if access_fault(cpu, acc, entry.rights, entry.pkey) or (write and not entry.dirty):
                continue
            stale = self._outcome(v, (entry.gpa_page << PAGE_SHIFT) | (gva & 0xFFF), write,
                                  width, value)
            if stale == model:
                return stale, entry.gpa_page
        return None

    def _search_start(self, c: RefCpu, page: int) -> int:
        """Where in the journal the page's translations were last invalidated (for ``c``)."""
        return max(c.flushed_at, c.invalidated_at.get(page, 0), self.barrier)

    def _to_forgo(self, differing: Collection[int] | None) -> int:
        """Which optional walk to take back: the latest that wrote in the ``differing`` frames
        if it may go alone (the later ones staying), else the latest."""
        last = len(self.optional) - 1
        if differing is not None:
            for at in range(last, -1, -1):
                if any(addr >> PAGE_SHIFT in differing for addr, *_ in self.optional[at].writes):
                    if at == last or self._alone(at):
                        return at
                    break
        return last

    def _alone(self, at: int) -> bool:
        """Whether the optional walk at ``at`` may be taken back while the later ones stay: no
        later optional walk went through an entry it wrote (whose A/D bits that walk then
        found set and did not write itself), and no later journalled write touched one."""
        opt = self.optional[at]
        written = {addr for addr, *_ in opt.writes}
        if any(addr in written for later in self.optional[at + 1:] for addr, *_ in later.reads):
            return False
        return not any(addr in written
                       for addr, *_ in self.journal[opt.journal_at + len(opt.writes):])

    def forgo_optional_walk(self, differing: Collection[int] | None = None) -> bool:
        """Take back the last access's walk when a cached (or, with unsync pages, a
        speculative) translation explains the access just as well: its A/D writes and the
        translation it cached. Whether it was taken back.

        When both the current tables and a cached translation give the model's outcome the
        reference follows the tables (the one outcome every processor may show) and keeps this
        record; the executor takes the walk back only if the state comparison needs it, e.g. a
        write through a translation cached while the leaf was dirty, after the guest rewrote
        the leaf clean without an invalidation: no D is due then (SDM §4.8, §4.10.2.3).

        ``differing``: the host frames where the comparison failed. Only a walk that wrote
        there can mend it: the latest such walk is taken back even when later optional walks
        stay, if nothing after it depends on its writes (``_alone``)."""
        backing = self.phys.backing
        while self.optional:  # the latest first (no later access depends on it), or _alone
            at = self._to_forgo(differing)
            opt = self.optional.pop(at)
            if opt.search is not None and not self._explained_without(opt):
                # It is final after all, and so is every earlier walk it read through.
                self._settle_host(_by_entry(opt.reads))
                continue
            _undo(backing, opt.writes)
            if at == len(self.optional):
                del self.journal[opt.journal_at:opt.journal_at + len(opt.writes)]  # never happened
            # else its journal entries stay, where later walks and searches count positions:
            # nothing after them touches those addresses, so taking the journal back past
            # them restores what memory holds anyway.
            if opt.kept and self.speculative:
                # The bits later walks kept were set by them, later than the journal could
                # now say: search no speculative translation from before this point.
                self.barrier = len(self.journal)
            if opt.filled is not None:
                self.cpus[opt.vcpu].tlb.discard(opt.page, opt.filled)
            return True
        return False

    def _decide_searches(self) -> None:
        """Each optional walk that a speculative translation must explain: explained (it stays
        optional, with nothing left to search) or not (it is final)."""
        decided = []
        for opt in self.optional:
            if opt.search is not None:
                if not self._explained_without(opt):
                    continue
                opt = opt._replace(search=None)
            decided.append(opt)
        self.optional = decided

    def _explained_without(self, opt: OptionalWalk) -> bool:
        """Whether a speculative translation explains ``opt``'s access without its A/D writes
        (searched with them undone; the memory is as it was afterwards)."""
        assert opt.search is not None
        backing = self.phys.backing
        # The memory as the access found it: what was written since (later steps, or the
        # other vCPU's ops of an interleave that ran after it) is taken back too, newest
        # first, or the search would compare the data the access read with data written
        # after it.
        since = _take_back(backing, self.journal[opt.journal_at + len(opt.writes):])
        undone = _undo(backing, opt.writes)
        cpu, acc, gva, write, width, value, model, start, as_id = opt.search
        try:
            return self._speculative_match(opt.vcpu, cpu, acc, opt.page, gva, write, width,
                                           value, model, start, opt.journal_at,
                                           as_id) is not None
        finally:
            _redo(backing, undone)
            _put_back(backing, since)

    def _host(self, as_id: int, gpa: int) -> int:
        """The host address of ``gpa`` in address space ``as_id`` (-1 outside RAM)."""
        pfn = self.phys.gfn_to_pfn(as_id, gpa >> PAGE_SHIFT)
        return (pfn << PAGE_SHIFT) | (gpa & 0xFFF) if pfn >= 0 else -1

    def _needs(self, as_id: int, cpu: CpuState, walked: Walked | tuple[()], write: bool
               ) -> tuple[tuple[int, int, int], ...]:
        """The entries of a successful walk as (host address, size, the A/D bits the walk
        sets there: A in each, D in the leaf of a write; set_accessed_dirty())."""
        last = len(walked) - 1
        return tuple((self._host(as_id, gpa), cpu._p.esize,
                      PTE_A | (PTE_D if write and i == last else 0))
                     for i, (gpa, _entry) in enumerate(walked))

    def _settle(self, as_id: int, cpu: CpuState, walked: Walked | tuple[()], write: bool,
                data_gpa: int | None = None, width: int = 0) -> None:
        """``walked``: a later access's walk (guest-physical in ``as_id``, a ``write`` or not);
        ``data_gpa``, ``width``: what it read or wrote as data (``_settle_host``)."""
        self._settle_host(_by_entry(self._needs(as_id, cpu, walked, write)),
                          None if data_gpa is None else self._host(as_id, data_gpa), width)

    def _settle_host(self, needs: dict[int, tuple[int, int]], data: int | None = None,
                     width: int = 0) -> None:
        """What a later access depends on. An optional walk that wrote where the access read
        or wrote ``width`` bytes of data at ``data`` (host addresses) is final from now on. One
        whose entries the access walked through (``needs``: host address -> entry size, the
        A/D bits the walk sets there) stays optional, and taking it back keeps those bits:
        the later walk would have set them itself, and A/D flags never decide a walk's
        outcome (SDM §4.8). An entry walked in another format makes it final."""
        keep = []
        for opt in self.optional:
            if data is not None and any(data - size < addr < data + width
                                        for addr, size, _old, _new in opt.writes):
                continue
            if any(addr in needs for addr, _size, _old, _new in opt.writes):
                if any(addr in needs and needs[addr][0] != size
                       for addr, size, _old, _new in opt.writes):
                    continue
                opt = opt._replace(writes=tuple(
                    (addr, size, old | (needs[addr][1] & new) if addr in needs else old, new)
                    for addr, size, old, new in opt.writes), kept=True)
            keep.append(opt)
        self.optional = keep

    # ------------------------------------------------------------------ control registers

    def _changed(self, c: RefCpu) -> None:
        c.states = {}

    def _load_pdptrs(self, c: RefCpu, cr3: int) -> bool:
        try:
            c.pdptrs = load_pdptrs(self.views[c.smm], cr3, self.maxphyaddr)
        except PdpteLoadError:
            return False
        return True

    def write_cr0(self, v: int, cr0: int) -> Observation:
        c = self.cpus[v]
        if c.dead:
            return Observation(ObsKind.SHUTDOWN)
        old = c.cr0
        if (cr0 & CR0_PG and not cr0 & CR0_PE) or (cr0 & CR0_NW and not cr0 & CR0_CD):
            return GP
        if c.efer & EFER_LME and not old & CR0_PG and cr0 & CR0_PG and not c.cr4 & CR4_PAE:
            return GP
        if (not c.efer & EFER_LME and cr0 & CR0_PG and c.cr4 & CR4_PAE
                and (cr0 ^ old) & CR0_PDPTR_BITS and not self._load_pdptrs(c, c.cr3)):
            return GP
        c.cr0 = cr0
        if c.efer & EFER_LME and (cr0 ^ old) & CR0_PG:
            c.efer = c.efer | EFER_LMA if cr0 & CR0_PG else c.efer & ~EFER_LMA
        if (cr0 ^ old) & CR0_PG:
            self._flush_tlb(c)
        self._changed(c)
        return DONE

    def write_cr4(self, v: int, cr4: int) -> Observation:
        c = self.cpus[v]
        if c.dead:
            return Observation(ObsKind.SHUTDOWN)
        old = c.cr4
        if c.efer & EFER_LMA:
            if not cr4 & CR4_PAE or (cr4 ^ old) & CR4_LA57:
                return GP
        elif (c.cr0 & CR0_PG and cr4 & CR4_PAE and (cr4 ^ old) & CR4_PDPTR_BITS
              and not self._load_pdptrs(c, c.cr3)):
            return GP
        c.cr4 = cr4
        if (cr4 ^ old) & (CR4_PGE | CR4_PAE) or (cr4 & ~old & CR4_SMEP):
            self._flush_tlb(c)
        self._changed(c)
        return DONE

    def write_cr3(self, v: int, cr3: int) -> Observation:
        c = self.cpus[v]
        if c.dead:
            return Observation(ObsKind.SHUTDOWN)
        lma = c.efer & EFER_LMA
        if lma and cr3 & bits(63, self.maxphyaddr):
            return GP
        pae_paging = c.cr0 & CR0_PG and c.cr4 & CR4_PAE and not lma
        if pae_paging and not self._load_pdptrs(c, cr3):
            return GP
        c.cr3 = cr3
        self._flush_tlb(c)
        self._changed(c)
        return DONE

    def write_efer(self, v: int, efer: int) -> Observation:
        c = self.cpus[v]
        if c.dead:
            return Observation(ObsKind.SHUTDOWN)
        if c.cr0 & CR0_PG and (c.efer ^ efer) & EFER_LME:
            return GP
        c.efer = (efer & ~EFER_LMA) | (c.efer & EFER_LMA)
        self._changed(c)
        return DONE

    def invlpg(self, v: int, gva: int) -> Observation:
        c = self.cpus[v]
        if c.dead:
            return Observation(ObsKind.SHUTDOWN)
        if not c.efer & EFER_LMA:
            gva &= 0xFFFFFFFF
        self._invalidate_page(c, gva >> PAGE_SHIFT)
        return DONE

    def smi(self, v: int) -> Observation:
        c = self.cpus[v]
        if c.dead:
            return Observation(ObsKind.SHUTDOWN)
        if c.smm:
            return DONE
        c.saved = (c.cr0, c.cr3, c.cr4, c.efer)
        c.smm = 1
        c.cr0 &= ~(CR0_PE | CR0_PG | (1 << 2) | (1 << 3))
        c.cr4 = 0
        c.efer = 0
        self._flush_tlb(c)
        self._changed(c)
        return DONE

    def rsm(self, v: int) -> Observation:
        """RSM restores the saved state and reloads the PDPTEs if it returns to PAE paging; an
        invalid state shuts the processor down."""
        c = self.cpus[v]
        if c.dead:
            return Observation(ObsKind.SHUTDOWN)
        if not c.smm or c.saved is None:
            return Observation(ObsKind.UD)
        cr0, cr3, cr4, efer = c.saved
        c.saved = None
        c.smm = 0
        self._flush_tlb(c)
        self._changed(c)
        if cr0 & CR0_PG and cr4 & CR4_PAE and not efer & EFER_LMA and not self._load_pdptrs(c,
                                                                                            cr3):
            c.dead = True
            return Observation(ObsKind.SHUTDOWN)
        c.cr0, c.cr3, c.cr4, c.efer = cr0, cr3, cr4, efer
        return DONE

    # ------------------------------------------------------------------ VMM and host

    def set_memslot(self, upd: MemslotUpdate) -> Observation:
        try:
            old, new = self.phys.slots.check(upd)
        except MemslotError as exc:
            return Observation(ObsKind.REJECTED, detail=str(exc))
        if new is not old:
            # An optional walk is kept by host address, which a memslot change does not move:
            # it may still be taken back after it. One that needs a search for a speculative
            # translation is decided now, while the walks over the journal still read the
            # tables through the memslots of its time.
            self._decide_searches()
            self.phys.slots.install(old, new)
            if upd.change is not MemslotChange.CREATE:
                # Walks replayed over the journal read the tables through today's memslots:
                # none reaches back past a change that moved or removed guest memory. A new
                # memslot only makes gfns RAM that were not (walks through them failed then).
                self.barrier = len(self.journal)
        return DONE

    def migrate_page(self, as_id: int, gfn: int) -> Observation:
        slot = self.phys.slots.lookup(as_id, gfn)
        if slot is None:
            return Observation(ObsKind.REJECTED, detail=f"gfn {gfn:#x} is not RAM")
        self._decide_searches()  # as for a memslot change: the journal is about to move
        old, new = self.phys.migrate(slot.gfn_to_hva(gfn))

        def moved(addr: int) -> int:
            return (new << PAGE_SHIFT) | (addr & 0xFFF) if addr >> PAGE_SHIFT == old else addr

        # The contents moved with the page: so do its history and the optional walks' writes.
        self.journal = [(moved(addr), size, value) for addr, size, value in self.journal]
        self.optional = [opt._replace(writes=tuple((moved(a), size, o, n)
                                                   for a, size, o, n in opt.writes),
                                      reads=tuple((moved(a), size, want)
                                                  for a, size, want in opt.reads))
                         for opt in self.optional]
        return DONE


class OptionalWalk(NamedTuple):
    """A walk an access did that a cached translation made unnecessary."""

    writes: tuple[tuple[int, int, int, int], ...]  # the A/D writes: (host address, size, old,
    # new)
    vcpu: int
    page: int
    filled: TlbEntry | None  # the translation it cached, if that one was new
    journal_at: int  # where its writes start in the journal (if journalled)
    # What to search a speculative translation with, when no cached one explained the access:
    # (cpu state, access, address, write, width, value, the model's outcome, where the
    # search starts: the page's last invalidation as it was then, and the address space the
    # access ran in: an SMI or RSM before the search must not move it to the other one).
    search: tuple[CpuState, Access, int, bool, int, int, Observation, int, int] | None
    # The entries the walk read: (host address, entry size, the A/D bits the walk sets there).
    reads: tuple[tuple[int, int, int], ...]
    # Whether a later walk through its entries keeps some of its bits (``_settle``): taking it
    # back then leaves them, and the journal no longer says when they were set.
    kept: bool = False


def _by_entry(reads: Iterable[tuple[int, int, int]]) -> dict[int, tuple[int, int]]:
    """(host address, size, A/D bits) triples by address, the bits of an entry walked twice
    (aliased tables) merged."""
    needs: dict[int, tuple[int, int]] = {}
    for addr, size, want in reads:
        needs[addr] = (size, needs.get(addr, (size, 0))[1] | want)
    return needs


def _undo(mem: Memory, writes: Iterable[tuple[int, int, int, int]]
          ) -> list[tuple[int, int, int, int]]:
    """Take ``writes`` back, the last first; returns those it took back (for ``_redo``)."""
    undone = []
    for write in reversed(tuple(writes)):
        addr, size, old, new = write
        if mem.read(addr, size) == new:  # an entry rewritten since keeps its new value
            mem.write(addr, size, old)
            undone.append(write)
    undone.reverse()
    return undone


def _redo(mem: Memory, writes: Iterable[tuple[int, int, int, int]]) -> None:
    for gpa, size, _old, new in writes:
        mem.write(gpa, size, new)


def _take_back(mem: Memory, journal: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Take journalled writes (address, size, old value) back, the last first; returns what
    they had written, for ``_put_back``."""
    taken = []
    for addr, size, old in reversed(journal):
        taken.append((addr, size, mem.read(addr, size)))
        mem.write(addr, size, old)
    return taken


def _put_back(mem: Memory, taken: list[tuple[int, int, int]]) -> None:
    for addr, size, value in reversed(taken):
        mem.write(addr, size, value)


def _same_target(a: Observation, b: Observation) -> bool:
    """Same kind and same place (address or error code), whatever the data."""
    return a.kind is b.kind and a.addr == b.addr and a.error_code == b.error_code
