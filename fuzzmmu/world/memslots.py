"""The VMM's view of guest memory: memslots in two address spaces, and host page mappings.

This is VMM and host state, not KVM MMU state: the model machine and the reference machine each
keep their own copy and apply the same updates. A gfn maps to a host-virtual page through the
memslot of its address space (0: normal, 1: SMM), and a host-virtual page maps to a backing
frame through the host page tables (which the host may change: page migration, seen by KVM as
an MMU-notifier invalidation). A gfn in no memslot of a space is MMIO there.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from fuzzmmu.arch.bits import PAGE_SHIFT
from fuzzmmu.world.memory import GuestMemory, GuestMemoryError

NUM_ADDRESS_SPACES: Final = 2
GEN_UPDATE_IN_PROGRESS: Final = 1 << 63  # KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS


class MemslotError(ValueError):
    """A memslot update the VMM ioctl would reject (KVM_SET_USER_MEMORY_REGION -EINVAL/-EEXIST)."""


@dataclass(frozen=True, eq=False)
class Memslot:
    """One memslot. Identity matters (eq=False): KVM keeps per-slot metadata (rmaps, write
    tracking), and a moved slot is a new slot even where its fields repeat an old one's."""

    as_id: int
    slot_id: int
    base_gfn: int
    npages: int
    hva: int  # first host-virtual page number

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def gfn_to_hva(self, gfn: int) -> int:
        return self.hva + gfn - self.base_gfn


class MemslotChange(enum.Enum):
    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"


@dataclass(frozen=True)
class MemslotUpdate:
    """One KVM_SET_USER_MEMORY_REGION call. ``base_gfn``, ``npages`` and ``hva`` are used by
    CREATE; MOVE uses ``base_gfn`` only."""

    change: MemslotChange
    as_id: int
    slot_id: int
    base_gfn: int = 0
    npages: int = 0
    hva: int = 0


