"""Guest-physical memory backed by numpy.

One flat little-endian byte array. Single entries are read and written through memoryviews of
the array (a scalar numpy index costs ~4x more); bulk work (create, copy, compare) uses numpy.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from fuzzmmu.arch.bits import PAGE_SHIFT

_SIZES: Final = (1, 2, 4, 8)
_PAGE: Final = 1 << PAGE_SHIFT
_ZERO_PAGE: Final = bytes(_PAGE)

# Arrays of memories their owners are done with (``GuestMemory.release``), by size, each with
# the frames that may hold nonzero bytes, for the next ``copy`` to fill. A fuzzer copies the
# world twice per program and once more per candidate order of an interleave, and a program
# writes a few of its frames: copying and zeroing only those moves a tenth of the bytes of a
# whole-array copy, which was a sixth of a program's time.
_SPARE: Final[dict[int, list[tuple[np.ndarray, set[int]]]]] = {}
_SPARE_MAX: Final = 4


class GuestMemoryError(LookupError):
    """An access that does not lie inside guest memory."""


class GuestMemory:
    """``num_pages`` 4 KiB frames of zeroed memory; reads and writes of 1, 2, 4 or 8 bytes at any
    alignment, including accesses that straddle two entries or two pages."""

    __slots__ = ("_bytes", "_dwords", "_qwords", "array", "dirty", "num_pages", "size",
                 "written")

    def __init__(self, num_pages: int, *, _array: np.ndarray | None = None) -> None:
        if num_pages <= 0:
            raise ValueError(f"guest memory needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.size = num_pages << PAGE_SHIFT
        self.array = np.zeros(self.size, dtype=np.uint8) if _array is None else _array
        self._bytes = self.array.data  # a memoryview sharing the array's memory
        self._qwords = self._bytes.cast("Q")
        self._dwords = self._bytes.cast("I")
        self.dirty: set[int] = set()  # frames written since the owner last settled
        self.written: set[int] = set()  # frames written before that: with dirty, all that
        # may hold a nonzero byte (the memory starts zeroed)

    def _check(self, gpa: int, size: int) -> None:
        if size not in _SIZES:
            raise ValueError(f"access size must be 1, 2, 4 or 8 bytes, got {size}")
        if gpa < 0 or gpa + size > self.size:
            raise GuestMemoryError(
                f"{size}-byte access at gpa {gpa:#x} is outside guest memory "
                f"(0x0-{self.size - 1:#x}, {self.num_pages} pages)")

    def read(self, gpa: int, size: int) -> int:
        """Little-endian value of ``size`` bytes at ``gpa``."""
        if size == 8 and not gpa & 7 and 0 <= gpa < self.size:
            return self._qwords[gpa >> 3]
        if size == 4 and not gpa & 3 and 0 <= gpa < self.size:  # 32-bit paging entries
            return self._dwords[gpa >> 2]
        self._check(gpa, size)
        return int.from_bytes(self._bytes[gpa:gpa + size], "little")

    def read_many(self, gpa: int, size: int, count: int) -> list[int]:
        """``count`` consecutive little-endian values of ``size`` bytes from ``gpa``."""
        if gpa >= 0 and gpa + size * count <= self.size:
            if size == 8 and not gpa & 7:
                return self._qwords[gpa >> 3:(gpa >> 3) + count].tolist()
            if size == 4 and not gpa & 3:
                return self._dwords[gpa >> 2:(gpa >> 2) + count].tolist()
        return [self.read(gpa + k * size, size) for k in range(count)]

    def write(self, gpa: int, size: int, value: int) -> None:
        """Store the low ``size`` bytes of ``value`` at ``gpa``, little-endian."""
        if size == 8 and not gpa & 7 and 0 <= gpa < self.size and 0 <= value < 1 << 64:
            self._qwords[gpa >> 3] = value
            self.dirty.add(gpa >> PAGE_SHIFT)
            return
        if size == 4 and not gpa & 3 and 0 <= gpa < self.size and 0 <= value < 1 << 32:
            self._dwords[gpa >> 2] = value
            self.dirty.add(gpa >> PAGE_SHIFT)
            return
        self._check(gpa, size)
        if not 0 <= value < 1 << (8 * size):
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")
        self._bytes[gpa:gpa + size] = value.to_bytes(size, "little")
        self.dirty.add(gpa >> PAGE_SHIFT)
        self.dirty.add((gpa + size - 1) >> PAGE_SHIFT)

    def contains(self, gpa: int) -> bool:
        return 0 <= gpa < self.size

    def page(self, pfn: int) -> np.ndarray:
        """A writable numpy view of one 4 KiB frame (writes through it are not tracked: the
        writer adds the frame to ``dirty``, which ``copy`` relies on)."""
        if not 0 <= pfn < self.num_pages:
            raise GuestMemoryError(
                f"frame {pfn:#x} is outside guest memory ({self.num_pages} pages)")
        return self.array[pfn << PAGE_SHIFT:(pfn + 1) << PAGE_SHIFT]

    def settle(self) -> None:
        """The owner has looked at the frames written since it last settled (``dirty``)."""
        self.written |= self.dirty
        self.dirty.clear()

    def copy(self) -> GuestMemory:
        """An independent memory with the same contents and the same ``dirty`` frames."""
        frames = self.written | self.dirty
        spare = _SPARE.get(self.size)
        if spare:
            array, stale = spare.pop()
            to = array.data
            for f in stale - frames:
                to[f << PAGE_SHIFT:(f + 1) << PAGE_SHIFT] = _ZERO_PAGE
        else:
            array = np.zeros(self.size, dtype=np.uint8)
            to = array.data
        src = self._bytes
        for f in frames:
            lo = f << PAGE_SHIFT
            to[lo:lo + _PAGE] = src[lo:lo + _PAGE]
        other = GuestMemory(self.num_pages, _array=array)
        other.dirty = set(self.dirty)
        other.written = set(self.written)
        return other

    def release(self) -> None:
        """The owner is done with this memory: its array goes to a later ``copy``. Entry reads
        and writes through this object raise ValueError from now on."""
        for view in (self._qwords, self._dwords, self._bytes):
            view.release()
        array, self.array = self.array, np.zeros(0, dtype=np.uint8)
        spare = _SPARE.setdefault(self.size, [])
        if len(spare) < _SPARE_MAX:
            spare.append((array, self.written | self.dirty))

    def same_frame(self, other: GuestMemory, pfn: int) -> bool:
        lo = pfn << PAGE_SHIFT
        hi = lo + (1 << PAGE_SHIFT)
        # bytes compare with memcmp; memoryviews compare item by item (10x slower)
        return self._bytes[lo:hi].tobytes() == other._bytes[lo:hi].tobytes()

    def same_as(self, other: GuestMemory) -> bool:
        return self.size == other.size and bool(np.array_equal(self.array, other.array))

    def differences(self, other: GuestMemory, limit: int = 8) -> list[int]:
        """Byte offsets (up to ``limit``) where two memories of the same size differ."""
        if self.size != other.size:
            raise ValueError("memories of different sizes cannot be compared")
        return [int(i) for i in np.flatnonzero(self.array != other.array)[:limit]]


