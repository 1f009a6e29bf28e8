"""The agent's code and memory image, and where it sits in the world: nothing here runs a VM."""

from __future__ import annotations

import struct

from fuzzmmu.kvm import agent as A
from fuzzmmu.program import world as W
from fuzzmmu.world.layout import NUM_GFNS


def test_every_template_assembles_into_the_agents_code_pages() -> None:
    for v in range(2):
        code = A.agent_code(v)
        assert 0 < len(code.code) <= 2 * A.PAGE
        base = A.va(8 + 2 * v)
        for name in ("ping", "invlpg", "mov_cr0", "mov_cr3", "mov_cr4", "wrmsr_efer", "to_user",
                     "to_user_poisoned", "to_kernel_poisoned",
                     *(f"k_{k}{w}" for k in ("read", "write") for w in (1, 2, 4, 8))):
            assert base <= code.entry[name] < base + len(code.code)
        for name in (f"u_{k}{w}" for k in ("read", "write") for w in (1, 2, 4, 8)):
            assert code.access_at[name] < code.ud2_at[name]
        # One HLT per vector and one per CPL0 template, each telling which it is.
        assert sorted(x for x in code.exits.values() if x != A.DONE) == list(range(32))
        assert len(set(code.exits)) == len(code.exits)


def test_the_image_maps_the_agent_and_points_the_idt_at_the_stubs() -> None:
    img = A.agent_image(2)
    q = lambda off: struct.unpack_from("<Q", img, off)[0]  # noqa: E731
    assert q(0) == A.gpa(1) | A.LINK_FLAGS  # PDPT[0] -> PD
    assert q(A.PAGE) == A.gpa(2) | A.LINK_FLAGS  # PD[0] -> PT
    for i in range(A.AGENT_PAGES):
        assert q(2 * A.PAGE + 8 * i) == A.gpa(i) | A.PAGE_FLAGS
    for v in range(2):
        layout, code = A.VcpuLayout(v), A.agent_code(v)
        for vector, stub in code.stubs.items():
            low, high = q(layout.idt + 16 * vector), q(layout.idt + 16 * vector + 8)
            assert (low & 0xFFFF) | ((low >> 48) << 16) | (high << 32) == stub
            assert (low >> 16) & 0xFFFF == A.KCODE and (low >> 32) & 7 == 1  # IST1
        assert q(layout.tss + 0x24) == layout.ist_top


def test_no_program_op_writes_the_agents_root_entry() -> None:
    """The agent's PML4E sits at a byte range of a root frame that no pte, store or access
    offset of the world reaches."""
    lo, hi = A.AGENT_LINK_OFFSET, A.AGENT_LINK_OFFSET + 8
    reached = set()
    for width in (4, 8):
        for slot in W.SLOTS:
            off = (slot % (4096 // width)) * width
            reached.update(range(off, off + width))
    for off in W.STORE_OFFSETS:
        reached.update(range(off, off + 8))
    for off in W.OFFSETS:
        reached.update(range(off, off + 8))
    assert not reached & set(range(lo, hi))
    assert {va >> 39 & 511 for va in W.VAS} & {A.AGENT_PML4_INDEX} == set()


def test_the_agents_memory_is_outside_every_target_and_below_every_maxphyaddr() -> None:
    end = A.AGENT_GFN + A.AGENT_PAGES
    assert A.AGENT_GFN >= NUM_GFNS and end <= 1 << (min(W.MAXPHYADDRS) - 12)
    for target in W.TARGETS:
        for span in (1, 512):  # the frame, or the 2 MiB page of an aligned target
            first = target & ~(span - 1)
            assert first + span <= A.AGENT_GFN or first >= end
    for seed in range(256):  # a 4-byte store of a seed byte repeated
        assert not A.AGENT_GFN <= (seed * 0x01010101) >> 12 < end
