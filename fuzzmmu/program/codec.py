"""Bytes <-> Program. Decoding is total: every byte string is a valid program.

Layout: a 4-byte header, then 8-byte op records (a trailing partial record is ignored, and at
most MAX_OPS records are read). A record's first byte picks the op kind through a weighting
table; the other 7 bytes are one little-endian number read in mixed radix, one digit per
field, each an index into the small world of fuzzmmu.program.world, so a byte mutation
changes one op, except in an ``interleave`` record: it holds the point and how many of the
following records (2 to 1 + MAX_SECOND) are its operands, so changing that count regroups the
records after it.

Program -> bytes -> Program is the identity; bytes -> Program -> bytes need not be (many byte
strings decode to the same program).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
from fuzzmmu.world.memslots import MemslotChange
from fuzzmmu.world.observe import AccessKind

HEADER_SIZE = 4
RECORD_SIZE = 8
MAX_OPS = 64
MAX_SECOND = 3  # ops in the second part of an interleave

_WEIGHTS: tuple[tuple[type[Op], int], ...] = (
    (Access, 64), (Map, 40), (WritePte, 28), (Store, 12), (SetMode, 20), (LoadCr3, 12),
    (SetBit, 14), (Invlpg, 10), (Smi, 6), (Rsm, 6), (Memslot, 8), (ZapAll, 3), (Migrate, 5),
    (Shrink, 2), (MmuPages, 2), (Interleave, 24),
)
OPCODE: tuple[type[Op], ...] = tuple(k for k, n in _WEIGHTS for _ in range(n))
assert len(OPCODE) == 256
FIRST_OPCODE = {k: OPCODE.index(k) for k, _ in _WEIGHTS}

_FLAG_BITS = (1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7, 1 << 63)  # P W U A D PS NX
_MODES = tuple(GuestMode)
_BITS = tuple(CrBit)
_EXTRAS = tuple(Extra)
_KINDS = (AccessKind.READ, AccessKind.WRITE, AccessKind.FETCH)
_CHANGES = (MemslotChange.CREATE, MemslotChange.DELETE, MemslotChange.MOVE)
_POINTS = tuple(Point)
_POLICIES = ("zap", "update")
# Boot modes, most programs running paged (a mode may repeat: its first index stands for it).
BOOT_MODES = (GuestMode.LONG4, GuestMode.PAE, GuestMode.BIT32, GuestMode.LONG4, GuestMode.BIT32_PSE,
         GuestMode.OFF, GuestMode.LONG4, GuestMode.PAE)

# Store offsets: around the interesting slots (4-byte granularity), plus 0-7 bytes.
STORE_OFFSETS: tuple[int, ...] = tuple(dict.fromkeys(
    min(s * 4 + d, 4088) for s in W.SLOTS for d in range(8)))
STORE_OFFSET_INDEX = {o: i for i, o in enumerate(STORE_OFFSETS)}


def _flags_from(index: int) -> int:
    return sum(b for i, b in enumerate(_FLAG_BITS) if index >> i & 1)


def _flags_index(flags: int) -> int:
    return sum(1 << i for i, b in enumerate(_FLAG_BITS) if flags & b)


class _Digits:
    """Mixed-radix digits of a record's payload."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def take(self, radix: int) -> int:
        d = self.n % radix
        self.n //= radix
        return d


def _entry(d: _Digits) -> Entry:
    target = W.TARGETS[d.take(len(W.TARGETS))]
    flags = _flags_from(d.take(1 << len(_FLAG_BITS)))
    return Entry(target, flags, _EXTRAS[d.take(len(_EXTRAS))])


# A kernel's mappings are mostly present and executable: P unless a 1-in-8 digit says not,
# NX only on a 1-in-8 digit (NX is a reserved bit while EFER.NXE is off).
_MAP_FLAGS = ((1 << 1, 2), (1 << 2, 2), (1 << 5, 2), (1 << 6, 2))  # W U A D