class Memslots:
    """Both address spaces' memslots and their generations.

    Generations are per address space and unique across them (KVM starts space i at i and
    adds the number of spaces per update; kvm_swap_active_memslots() publishes the new slots
    with GEN_UPDATE_IN_PROGRESS first). ``install`` changes content only: whoever models the
    update (the shadow MMU's VM) moves the generation.
    """

    __slots__ = ("_aliases", "_derived", "_irregular", "_owned", "_split", "by_gfn",
                 "generation", "host_pages", "hva_table", "spaces")

    def __init__(self, host_pages: int) -> None:
        self.host_pages = host_pages
        self.spaces: list[dict[int, Memslot]] = [{} for _ in range(NUM_ADDRESS_SPACES)]
        self.generation = list(range(NUM_ADDRESS_SPACES))
        # Per address space, every gfn of every memslot (slots map existing host pages, so
        # these stay small): its slot (``by_gfn``, which the shadow MMU's hot paths read
        # directly), and its host-virtual page, which PhysMemory reads on every
        # guest-physical access. A gfn that is not a key is MMIO.
        self.by_gfn: list[dict[int, Memslot]] = [{} for _ in range(NUM_ADDRESS_SPACES)]
        self.hva_table: list[dict[int, int]] = [{} for _ in range(NUM_ADDRESS_SPACES)]
        # What KVM's write tracking, which is per gfn, cannot follow (``aliases``, ``split``
        # and ``irregular``, derived from the tables when first read after an ``install``:
        # only the reference machine reads them).
        self._aliases: dict[int, tuple[int, ...]] = {}
        self._split: frozenset[int] = frozenset()
        self._irregular = False
        self._derived = True
        # Whether ``spaces``, ``by_gfn`` and ``hva_table`` are this object's alone: a copy
        # shares them with its source until either installs a memslot (a program copies the
        # world's memslots two or three times and changes them in few programs).
        self._owned = True

    def copy(self) -> Memslots:
        if not self._derived:  # derived once for every copy (each reference machine's world)
            self._derive()
        other = Memslots(self.host_pages)
        other.spaces, other.by_gfn, other.hva_table = self.spaces, self.by_gfn, self.hva_table
        self._owned = other._owned = False
        other.generation = list(self.generation)
        other._aliases, other._split = self._aliases, self._split  # replaced, never changed
        other._irregular, other._derived = self._irregular, self._derived
        return other

    def lookup(self, as_id: int, gfn: int) -> Memslot | None:
        return self.by_gfn[as_id].get(gfn)

    def slots(self, as_id: int) -> list[Memslot]:
        return sorted(self.spaces[as_id].values(), key=lambda s: s.base_gfn)

    def all_slots(self) -> list[Memslot]:
        return [s for as_id in range(NUM_ADDRESS_SPACES) for s in self.slots(as_id)]

    def check(self, upd: MemslotUpdate) -> tuple[Memslot | None, Memslot | None]:
        """Validate ``upd`` as KVM's __kvm_set_memory_region would; return (old, new).
        A move to where the slot already is changes nothing: (old, old)."""
        if not 0 <= upd.as_id < NUM_ADDRESS_SPACES:
            raise MemslotError(f"address space {upd.as_id} does not exist")
        space = self.spaces[upd.as_id]
        old = space.get(upd.slot_id)
        if upd.change is MemslotChange.DELETE:
            if old is None:
                raise MemslotError(f"slot {upd.as_id}:{upd.slot_id} does not exist")
            return old, None
        if upd.change is MemslotChange.CREATE:
            if old is not None:
                raise MemslotError(f"slot {upd.as_id}:{upd.slot_id} already exists")
            if upd.npages <= 0 or upd.hva < 0 or upd.hva + upd.npages > self.host_pages:
                raise MemslotError("memslot must map existing host memory")
            new = Memslot(upd.as_id, upd.slot_id, upd.base_gfn, upd.npages, upd.hva)
        else:
            if old is None:
                raise MemslotError(f"slot {upd.as_id}:{upd.slot_id} does not exist")
            if upd.base_gfn == old.base_gfn:
                return old, old
            new = Memslot(upd.as_id, upd.slot_id, upd.base_gfn, old.npages, old.hva)
        if new.base_gfn < 0:
            raise MemslotError("negative gfn")
        for other in space.values():
            if other.slot_id != upd.slot_id and (new.base_gfn < other.end_gfn
                                                  and other.base_gfn < new.end_gfn):
                raise MemslotError(f"slot {upd.as_id}:{upd.slot_id} would overlap slot "
                                   f"{other.as_id}:{other.slot_id}")
        return old, new

    def install(self, old: Memslot | None, new: Memslot | None) -> None:
        """Replace ``old`` by ``new`` (either may be None)."""
        slot = new or old
        assert slot is not None
        if not self._owned:
            self.spaces = [dict(s) for s in self.spaces]
            self.by_gfn = [dict(m) for m in self.by_gfn]
            self.hva_table = [dict(t) for t in self.hva_table]
            self._owned = True
        space = self.spaces[slot.as_id]
        by_gfn = self.by_gfn[slot.as_id]
        hvas = self.hva_table[slot.as_id]
        if old is not None:
            del space[old.slot_id]
            for gfn in range(old.base_gfn, old.end_gfn):
                del by_gfn[gfn]
                del hvas[gfn]
        if new is not None:
            space[new.slot_id] = new
            for gfn in range(new.base_gfn, new.end_gfn):
                by_gfn[gfn] = new
                hvas[gfn] = new.gfn_to_hva(gfn)
        self._derived = False

    @property
    def aliases(self) -> dict[int, tuple[int, ...]]:
        """Host pages that more than one gfn number maps: hva -> those gfns."""
        if not self._derived:
            self._derive()
        return self._aliases

    @property
    def split(self) -> frozenset[int]:
        """The gfns that name different host pages in the two address spaces."""
        if not self._derived:
            self._derive()
        return self._split

    @property
    def irregular(self) -> bool:
        """Whether there is an alias or a split gfn."""
        if not self._derived:
            self._derive()
        return self._irregular

    def _derive(self) -> None:
        gfns_of: dict[int, set[int]] = {}
        for table in self.hva_table:
            for gfn, hva in table.items():
                gfns_of.setdefault(hva, set()).add(gfn)
        self._aliases = {hva: tuple(sorted(g)) for hva, g in gfns_of.items() if len(g) > 1}
        first, second = self.hva_table
        self._split = frozenset(g for g, hva in first.items() if second.get(g, hva) != hva)
        self._irregular = bool(self._aliases or self._split)
        self._derived = True


