"""The fixed world every program starts from: host memory, memslots, SMRAM and the guest
kernel's direct map of its own memory.

Guest frames 0..63. Address space 0 maps gfns 0-47 and 56-63 to RAM and leaves 48-55 as an MMIO
hole; address space 1 (SMM) maps the same RAM plus SMRAM at gfns 48-55 (host pages 64-71), as
QEMU's Q35 does with its compatibility SMRAM. Host frames 72-79 are spare frames for page
migration.

The guest kernel reaches any frame F at the direct-map address DIRECT_MAP + F*4096 (32 bits
wide outside long mode) through four tables in frames 60-63:

* 32-bit paging: PDE 768 of the root -> DM_PT32 (4-byte PTEs);
* PAE: PDPTE 3 of the root -> DM_PD64 -> PDE 0 -> DM_PT64;
* 4-level: PML4E 511 of the root -> DM_PDPT -> PDPTE 3 -> DM_PD64 -> DM_PT64.

Like Linux's pgd_alloc(), the kernel copies its half into a new root before loading it (the
program executor does that with guest stores). Programs may overwrite any of it: that is a guest
that broke its own kernel mapping, and both model and reference must agree on what follows.
"""

from __future__ import annotations

import functools
from typing import Final

from fuzzmmu.arch.bits import PAGE_SHIFT, PTE_A, PTE_D, PTE_P, PTE_W, PagingMode
from fuzzmmu.world.memory import GuestMemory
from fuzzmmu.world.memslots import HostMap, Memslot, Memslots

NUM_GFNS: Final = 64
MMIO_HOLE: Final = range(48, 56)
SMRAM_HVA: Final = 64
SPARE_FRAMES: Final = list(range(72, 80))
HOST_PAGES: Final = 72  # host-virtual pages backing guest RAM and SMRAM
BACKING_FRAMES: Final = 80

DM_PT32: Final = 60
DM_PT64: Final = 61
DM_PD64: Final = 62
DM_PDPT: Final = 63
DIRECT_MAP: Final = 0xFFFF_FF80_C000_0000  # PML4E 511, PDPTE 3; low 32 bits 0xC0000000

# Where the kernel half lives in a root table of each mode, and the entry it holds.
DM_LINK: Final[dict[PagingMode, tuple[int, int, int]]] = {  # mode -> (byte offset, size, value)
    PagingMode.BIT32: (768 * 4, 4, (DM_PT32 << PAGE_SHIFT) | PTE_P | PTE_W | PTE_A),
    PagingMode.PAE: (3 * 8, 8, (DM_PD64 << PAGE_SHIFT) | PTE_P),
    PagingMode.LONG4: (511 * 8, 8, (DM_PDPT << PAGE_SHIFT) | PTE_P | PTE_W | PTE_A),
}

DEFAULT_SLOTS: Final = (
    Memslot(0, 0, 0, 48, 0),
    Memslot(0, 1, 56, 8, 56),
    Memslot(1, 0, 0, 48, 0),
    Memslot(1, 1, 56, 8, 56),
    Memslot(1, 2, 48, 8, SMRAM_HVA),
)


def direct_map_va(mode: PagingMode, gpa: int) -> int:
    """The kernel's virtual address for ``gpa`` in ``mode`` (identity with paging off)."""
    if mode is PagingMode.OFF:
        return gpa
    va = DIRECT_MAP + gpa
    return va if mode >= PagingMode.LONG4 else va & 0xFFFFFFFF


def new_world() -> tuple[GuestMemory, Memslots, HostMap]:
    """Backing memory with the direct-map tables written, the default memslots, identity host
    mappings. Fresh copies of one template: nothing is shared between machines."""
    mem, slots, host = _template()
    return mem.copy(), slots.copy(), host.copy()


@functools.cache
def _template() -> tuple[GuestMemory, Memslots, HostMap]:
    mem = GuestMemory(BACKING_FRAMES)
    slots = Memslots(HOST_PAGES)
    for slot in DEFAULT_SLOTS:
        slots.install(None, slot)
    leaf = PTE_P | PTE_W | PTE_A | PTE_D
    for gfn in range(NUM_GFNS):
        mem.write((DM_PT32 << PAGE_SHIFT) + 4 * gfn, 4, (gfn << PAGE_SHIFT) | leaf)
        mem.write((DM_PT64 << PAGE_SHIFT) + 8 * gfn, 8, (gfn << PAGE_SHIFT) | leaf)
    mem.write(DM_PD64 << PAGE_SHIFT, 8, (DM_PT64 << PAGE_SHIFT) | PTE_P | PTE_W | PTE_A)
    mem.write((DM_PDPT << PAGE_SHIFT) + 3 * 8, 8, (DM_PD64 << PAGE_SHIFT) | PTE_P | PTE_W | PTE_A)
    mem.settle()
    return mem, slots, HostMap(HOST_PAGES, SPARE_FRAMES)