# Upper entries: W and U unless a 1-in-8 digit says not, A on a coin, NX on a 1-in-8 digit.
_UPPER_DIGITS = ((1 << 1, 8, True), (1 << 2, 8, True), (1 << 5, 2, True), (1 << 63, 8, False))


def _upper_digits(upper: int) -> list[tuple[int, int]]:
    return [(int(bool(upper & bit) == when), radix) for bit, radix, when in _UPPER_DIGITS]


def _map_entry(d: _Digits) -> Entry:
    target = W.TARGETS[d.take(len(W.TARGETS))]
    flags = 1 if d.take(8) else 0
    for bit, radix in _MAP_FLAGS:
        flags |= bit if d.take(radix) else 0
    flags |= 1 << 63 if not d.take(8) else 0
    return Entry(target, flags, _EXTRAS[d.take(len(_EXTRAS))])


def _map_entry_digits(e: Entry) -> list[tuple[int, int]]:
    if e.flags & ~(1 | (1 << 1) | (1 << 2) | (1 << 5) | (1 << 6) | (1 << 63)):
        raise ValueError("a map entry's flags are among P, W, U, A, D and NX")
    return [(W.TARGET_INDEX[e.target], len(W.TARGETS)), (int(bool(e.flags & 1)), 8),
            *((int(bool(e.flags & bit)), radix) for bit, radix in _MAP_FLAGS),
            (int(not e.flags & (1 << 63)), 8), (_EXTRAS.index(e.extra), len(_EXTRAS))]


