"""GuestMemory: little-endian 1/2/4/8-byte accesses at any alignment, bounds, copies."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzzmmu.arch.bits import PAGE_SIZE
from fuzzmmu.world.memory import GuestMemory, GuestMemoryError

SIZES = (1, 2, 4, 8)


def _pattern(n: int) -> bytes:
    return bytes((i * 37 + 11) & 0xFF for i in range(n))


def _filled(pages: int) -> tuple[GuestMemory, bytearray]:
    mem = GuestMemory(pages)
    ref = bytearray(_pattern(pages * PAGE_SIZE))
    for gpa, b in enumerate(ref):
        mem.write(gpa, 1, b)
    return mem, ref


def test_new_memory_is_zeroed_and_sized():
    mem = GuestMemory(3)
    assert mem.num_pages == 3
    assert mem.size == 3 * PAGE_SIZE
    for size in SIZES:
        for gpa in (0, 1, 0xFFF, 0x1000, 3 * PAGE_SIZE - size):
            assert mem.read(gpa, size) == 0


@pytest.mark.parametrize("pages", [0, -1])
def test_needs_at_least_one_page(pages):
    with pytest.raises(ValueError):
        GuestMemory(pages)


# Offsets around the start, an 8-byte entry boundary and the page boundary, so that every size
# is tried at every alignment, straddling entries and pages.
OFFSETS = list(range(0, 24)) + list(range(PAGE_SIZE - 12, PAGE_SIZE + 12))


@pytest.mark.parametrize("size", SIZES)
def test_read_all_alignments_little_endian(size):
    mem, ref = _filled(2)
    for gpa in OFFSETS:
        assert mem.read(gpa, size) == int.from_bytes(ref[gpa:gpa + size], "little"), hex(gpa)


@pytest.mark.parametrize("size", SIZES)
def test_write_all_alignments_little_endian(size):
    for gpa in OFFSETS:
        mem, ref = _filled(2)
        value = int.from_bytes(bytes(range(0xA1, 0xA1 + size)), "little")
        mem.write(gpa, size, value)
        ref[gpa:gpa + size] = value.to_bytes(size, "little")
        # The bytes written, and only them, changed.
        for b in range(max(0, gpa - 9), min(len(ref), gpa + size + 9)):
            assert mem.read(b, 1) == ref[b], (hex(gpa), hex(b))
        assert mem.read(gpa, size) == value
        assert mem.read(gpa, 1) == 0xA1  # least significant byte first
        assert mem.read(gpa + size - 1, 1) == 0xA0 + size


def test_byte_order_across_sizes():
    mem = GuestMemory(1)
    mem.write(0x10, 8, 0x0807060504030201)
    assert [mem.read(0x10 + i, 1) for i in range(8)] == list(range(1, 9))
    assert mem.read(0x10, 2) == 0x0201
    assert mem.read(0x11, 2) == 0x0302
    assert mem.read(0x12, 4) == 0x06050403
    assert mem.read(0x14, 4) == 0x08070605
    assert mem.read(0x13, 8) == 0x0000000807060504
    mem.write(0x13, 1, 0xFF)
    assert mem.read(0x10, 8) == 0x08070605FF030201


def test_straddling_entries_and_pages():
    mem = GuestMemory(2)
    mem.write(0x1004, 8, 0x1122334455667788)       # straddles two 8-byte entries
    assert mem.read(0x1000, 8) == 0x5566778800000000
    assert mem.read(0x1008, 8) == 0x0000000011223344
    assert mem.read(0x1006, 4) == 0x33445566
    mem = GuestMemory(2)
    mem.write(PAGE_SIZE - 3, 8, 0xAABBCCDDEEFF0011)  # straddles the page boundary
    assert mem.read(PAGE_SIZE - 8, 8) == 0xFF00110000000000
    assert mem.read(PAGE_SIZE - 3, 8) == 0xAABBCCDDEEFF0011
    assert mem.read(PAGE_SIZE, 8) == 0x000000AABBCCDDEE
    assert mem.read(PAGE_SIZE, 4) == 0xBBCCDDEE
    assert mem.read(PAGE_SIZE - 1, 2) == 0xEEFF
    assert mem.read(PAGE_SIZE - 2, 4) == 0xDDEEFF00
    mem.write(PAGE_SIZE - 1, 2, 0x1234)
    assert mem.read(PAGE_SIZE - 1, 1) == 0x34 and mem.read(PAGE_SIZE, 1) == 0x12


def test_full_range_values():
    mem = GuestMemory(1)
    for size in SIZES:
        top = (1 << (8 * size)) - 1
        for gpa in (0x40, 0x41, 0x47):
            mem.write(gpa, size, top)
            assert mem.read(gpa, size) == top
            mem.write(gpa, size, 0)
            assert mem.read(gpa, size) == 0
    mem.write(0x80, 8, 1 << 63)
    assert mem.read(0x80, 8) == 1 << 63


@pytest.mark.parametrize("size", SIZES)
def test_last_bytes_are_accessible(size):
    mem = GuestMemory(2)
    gpa = mem.size - size
    mem.write(gpa, size, (1 << (8 * size)) - 2)
    assert mem.read(gpa, size) == (1 << (8 * size)) - 2


@pytest.mark.parametrize("size", SIZES)
def test_out_of_range_raises_guest_memory_error(size):
    mem = GuestMemory(2)
    before = mem.copy()
    bad = [mem.size, mem.size + 1, mem.size - size + 1, mem.size + 0x1000, -1, -size,
           1 << 40, 1 << 64]
    for gpa in bad:
        if 0 <= gpa <= mem.size - size:
            continue
        with pytest.raises(GuestMemoryError) as info:
            mem.read(gpa, size)
        assert "outside guest memory" in str(info.value)
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, size, 0x5A)
    # A write that is partly outside changes nothing.
    assert mem.same_as(before)
    assert issubclass(GuestMemoryError, LookupError)


@pytest.mark.parametrize("size", [0, 3, 5, 6, 7, 16, -1])
def test_bad_sizes_raise_value_error(size):
    mem = GuestMemory(1)
    with pytest.raises(ValueError, match="size"):
        mem.read(0, size)
    with pytest.raises(ValueError, match="size"):
        mem.write(0, size, 0)


@pytest.mark.parametrize(("size", "value"), [(1, 0x100), (2, 0x10000), (4, 1 << 32),
                                             (8, 1 << 64), (1, -1), (8, -1), (4, -5)])
@pytest.mark.parametrize("gpa", [0, 8, 3])
def test_value_must_fit(size, value, gpa):
    mem = GuestMemory(1)
    with pytest.raises(ValueError):
        mem.write(gpa, size, value)
    assert mem.same_as(GuestMemory(1))


def test_contains():
    mem = GuestMemory(2)
    assert mem.contains(0) and mem.contains(mem.size - 1)
    assert not mem.contains(mem.size) and not mem.contains(-1)


def test_page_view_is_writable_and_bounded():
    mem = GuestMemory(3)
    view = mem.page(1)
    assert len(view) == PAGE_SIZE
    view[0] = 0x42
    view[PAGE_SIZE - 1] = 0x24
    assert mem.read(PAGE_SIZE, 1) == 0x42
    assert mem.read(2 * PAGE_SIZE - 1, 1) == 0x24
    for pfn in (-1, 3, 100):
        with pytest.raises(GuestMemoryError):
            mem.page(pfn)


def test_copy_is_independent():
    mem, _ = _filled(2)
    cp = mem.copy()
    assert cp is not mem and cp.same_as(mem) and mem.same_as(cp)
    assert cp.num_pages == mem.num_pages and cp.size == mem.size
    cp.write(0x10, 8, 0xDEADBEEF)
    assert mem.read(0x10, 8) != 0xDEADBEEF
    assert not cp.same_as(mem)
    old = mem.read(0x20, 1)
    mem.write(0x20, 1, old ^ 0xFF)
    assert cp.read(0x20, 1) == old
    cp2 = mem.copy()
    cp2.page(1)[5] ^= 0xFF
    assert mem.read(PAGE_SIZE + 5, 1) != cp2.read(PAGE_SIZE + 5, 1)


def test_same_as_and_differences():
    a = GuestMemory(2)
    b = GuestMemory(2)
    assert a.same_as(b) and a.differences(b) == []
    b.write(0x7, 1, 1)
    b.write(0x1FFF, 1, 1)
    assert not a.same_as(b)
    assert a.differences(b) == [0x7, 0x1FFF]
    assert b.differences(a) == [0x7, 0x1FFF]
    for i in range(20):
        b.write(0x100 + i, 1, 0xFF)
    assert len(a.differences(b)) == 8                       # default limit
    assert a.differences(b, limit=3) == [0x7, 0x100, 0x101]
    assert len(a.differences(b, limit=100)) == 22
    # Memories of different sizes are never the same and cannot be diffed.
    c = GuestMemory(3)
    assert not a.same_as(c) and not c.same_as(a)
    with pytest.raises(ValueError):
        a.differences(c)
    # Restoring the bytes makes them the same again.
    b2 = a.copy()
    b2.write(0x5, 4, 0x01020304)
    b2.write(0x5, 4, 0)
    assert b2.same_as(a)


_ops = st.lists(st.tuples(st.booleans(), st.integers(0, 2 * PAGE_SIZE - 1), st.sampled_from(SIZES),
                          st.integers(0, (1 << 64) - 1)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_matches_a_bytearray_model(ops):
    mem = GuestMemory(2)
    ref = bytearray(2 * PAGE_SIZE)
    for is_write, gpa, size, value in ops:
        in_range = gpa + size <= len(ref)
        value &= (1 << (8 * size)) - 1
        if is_write:
            if in_range:
                mem.write(gpa, size, value)
                ref[gpa:gpa + size] = value.to_bytes(size, "little")
            else:
                with pytest.raises(GuestMemoryError):
                    mem.write(gpa, size, value)
        elif in_range:
            assert mem.read(gpa, size) == int.from_bytes(ref[gpa:gpa + size], "little")
        else:
            with pytest.raises(GuestMemoryError):
                mem.read(gpa, size)
    assert bytes(mem.array) == bytes(ref)


def test_a_copy_is_independent_and_keeps_the_dirty_frames() -> None:
    mem, ref = _filled(3)
    mem.settle()
    mem.write(PAGE_SIZE + 5, 2, 0xBEEF)
    ref[PAGE_SIZE + 5:PAGE_SIZE + 7] = (0xBEEF).to_bytes(2, "little")
    other = mem.copy()
    assert other.array.tobytes() == bytes(ref) and other.dirty == {1}
    other.write(0, 8, 0)
    assert mem.array.tobytes() == bytes(ref)


def test_a_released_memory_lends_its_array_to_the_next_copy() -> None:
    mem, ref = _filled(3)
    mem.settle()
    done = mem.copy()
    done.write(2 * PAGE_SIZE + 8, 8, 0x1122334455667788)
    array = done.array
    done.release()
    with pytest.raises(ValueError):
        done.read(0, 8)  # its entry views are released: no silent use after release
    again = mem.copy()
    assert again.array is array  # no fresh array
    assert again.array.tobytes() == bytes(ref)  # the contents of what it copies, not its own
    # a frame only the released memory wrote is zeroed when the source never wrote it
    blank = GuestMemory(3)
    blank.write(0, 1, 7)
    spare = blank.copy()
    spare.write(2 * PAGE_SIZE, 8, 0xFFFF)
    spare.release()
    fresh = blank.copy()
    assert fresh.read(2 * PAGE_SIZE, 8) == 0 and fresh.read(0, 1) == 7