class HostMap:
    """Host page tables for guest RAM: host-virtual page -> backing frame, and a pool of spare
    frames for page migration (what a host does under THP compaction or NUMA balancing)."""

    __slots__ = ("pfn", "spare")

    def __init__(self, host_pages: int, spare_frames: list[int]) -> None:
        self.pfn = list(range(host_pages))
        self.spare = list(spare_frames)

    def copy(self) -> HostMap:
        other = HostMap(0, self.spare)
        other.pfn = list(self.pfn)
        return other

    def migrate(self, hva: int) -> tuple[int, int]:
        """Move host page ``hva`` to the oldest spare frame; return (old pfn, new pfn). The
        caller copies the contents. The old frame becomes the newest spare."""
        old = self.pfn[hva]
        new = self.spare.pop(0)
        self.spare.append(old)
        self.pfn[hva] = new
        return old, new


class PhysMemory:
    """Guest-physical memory of one machine: gfn -> memslot (per address space) -> host page ->
    backing frame. Reads and writes return None / False where there is no memslot."""

    __slots__ = ("backing", "host", "slots")

    def __init__(self, backing: GuestMemory, slots: Memslots, host: HostMap) -> None:
        self.backing = backing
        self.slots = slots
        self.host = host

    def copy(self) -> PhysMemory:
        return PhysMemory(self.backing.copy(), self.slots.copy(), self.host.copy())

    def release(self) -> None:
        """The owner is done with this memory (GuestMemory.release)."""
        self.backing.release()

    def gfn_to_pfn(self, as_id: int, gfn: int) -> int:
        """Backing frame of ``gfn`` in address space ``as_id``; -1 when it is MMIO there."""
        hva = self.slots.hva_table[as_id].get(gfn, -1)
        return self.host.pfn[hva] if hva >= 0 else -1

    def read(self, as_id: int, gpa: int, size: int) -> int | None:
        hva = self.slots.hva_table[as_id].get(gpa >> PAGE_SHIFT, -1)  # gfn_to_pfn(), inline
        if hva < 0:
            return None
        return self.backing.read((self.host.pfn[hva] << PAGE_SHIFT) | (gpa & 0xFFF), size)

    def read_many(self, as_id: int, gpa: int, size: int, count: int) -> list[int] | None:
        """``count`` consecutive values of ``size`` bytes from ``gpa``, all in one page."""
        pfn = self.gfn_to_pfn(as_id, gpa >> PAGE_SHIFT)
        if pfn < 0:
            return None
        return self.backing.read_many((pfn << PAGE_SHIFT) | (gpa & 0xFFF), size, count)

    def write(self, as_id: int, gpa: int, size: int, value: int) -> bool:
        hva = self.slots.hva_table[as_id].get(gpa >> PAGE_SHIFT, -1)  # gfn_to_pfn(), inline
        if hva < 0:
            return False
        self.backing.write((self.host.pfn[hva] << PAGE_SHIFT) | (gpa & 0xFFF), size, value)
        return True

    def view(self, as_id: int) -> AddressSpaceView:
        return AddressSpaceView(self, as_id)

    def migrate(self, hva: int) -> tuple[int, int]:
        """Host page migration: copy ``hva``'s frame to a spare one and remap it."""
        old, new = self.host.migrate(hva)
        self.backing.page(new)[:] = self.backing.page(old)
        self.backing.dirty.add(new)
        return old, new


class AddressSpaceView:
    """One address space as flat guest-physical memory (the reference walker's Memory): MMIO
    holes raise GuestMemoryError."""

    __slots__ = ("as_id", "phys")

    def __init__(self, phys: PhysMemory, as_id: int) -> None:
        self.phys = phys
        self.as_id = as_id

    def read(self, gpa: int, size: int) -> int:
        phys = self.phys
        hva = phys.slots.hva_table[self.as_id].get(gpa >> PAGE_SHIFT, -1)  # gfn_to_pfn()
        if hva < 0:
            raise GuestMemoryError(f"gpa {gpa:#x} is not RAM in address space {self.as_id}")
        return phys.backing.read((phys.host.pfn[hva] << PAGE_SHIFT) | (gpa & 0xFFF), size)

    def write(self, gpa: int, size: int, value: int) -> None:
        if not self.phys.write(self.as_id, gpa, size, value):
            raise GuestMemoryError(f"gpa {gpa:#x} is not RAM in address space {self.as_id}")