def _decode_op(kind: type[Op], d: _Digits) -> Op:
    if kind is Access or kind is Interleave:  # an interleave operand reads as an access
        vcpu = d.take(2)
        akind = _KINDS[d.take(3)]
        va = W.VA_CHOICES[d.take(len(W.VA_CHOICES))]
        offset = W.OFFSETS[d.take(len(W.OFFSETS))]
        width = W.WIDTHS[d.take(4)]
        cpl, ac, seed = d.take(2) * 3, bool(d.take(2)), d.take(256)
        # A load or fetch stores nothing: its seed is normalised away.
        return Access(vcpu, akind, va, min(offset, 4096 - width), width, cpl, ac,
                      seed if akind is AccessKind.WRITE else 0)
    if kind is WritePte:
        vcpu, table, slot = d.take(2), d.take(64), W.SLOTS[d.take(len(W.SLOTS))]
        entry = _entry(d)
        width = (4, 8)[d.take(2)]
        return WritePte(vcpu, table, slot % (4096 // width), entry, width)
    if kind is Store:
        vcpu, frame = d.take(2), d.take(64)
        offset = STORE_OFFSETS[d.take(len(STORE_OFFSETS))]
        width = W.WIDTHS[d.take(4)]
        return Store(vcpu, frame, min(offset, 4096 - width), width, _entry(d))
    if kind is Map:
        vcpu, root = d.take(2), W.MAP_ROOTS[d.take(len(W.MAP_ROOTS))]
        fmt = MAP_FORMATS[d.take(len(MAP_FORMATS))]
        va = W.VA_CHOICES[d.take(len(W.VA_CHOICES))]
        entry = _map_entry(d)
        level = W.MAP_LEVELS[d.take(len(W.MAP_LEVELS))]
        if fmt is not GuestMode.LONG4 and fmt is not None:
            level = min(level, 2)  # no 1 GiB pages below long mode
        upper = 0
        for bit, radix, when in _UPPER_DIGITS:
            upper |= bit if (d.take(radix) != 0) == when else 0
        return Map(vcpu, root, fmt, va, entry, level, upper, W.POOLS[d.take(len(W.POOLS))])
    if kind is SetMode:
        return SetMode(d.take(2), _MODES[d.take(len(_MODES))], W.ROOTS[d.take(len(W.ROOTS))])
    if kind is LoadCr3:
        return LoadCr3(d.take(2), W.ROOTS[d.take(len(W.ROOTS))])
    if kind is SetBit:
        return SetBit(d.take(2), _BITS[d.take(len(_BITS))], bool(d.take(2)))
    if kind is Invlpg:
        return Invlpg(d.take(2), W.VA_CHOICES[d.take(len(W.VA_CHOICES))])
    if kind is Smi:
        return Smi(d.take(2))
    if kind is Rsm:
        return Rsm(d.take(2))
    if kind is Memslot:
        as_id, slot, change = d.take(2), d.take(4), _CHANGES[d.take(3)]
        base = W.SLOT_BASES[d.take(len(W.SLOT_BASES))]
        npages = W.SLOT_SIZES[d.take(len(W.SLOT_SIZES))]
        hva = W.SLOT_HVAS[d.take(len(W.SLOT_HVAS))]
        if change is MemslotChange.DELETE:
            return Memslot(as_id, slot, change)
        if change is MemslotChange.MOVE:
            return Memslot(as_id, slot, change, base)
        return Memslot(as_id, slot, change, base, npages, hva)
    if kind is ZapAll:
        return ZapAll()
    if kind is Migrate:
        return Migrate(d.take(2), d.take(64))
    if kind is Shrink:
        return Shrink(W.SHRINK_COUNTS[d.take(len(W.SHRINK_COUNTS))])
    if kind is MmuPages:
        return MmuPages(W.MAX_PAGES[d.take(len(W.MAX_PAGES))])
    raise AssertionError(kind)


def decode(data: bytes) -> Program:
    """Every byte string is a program."""
    h = _Digits(int.from_bytes(data[:HEADER_SIZE].ljust(HEADER_SIZE, b"\0"), "little"))
    header = Header(_POLICIES[h.take(2)], W.MMIO_GEN_BITS[h.take(len(W.MMIO_GEN_BITS))],
                    W.MAXPHYADDRS[h.take(len(W.MAXPHYADDRS))],
                    W.MMU_PAGES[h.take(len(W.MMU_PAGES))], BOOT_MODES[h.take(len(BOOT_MODES))])
    body = data[HEADER_SIZE:]
    n = min(len(body) // RECORD_SIZE, MAX_OPS)
    records = [body[i * RECORD_SIZE:(i + 1) * RECORD_SIZE] for i in range(n)]
    ops: list[Op] = []
    i = 0
    while i < n:
        rec = records[i]
        if OPCODE[rec[0]] is Interleave:
            digits = _Digits(int.from_bytes(rec[1:], "little"))
            point = _POINTS[digits.take(len(_POINTS))]
            count = 1 + digits.take(MAX_SECOND)
            if i + 1 + count >= n:
                break
            operands = [decode_record(rec) for rec in records[i + 1:i + 2 + count]]
            ops.append(Interleave(point, operands[0], tuple(operands[1:])))
            i += 2 + count
            continue
        ops.append(decode_record(rec))
        i += 1
    return Program(header, tuple(ops))


# ---------------------------------------------------------------------- encoding


def _pack(digits: Sequence[tuple[int, int]]) -> int:
    """Mixed-radix number from (digit, radix) pairs, first digit least significant."""
    n = 0
    for digit, radix in reversed(digits):
        if not 0 <= digit < radix:
            raise ValueError(f"field value {digit} is outside 0..{radix - 1}")
        n = n * radix + digit
    return n


def _entry_digits(e: Entry) -> list[tuple[int, int]]:
    return [(W.TARGET_INDEX[e.target], len(W.TARGETS)),
            (_flags_index(e.flags), 1 << len(_FLAG_BITS)),
            (_EXTRAS.index(e.extra), len(_EXTRAS))]


def _slot_digit(index: int, width: int) -> int:
    for i, s in enumerate(W.SLOTS):
        if s % (4096 // width) == index:
            return i
    raise ValueError(f"slot {index} is not one of the world's slots")


_DIGITS: dict[type[Op], Callable[[Op], list[tuple[int, int]]]] = {
    Access: lambda o: [(o.vcpu, 2), (_KINDS.index(o.kind), 3), _va_digit(o.va),
                       (W.OFFSETS.index(_offset_choice(o.offset, o.width)), len(W.OFFSETS)),
                       (W.WIDTHS.index(o.width), 4), (o.cpl // 3, 2), (int(o.ac), 2),
                       (o.seed, 256)],
    WritePte: lambda o: [(o.vcpu, 2), (o.table, 64),
                         (_slot_digit(o.index, o.width), len(W.SLOTS)),
                         *_entry_digits(o.entry), ((4, 8).index(o.width), 2)],
    Store: lambda o: [(o.vcpu, 2), (o.frame, 64),
                      (STORE_OFFSET_INDEX[_store_offset_choice(o.offset, o.width)],
                       len(STORE_OFFSETS)), (W.WIDTHS.index(o.width), 4), *_entry_digits(o.entry)],
    Map: lambda o: [(o.vcpu, 2), (W.MAP_ROOTS.index(o.root), len(W.MAP_ROOTS)),
                    (MAP_FORMATS.index(o.fmt), len(MAP_FORMATS)), _va_digit(o.va),
                    *_map_entry_digits(o.entry), (W.MAP_LEVELS.index(o.level), len(W.MAP_LEVELS)),
                    *_upper_digits(o.upper), (W.POOLS.index(o.pool), len(W.POOLS))],
    SetMode: lambda o: [(o.vcpu, 2), (_MODES.index(o.mode), len(_MODES)),
                        (W.ROOTS.index(o.root), len(W.ROOTS))],
    LoadCr3: lambda o: [(o.vcpu, 2), (W.ROOTS.index(o.root), len(W.ROOTS))],
    SetBit: lambda o: [(o.vcpu, 2), (_BITS.index(o.bit), len(_BITS)), (int(o.on), 2)],
    Invlpg: lambda o: [(o.vcpu, 2), _va_digit(o.va)],
    Smi: lambda o: [(o.vcpu, 2)],
    Rsm: lambda o: [(o.vcpu, 2)],
    Memslot: lambda o: [(o.as_id, 2), (o.slot, 4), (_CHANGES.index(o.change), 3),
                        (W.SLOT_BASES.index(o.base), len(W.SLOT_BASES)),
                        (W.SLOT_SIZES.index(o.npages) if o.npages else 0, len(W.SLOT_SIZES)),
                        (W.SLOT_HVAS.index(o.hva), len(W.SLOT_HVAS))],
    ZapAll: lambda o: [],
    Migrate: lambda o: [(o.as_id, 2), (o.gfn, 64)],
    Shrink: lambda o: [(W.SHRINK_COUNTS.index(o.count), len(W.SHRINK_COUNTS))],
    MmuPages: lambda o: [(W.MAX_PAGES.index(o.count), len(W.MAX_PAGES))],
}


def _va_digit(va: int) -> tuple[int, int]:
    return W.VA_INDEX[va], len(W.VA_CHOICES)


def _offset_choice(offset: int, width: int) -> int:
    for o in W.OFFSETS:
        if min(o, 4096 - width) == offset:
            return o
    raise ValueError(f"access offset {offset:#x} is not one of the world's offsets")


def _store_offset_choice(offset: int, width: int) -> int:
    for o in STORE_OFFSETS:
        if min(o, 4096 - width) == offset:
            return o
    raise ValueError(f"store offset {offset:#x} is not one of the world's offsets")


def op_record(op: Op) -> bytes:
    """The 8-byte record of one (non-interleave) op."""
    payload = _pack(_DIGITS[type(op)](op))
    return bytes([FIRST_OPCODE[type(op)]]) + payload.to_bytes(RECORD_SIZE - 1, "little")


def record_digits(rec: bytes) -> tuple[type[Op], list[tuple[int, int]]]:
    """A record's op kind and its fields as canonical (digit, radix) pairs."""
    kind = OPCODE[rec[0]]
    digits = _Digits(int.from_bytes(rec[1:], "little"))
    if kind is Interleave:
        return kind, [(digits.take(len(_POINTS)), len(_POINTS)),
                      (digits.take(MAX_SECOND), MAX_SECOND)]
    op = _decode_op(kind, digits)
    return type(op), _DIGITS[type(op)](op)


# Decoding a record is a pure function of its 8 bytes and ops are immutable, so the ops of the
# records seen last are kept: a fuzzer decodes the same records over and over.
_RECORD_OPS: dict[bytes, Op] = {}
_RECORD_OPS_LIMIT = 1 << 15  # then the cache starts afresh


def decode_record(rec: bytes) -> Op:
    """The op of one (non-interleave) record; an interleave record reads as an access."""
    rec = bytes(rec)  # the key must be immutable (no copy for bytes)
    op = _RECORD_OPS.get(rec)
    if op is None:
        if len(_RECORD_OPS) >= _RECORD_OPS_LIMIT:
            _RECORD_OPS.clear()
        op = _RECORD_OPS[rec] = _decode_op(OPCODE[rec[0]],
                                           _Digits(int.from_bytes(rec[1:], "little")))
    return op


def record_from_digits(kind: type[Op], digits: Sequence[tuple[int, int]]) -> bytes:
    return bytes([FIRST_OPCODE[kind]]) + _pack(digits).to_bytes(RECORD_SIZE - 1, "little")


def encode(program: Program) -> bytes:
    """The canonical bytes of a program; raises ValueError for values outside the world,
    which would otherwise come back from ``decode`` as another program."""
    try:
        data = _encode(program)
    except (KeyError, IndexError) as exc:
        raise ValueError(f"a value outside the world: {exc}") from None
    back = decode(data)
    if back != program:
        if back.header != program.header:
            raise ValueError(f"the header {program.header} is outside the world")
        for op, got in zip(program.ops, back.ops, strict=False):
            if op != got:
                raise ValueError(f"{op} is outside the world (it would read back as {got})")
        raise ValueError("the program is outside the world")
    return data


def _encode(program: Program) -> bytes:
    h = program.header
    header = _pack([(_POLICIES.index(h.policy), 2),
                    (W.MMIO_GEN_BITS.index(h.mmio_gen_bits), len(W.MMIO_GEN_BITS)),
                    (W.MAXPHYADDRS.index(h.maxphyaddr), len(W.MAXPHYADDRS)),
                    (W.MMU_PAGES.index(h.mmu_pages), len(W.MMU_PAGES)),
                    (BOOT_MODES.index(h.boot), len(BOOT_MODES))])
    out = [header.to_bytes(HEADER_SIZE, "little")]
    count = 0
    for op in program.ops:
        if isinstance(op, Interleave):
            parts = (op.first, *op.second)
            if any(isinstance(o, Interleave) for o in parts):
                raise ValueError("an interleave cannot contain an interleave")
            if not 1 <= len(op.second) <= MAX_SECOND:
                raise ValueError(f"an interleave runs 1 to {MAX_SECOND} ops at its point")
            payload = _pack([(_POINTS.index(op.point), len(_POINTS)),
                             (len(op.second) - 1, MAX_SECOND)])
            out.append(bytes([FIRST_OPCODE[Interleave]])
                       + payload.to_bytes(RECORD_SIZE - 1, "little"))
            out += [op_record(o) for o in parts]
            count += 1 + len(parts)
        else:
            out.append(op_record(op))
            count += 1
    if count > MAX_OPS:
        raise ValueError(f"a program has at most {MAX_OPS} op records, this one {count}")
    return b"".join(out)
