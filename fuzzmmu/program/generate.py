"""Random programs built at the op level, shaped like guest kernels: a working set of a few
addresses that get mapped, accessed, remapped, protected and flushed, tables edited where maps
put them, mode switches, SMM round trips, memslot changes and interleavings.

Used for soak tests, for seeding corpora, and by the op-level mutator to insert ops. Nothing
here inspects a machine: choices only use the world's tables and the program so far.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any, Final, cast

from fuzzmmu.model.mmu.internal import Point
from fuzzmmu.program import world as W
from fuzzmmu.program.ops import (
    MAP_FORMATS,
    Access,
    CrBit,
    Entry,
    Extra,
    GuestMode,
    Header,
    Interleave,
    Invlpg,
    LoadCr3,
    Map,
    Memslot,
    Migrate,
    MmuPages,
    Op,
    Program,
    Rsm,
    SetBit,
    SetMode,
    Shrink,
    Smi,
    Store,
    WritePte,
    ZapAll,
)
from fuzzmmu.world.layout import HOST_PAGES, new_world
from fuzzmmu.world.memslots import Memslot as MemslotInfo
from fuzzmmu.world.memslots import MemslotChange, MemslotError, MemslotUpdate
from fuzzmmu.world.observe import AccessKind

P, RW, US, A, D, NX = 1, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 63


_POINTS: Final = tuple(Point)
_CHANGES: Final = (MemslotChange.CREATE, MemslotChange.DELETE, MemslotChange.MOVE)
_CHANGE_WEIGHTS: Final = (3, 3, 1)
_CR_BITS: Final = tuple(CrBit)


# Copied per generator (a copy shares the tables until it installs a slot).
_BOOT_SLOTS: Final = new_world()[1]
# The control bits a vCPU leaves reset with (CR0.WP; CR4 and EFER clear) and keeps through
# an SMI, which clears CR4 and EFER but not CR0.WP (docs/x86-paging.md, SMI).
_BOOT_BITS: Final = frozenset({CrBit.WP})


def _bit(rng: random.Random, p: float) -> bool:
    return rng.random() < p


# The kinds of op the generator draws, with their weights. A swarm (Groce et al., "Swarm
# testing", ISSTA 2012) draws from a subset: leaving kinds out of a program lets the others
# pile up, which reaches states a program of everything dilutes.
OP_KINDS: Final = (("access", 30), ("map", 16), ("pte", 8), ("store", 3), ("invlpg", 5),
                   ("cr3", 4), ("set", 5), ("mode", 3), ("smm", 3), ("memslot", 2), ("host", 3),
                   ("interleave", 8))
_KIND_OF: Final = {Access: "access", Map: "map", WritePte: "pte", Store: "store", Invlpg: "invlpg",
                   LoadCr3: "cr3", SetBit: "set", SetMode: "mode", Smi: "smm", Rsm: "smm",
                   Memslot: "memslot", ZapAll: "host", Migrate: "host", Shrink: "host",
                   MmuPages: "host", Interleave: "interleave"}


def op_kind(op: Op) -> str:
    """The generator's kind of ``op`` (a name of OP_KINDS)."""
    return _KIND_OF[type(op)]


def kinds_of(program: Program) -> frozenset[str]:
    """The kinds of the program's top-level ops: the swarm its lineage keeps to."""
    return frozenset(_KIND_OF[type(op)] for op in program.ops)


