"""Bytes <-> Program. Decoding is total: every byte string is a valid program.

Layout: a 4-byte header, then 8-byte op records (a trailing partial record is ignored, and at
most MAX_OPS records are read). A record's first byte picks the op kind through a weighting
table; the other 7 bytes are one little-endian number read in mixed radix, one digit per
field (first field least significant), each an index into the field's domain in the op schema
(fuzzmmu.program.ops, fuzzmmu.program.schema), so a byte mutation changes one op, except in an
``interleave`` record: it holds the point and how many of the following records (2 to
1 + MAX_SECOND) are its operands, so changing that count regroups the records after it.

Program -> bytes -> Program is the identity; bytes -> Program -> bytes need not be (many byte
strings decode to the same program).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Final

from fuzzmmu.program.ops import (
    MAX_SECOND,
    POINT,
    SIMPLE_OPS,
    Access,
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
from fuzzmmu.program.schema import Layout, layout

HEADER_SIZE: Final = 4
RECORD_SIZE: Final = 8
MAX_OPS: Final = 64

_WEIGHTS: Final[tuple[tuple[type[Op], int], ...]] = (
    (Access, 64), (Map, 40), (WritePte, 28), (Store, 12), (SetMode, 20), (LoadCr3, 12),
    (SetBit, 14), (Invlpg, 10), (Smi, 6), (Rsm, 6), (Memslot, 8), (ZapAll, 3), (Migrate, 5),
    (Shrink, 2), (MmuPages, 2), (Interleave, 24),
)
OPCODE: Final[tuple[type[Op], ...]] = tuple(k for k, n in _WEIGHTS for _ in range(n))
assert len(OPCODE) == 256
FIRST_OPCODE: Final = {k: OPCODE.index(k) for k, _ in _WEIGHTS}

_HEADER: Final = layout(Header)
_LAYOUTS: Final[dict[type[Op], Layout]] = {kind: layout(kind) for kind in SIMPLE_OPS}
# The digits of every op fit a record's payload, and the header's its 4 bytes: a field added
# to the schema must keep them fitting (else encoding overflows and decoding never reaches
# the field's high values).
assert all(math.prod(radix for radix, _ in lay.steps) <= 1 << 8 * (RECORD_SIZE - 1)
           for lay in _LAYOUTS.values())
assert math.prod(radix for radix, _ in _HEADER.steps) <= 1 << 8 * HEADER_SIZE
# What an opcode's record decodes with: an interleave operand with the interleave opcode reads
# as an access (its payload means nothing else there).
_DECODERS: Final[tuple[Layout, ...]] = tuple(_LAYOUTS[Access if k is Interleave else k]
                                             for k in OPCODE)


def _decode_fields(lay: Layout, n: int) -> Any:
    """The op (or header) whose field digits ``n`` holds. The codec's hot loop: ``steps`` are
    precomputed (radix, digit -> value) pairs, so that nothing here reads the schema."""
    args = []
    for radix, value in lay.steps:
        n, d = divmod(n, radix)
        args.append(value(d))
    return lay.build(args)


@functools.lru_cache(maxsize=1 << 12)
def _decode_header(head: bytes) -> Header:
    """The header of a program's first bytes. Cached, as records are (decode_record): the
    inputs of a fuzzing run share few headers, and decoding one takes a third of the time of
    decoding a typical corpus program."""
    header: Header = _decode_fields(_HEADER, int.from_bytes(head.ljust(HEADER_SIZE, b"\0"),
                                                            "little"))
    return header


def decode(data: bytes) -> Program:
    """Every byte string is a program."""
    header = _decode_header(bytes(data[:HEADER_SIZE]))
    body = data[HEADER_SIZE:]
    n = min(len(body) // RECORD_SIZE, MAX_OPS)
    records = [body[i * RECORD_SIZE:(i + 1) * RECORD_SIZE] for i in range(n)]
    ops: list[Op] = []
    i = 0
    while i < n:
        rec = records[i]
        if OPCODE[rec[0]] is Interleave:
            payload, point = divmod(int.from_bytes(rec[1:], "little"), POINT.radix)
            count = 1 + payload % MAX_SECOND
            if i + 1 + count >= n:
                break
            operands = [decode_record(rec) for rec in records[i + 1:i + 2 + count]]
            ops.append(Interleave(POINT.value(point), operands[0], tuple(operands[1:])))
            i += 2 + count
            continue
        ops.append(decode_record(rec))
        i += 1
    return Program(header, tuple(ops))


# Decoding a record is a pure function of its 8 bytes and ops are immutable, so the ops of the
# records seen last are kept: a fuzzer decodes the same records over and over.
_RECORD_OPS: Final[dict[bytes, Op]] = {}
_RECORD_OPS_LIMIT: Final = 1 << 15  # then the cache starts afresh


def decode_record(rec: bytes) -> Op:
    """The op of one (non-interleave) record; an interleave record reads as an access."""
    rec = bytes(rec)  # the key must be immutable (no copy for bytes)
    op = _RECORD_OPS.get(rec)
    if op is None:
        if len(_RECORD_OPS) >= _RECORD_OPS_LIMIT:
            _RECORD_OPS.clear()
        op = _RECORD_OPS[rec] = _decode_fields(_DECODERS[rec[0]],
                                               int.from_bytes(rec[1:], "little"))
    return op


# ---------------------------------------------------------------------- encoding


def _pack(digits: Sequence[tuple[int, int]]) -> int:
    """Mixed-radix number from (digit, radix) pairs, first digit least significant."""
    n = 0
    for digit, radix in reversed(digits):
        if not 0 <= digit < radix:
            raise ValueError(f"field value {digit} is outside 0..{radix - 1}")
        n = n * radix + digit
    return n


def _payload(digits: Sequence[tuple[int, int]]) -> bytes:
    return _pack(digits).to_bytes(RECORD_SIZE - 1, "little")


def op_record(op: Op) -> bytes:
    """The 8-byte record of one (non-interleave) op."""
    return bytes([FIRST_OPCODE[type(op)]]) + _payload(_LAYOUTS[type(op)].digits(op))


def record_digits(rec: bytes) -> tuple[type[Op], list[tuple[int, int]]]:
    """A record's op kind and its fields as canonical (digit, radix) pairs."""
    kind = OPCODE[rec[0]]
    if kind is Interleave:
        payload, point = divmod(int.from_bytes(rec[1:], "little"), POINT.radix)
        return kind, [(point, POINT.radix), (payload % MAX_SECOND, MAX_SECOND)]
    op = decode_record(rec)
    return type(op), _LAYOUTS[type(op)].digits(op)


def record_from_digits(kind: type[Op], digits: Sequence[tuple[int, int]]) -> bytes:
    return bytes([FIRST_OPCODE[kind]]) + _payload(digits)


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
    out = [_pack(_HEADER.digits(program.header)).to_bytes(HEADER_SIZE, "little")]
    count = 0
    for op in program.ops:
        if isinstance(op, Interleave):
            parts = (op.first, *op.second)
            if any(isinstance(o, Interleave) for o in parts):
                raise ValueError("an interleave cannot contain an interleave")
            if not 1 <= len(op.second) <= MAX_SECOND:
                raise ValueError(f"an interleave runs 1 to {MAX_SECOND} ops at its point")
            out.append(record_from_digits(Interleave, [*POINT.digits(op.point),
                                                       (len(op.second) - 1, MAX_SECOND)]))
            out += [op_record(o) for o in parts]
            count += 1 + len(parts)
        else:
            out.append(op_record(op))
            count += 1
    if count > MAX_OPS:
        raise ValueError(f"a program has at most {MAX_OPS} op records, this one {count}")
    return b"".join(out)