class Generator:
    """Random ops for one program; ``vas`` is the program's working set."""

    def __init__(self, rng: random.Random, header: Header | None = None,
                 context: Program | None = None,
                 kinds: Collection[str] | Mapping[str, float] | None = None) -> None:
        """With ``context``, new ops aim at that program's addresses and table pools, as a
        kernel keeps touching what it mapped; with ``kinds``, ``op`` draws only those kinds
        (an interleave still needs a plain op for its first part, so one is kept), each
        weighed by the factor ``kinds`` maps it to, if it is a mapping."""
        self.rng = rng
        scale = kinds if isinstance(kinds, Mapping) else {}
        table: list[tuple[str, float]] = [(k, w * scale.get(k, 1.0)) for k, w in OP_KINDS
                                          if kinds is None or k in kinds]
        if all(k == "interleave" for k, _ in table):
            table.append(OP_KINDS[0])
        self._kinds = [k for k, _ in table]
        self._weights = [w for _, w in table]
        # An interleave's first part is a plain op, drawn without interleaves: drawing any op
        # and retrying on an interleave recursed (each draw may build a whole interleave),
        # and in a swarm mostly of interleaves that recursion did not end.
        self._simple_kinds = [k for k, _ in table if k != "interleave"]
        self._simple_weights = [w for k, w in table if k != "interleave"]
        self.header = header or self.random_header()
        ops = context.flat_ops() if context is not None else []
        # The VMM's memslots: the world's at boot, then as the program's memslot updates
        # leave them (an op inserted into a program sees those after its last one), and the
        # slots deleted on the way.
        self.memslots = _BOOT_SLOTS.copy()
        self.deleted: list[MemslotInfo] = []
        # Each vCPU in SMM or not, as the program's SMIs and RSMs leave it, and the control
        # bits it has on (a program's SetBits toggle them).
        self.in_smm = [False, False]
        boot = _BOOT_BITS | ({CrBit.PSE} if self.header.boot is GuestMode.BIT32_PSE else set())
        self.bits = [frozenset(boot), frozenset(boot)]
        self._saved_bits = list(self.bits)
        for op in ops:
            if isinstance(op, Memslot):
                self._apply(op)
            else:
                self._track(op)
        vas = sorted({op.va for op in ops if isinstance(op, Access | Map | Invlpg)})
        pools = sorted({op.pool for op in ops if isinstance(op, Map)})
        self.vas = vas or rng.sample(W.VAS, rng.randint(1, 4))
        self.pools = pools or [rng.choice(W.POOLS) for _ in range(2)]

    def random_header(self) -> Header:
        r = self.rng
        return Header(r.choice(("zap", "zap", "update")), r.choice((19, 19, 3, 2)),
                      r.choice((40, 40, 36, 46, 52)), r.choice((2000, 2000, 64, 32, 20)),
                      r.choice((GuestMode.LONG4, GuestMode.LONG4, GuestMode.PAE,
                                GuestMode.BIT32, GuestMode.BIT32_PSE, GuestMode.OFF)),
                      r.random() < 0.5)

    def entry(self, *, present: float = 0.9) -> Entry:
        r = self.rng
        flags = (P if _bit(r, present) else 0) | (RW if _bit(r, 0.7) else 0) | (
            US if _bit(r, 0.6) else 0) | (A if _bit(r, 0.6) else 0) | (D if _bit(r, 0.5) else 0)
        flags |= NX if _bit(r, 0.1) else 0
        target = r.choice(W.TARGETS[:64]) if _bit(r, 0.9) else r.choice(W.TARGETS)
        extra = r.choice(list(Extra)) if _bit(r, 0.1) else Extra.NONE
        return Entry(target, flags, extra)

    def va(self) -> int:
        return self.rng.choice(self.vas) if _bit(self.rng, 0.85) else self.rng.choice(W.VAS)

    def op(self) -> Op:
        return self._draw(self._kinds, self._weights)

    def simple_op(self) -> Op:
        return self._draw(self._simple_kinds, self._simple_weights)

    def _draw(self, kinds: list[str], weights: list[float]) -> Op:
        op: Op = getattr(self, f"_{self.rng.choices(kinds, weights)[0]}")()
        return op

    def _access(self) -> Access:
        r = self.rng
        kind = r.choices((AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH), (5, 4, 1))[0]
        width = r.choice(W.WIDTHS)
        offset = min(r.choice(W.OFFSETS), 4096 - width)
        return Access(r.randrange(2), kind, self.va(), offset, width, r.choice((0, 0, 3)),
                      _bit(r, 0.3), r.randrange(256) if kind is AccessKind.WRITE else 0)

    def _map(self) -> Map:
        r = self.rng
        e = self.entry()
        entry = Entry(e.target, e.flags & ~(1 << 7), e.extra)
        fmt = r.choice(MAP_FORMATS)
        level = r.choice(W.MAP_LEVELS)
        if fmt not in (None, GuestMode.LONG4):
            level = min(level, 2)
        upper = (RW if _bit(r, 0.85) else 0) | (US if _bit(r, 0.85) else 0) | (
            A if _bit(r, 0.5) else 0) | (NX if _bit(r, 0.1) else 0)
        return Map(r.randrange(2), r.choice(W.MAP_ROOTS), fmt, self.va(), entry, level, upper,
                   r.choice(self.pools) if _bit(r, 0.8) else r.choice(W.POOLS))

    def _pte(self) -> WritePte:
        r = self.rng
        width = r.choice((8, 8, 8, 4))
        # Tables sit at pool frames (and roots); slots are the world's.
        frame = r.choice(W.ROOTS) if _bit(r, 0.3) else r.choice(self.pools) + r.randrange(4)
        return WritePte(r.randrange(2), frame, r.choice(W.SLOTS) % (4096 // width),
                        self.entry(present=0.7), width)

    def _store(self) -> Store:
        r = self.rng
        width = r.choice(W.WIDTHS)
        frame = r.choice(self.pools) + r.randrange(4)
        return Store(r.randrange(2), frame, min(r.choice(W.STORE_OFFSETS), 4096 - width), width,
                     self.entry())

    def _invlpg(self) -> Invlpg:
        return Invlpg(self.rng.randrange(2), self.va())

    def _cr3(self) -> LoadCr3:
        return LoadCr3(self.rng.randrange(2), self.rng.choice(W.ROOTS))

    def _set(self) -> SetBit:
        op = SetBit(self.rng.randrange(2), self.rng.choice(_CR_BITS), _bit(self.rng, 0.6))
        self._track(op)
        return op

    def flip(self, vcpu: int) -> SetBit:
        """One of ``vcpu``'s control bits flipped."""
        bit = self.rng.choice(_CR_BITS)
        op = SetBit(vcpu, bit, bit not in self.bits[vcpu])
        self._track(op)
        return op

    def switch_space(self, vcpu: int) -> Op:
        """``vcpu`` moved to its other address space: an SMI outside SMM, an RSM inside."""
        op = Rsm(vcpu) if self.in_smm[vcpu] else Smi(vcpu)
        self._track(op)
        return op

    def memslot_update(self) -> Memslot:
        """A memslot update the VMM could make now (see ``_memslot``)."""
        return self._memslot()

    def cover(self, as_id: int, gfn: int) -> Memslot | None:
        """A create the VMM could make now that gives ``gfn`` memory in address space
        ``as_id`` (a region of the world's bases and sizes over it, in the first free slot),
        mostly with the region's own host pages; None where none fits or the gfn has memory."""
        r = self.rng
        slot = next((s for s in range(4) if s not in self.memslots.spaces[as_id]), None)
        if slot is None or self.memslots.lookup(as_id, gfn) is not None:
            return None
        regions = [(b, n) for b in W.SLOT_BASES for n in W.SLOT_SIZES
                   if b <= gfn < b + n and self._valid(MemslotUpdate(
                       MemslotChange.CREATE, as_id, slot, b, n))]
        if not regions:
            return None
        base, npages = r.choice(regions)
        hvas = [h for h in W.SLOT_HVAS if h + npages <= HOST_PAGES]
        hva = base if base in hvas and _bit(r, 0.7) else r.choice(hvas)
        return Memslot(as_id, slot, MemslotChange.CREATE, base, npages, hva)

    def _mode(self) -> SetMode:
        op = SetMode(self.rng.randrange(2), self.rng.choice(list(GuestMode)),
                     self.rng.choice(W.ROOTS))
        self._track(op)
        return op

    def _smm(self) -> Op:
        """Mostly the transition the vCPU can make: an SMI outside SMM, an RSM inside (an RSM
        outside SMM is #UD, an SMI inside is only latched)."""
        r = self.rng
        v = r.randrange(2)
        enter = not self.in_smm[v] if _bit(r, 0.8) else _bit(r, 0.5)
        op = Smi(v) if enter else Rsm(v)
        self._track(op)
        return op

    def _track(self, op: Op) -> None:
        """The vCPU's SMM state and control bits after ``op``."""
        if isinstance(op, SetBit):
            bits = self.bits[op.vcpu]
            self.bits[op.vcpu] = bits | {op.bit} if op.on else bits - {op.bit}
        elif isinstance(op, SetMode):
            # A mode switch sets CR4.PSE for 32-bit paging with PSE and clears it otherwise.
            bits = self.bits[op.vcpu] - {CrBit.PSE}
            self.bits[op.vcpu] = bits | {CrBit.PSE} if op.mode is GuestMode.BIT32_PSE else bits
        elif isinstance(op, Smi) and not self.in_smm[op.vcpu]:
            self.in_smm[op.vcpu] = True
            self._saved_bits[op.vcpu] = self.bits[op.vcpu]
            self.bits[op.vcpu] = self.bits[op.vcpu] & _BOOT_BITS
        elif isinstance(op, Rsm) and self.in_smm[op.vcpu]:
            self.in_smm[op.vcpu] = False
            self.bits[op.vcpu] = self._saved_bits[op.vcpu]

    def _memslot(self) -> Memslot:
        """A memslot update the VMM could make (KVM_SET_USER_MEMORY_REGION would take it):
        delete or move a slot the program has, create one in a free slot over free gfns,
        often where a deleted slot was and with its host pages (a VMM re-registering a region,
        as QEMU deletes and re-creates a slot to change it). Drawn blindly, 28% of the
        updates were valid, and a deleted region almost never came back."""
        r = self.rng
        # Moves are rarer than deletes and creates (VMMs hardly move slots; KVM_MR_MOVE
        # shifts every gfn of the slot, after which a page table the guest wrote through it
        # names other host pages in the two address spaces, where the oracle stops).
        change = r.choices(_CHANGES, _CHANGE_WEIGHTS)[0]
        if _bit(r, 0.1):  # now and then anything: what the VMM may get wrong
            op = self._any_memslot(change)
        elif change is MemslotChange.DELETE and (ids := self._slot_ids()):
            as_id, slot = r.choice(ids)
            op = Memslot(as_id, slot, change)
        elif change is MemslotChange.MOVE and (ids := self._slot_ids()):
            as_id, slot = r.choice(ids)
            at = self.memslots.spaces[as_id][slot].base_gfn
            bases = [b for b in W.SLOT_BASES
                     if b != at and self._valid(MemslotUpdate(change, as_id, slot, b))]
            op = Memslot(as_id, slot, change, r.choice(bases)) if bases else \
                self._any_memslot(change)
        else:
            op = self._create()
        self._apply(op)
        return op

    def _create(self) -> Memslot:
        r = self.rng
        change = MemslotChange.CREATE
        spaces = self.memslots.spaces
        free_ids = [(a, s) for a in range(2) for s in range(4) if s not in spaces[a]]
        if not free_ids:
            return self._any_memslot(change)
        # A VMM re-registering a region it deleted (QEMU deletes and re-creates a slot to
        # change it): the region's address space, base and host pages, under its old slot id
        # where that is free, half the time as much of it as one update of the world's sizes
        # brings back. (Drawn as any other create, after a delete of memslot 0 fewer than half
        # the creates brought the region back and one in eight covered its page tables: what
        # KVM cached about the gfns while they had no memslot was seldom put to the test.)
        if self.deleted and _bit(r, 0.6):
            g = r.choice(self.deleted)
            ids = [s for a, s in free_ids if a == g.as_id]
            if ids and g.base_gfn in W.SLOT_BASES and g.hva in W.SLOT_HVAS:
                slot = g.slot_id if g.slot_id in ids else r.choice(ids)
                sizes = [n for n in W.SLOT_SIZES if n <= g.npages and self._valid(
                    MemslotUpdate(change, g.as_id, slot, g.base_gfn, n))]
                if sizes:
                    npages = max(sizes) if _bit(r, 0.5) else r.choice(sizes)
                    return Memslot(g.as_id, slot, change, g.base_gfn, npages, g.hva)
        as_id, slot = r.choice(free_ids)

        def fits(base: int, npages: int) -> bool:
            return self._valid(MemslotUpdate(change, as_id, slot, base, npages))

        regions = [(b, n) for b in W.SLOT_BASES for n in W.SLOT_SIZES if fits(b, n)]
        if not regions:
            return self._any_memslot(change)
        base, npages = r.choice(regions)
        hvas = [h for h in W.SLOT_HVAS if h + npages <= HOST_PAGES]
        # Mostly the host pages the other address space maps at these gfns, as a VMM lays
        # out SMM's view over normal RAM: a gfn naming different host pages in the two
        # spaces is legal, but a table written through it ends what the oracle compares.
        same = [m.gfn_to_hva(base) for m in self.memslots.slots(1 - as_id)
                if m.contains(base) and m.gfn_to_hva(base) in hvas]
        return Memslot(as_id, slot, change, base, npages,
                       r.choice(same if same and _bit(r, 0.8) else hvas))

    def _any_memslot(self, change: MemslotChange) -> Memslot:
        r = self.rng
        if change is MemslotChange.DELETE:
            return Memslot(r.randrange(2), r.randrange(4), change)
        if change is MemslotChange.MOVE:
            return Memslot(r.randrange(2), r.randrange(4), change, r.choice(W.SLOT_BASES))
        return Memslot(r.randrange(2), r.randrange(4), change, r.choice(W.SLOT_BASES),
                       r.choice(W.SLOT_SIZES), r.choice(W.SLOT_HVAS))

    def _slot_ids(self) -> list[tuple[int, int]]:
        return sorted((m.as_id, m.slot_id) for m in self.memslots.all_slots())

    def _valid(self, upd: MemslotUpdate) -> bool:
        """Whether KVM_SET_USER_MEMORY_REGION takes ``upd`` now (Memslots.check)."""
        try:
            self.memslots.check(upd)
        except MemslotError:
            return False
        return True

    def _apply(self, op: Memslot) -> None:
        """The slots after ``op`` (an update KVM rejects changes nothing)."""
        try:
            old, new = self.memslots.check(
                MemslotUpdate(op.change, op.as_id, op.slot, op.base, op.npages, op.hva))
        except MemslotError:
            return
        if old is not new:
            self.memslots.install(old, new)
        if old is not None and new is None:
            self.deleted.append(old)

    def _host(self) -> Op:
        r = self.rng
        k = r.randrange(4)
        if k == 0:
            return ZapAll()
        if k == 1:
            return Migrate(r.randrange(2), r.choice(W.TARGETS[:64]))
        if k == 2:
            return Shrink(r.choice(W.SHRINK_COUNTS))
        return MmuPages(r.choice(W.MAX_PAGES))

    def _interleave(self) -> Interleave:
        """An op, and what happens while it is inside KVM at a point: drawn to fit the point,
        or the second part cannot run there and the interleave is two ops in a row (of the
        interleaves drawn without that fit, 4% ran their second part at the point)."""
        r = self.rng
        point = r.choice(_POINTS)
        # A memslot update reaches its publish point (kvm_swap_active_memslots()); the other
        # points are on a vCPU's page-fault path, which an access reaches, or a map's or a
        # PTE write's stores.
        if point is Point.MEMSLOT_PUBLISH:
            first: Op = self._memslot()
        else:
            first = self._access() if _bit(r, 0.8) else self.simple_op()
        # What runs meanwhile: the host (no mmu_lock at these points) or another vCPU, never
        # the faulting vCPU itself nor a memslot update (it waits for the fault path's SRCU
        # readers); inside mmu_lock (PRE_LEAF) only another vCPU's access that needs no exit.
        other = 1 - getattr(first, "vcpu", r.randrange(2))
        if point.locked:
            builders: tuple[Callable[[], Op], ...] = (self._access,)
        else:
            builders = (self._pte, self._map, self._host, self._access, self._invlpg)
        second = tuple(_on_vcpu(r.choice(builders)(), other)
                       for _ in range(r.choice((1, 1, 2, 3))))
        return Interleave(point, first, second)

    def program(self, n_ops: int) -> Program:
        ops: list[Op] = []
        records = 0
        while len(ops) < n_ops:
            op = self._map() if len(ops) < 2 else self.op()
            size = 2 + len(op.second) if isinstance(op, Interleave) else 1
            if records + size > 64:
                break
            ops.append(op)
            records += size
        return Program(self.header, tuple(ops))


def _on_vcpu(op: Op, vcpu: int) -> Op:
    """``op`` run by ``vcpu`` (a host op as it is). Every op class is a dataclass; the base
    class is not, hence the cast."""
    if not hasattr(op, "vcpu"):
        return op
    moved: Op = replace(cast(Any, op), vcpu=vcpu)
    return moved


def random_program(rng: random.Random, n_ops: int = 20) -> Program:
    return Generator(rng).program(n_ops)
