"""The binary form (fuzzmmu.program.codec): decoding is total, Program -> bytes -> Program is
the identity, programs stay within MAX_OPS records, and a byte mutation stays inside the op
whose record it hits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzzmmu.model.mmu.internal import Point
from fuzzmmu.program.codec import (
    FIRST_OPCODE,
    HEADER_SIZE,
    MAX_OPS,
    MAX_SECOND,
    OPCODE,
    RECORD_SIZE,
    decode,
    encode,
)
from fuzzmmu.program.ops import (
    Access,
    Entry,
    GuestMode,
    Header,
    Interleave,
    Invlpg,
    LoadCr3,
    Map,
    Memslot,
    Op,
    Program,
    Smi,
    WritePte,
    ZapAll,
)
from fuzzmmu.program.strategies import program_bytes, programs, record_count
from fuzzmmu.world.memslots import MemslotChange
from fuzzmmu.world.observe import AccessKind

SETTINGS = settings(max_examples=300, deadline=None)


def groups(data: bytes) -> list[list[int]]:
    """The record indices each decoded op comes from, per the layout: a 4-byte header, 8-byte
    records (at most MAX_OPS, a partial one ignored); an interleave record's payload holds its
    point and how many second ops (1 to MAX_SECOND) follow its op, and the program ends at an
    interleave whose records are not all there."""
    n = min(max(len(data) - HEADER_SIZE, 0) // RECORD_SIZE, MAX_OPS)
    out: list[list[int]] = []
    i = 0
    while i < n:
        rec = data[HEADER_SIZE + i * RECORD_SIZE:HEADER_SIZE + (i + 1) * RECORD_SIZE]
        if OPCODE[rec[0]] is Interleave:
            payload = int.from_bytes(rec[1:], "little")
            count = 1 + (payload // len(Point)) % MAX_SECOND
            if i + 1 + count >= n:
                break
            out.append(list(range(i, i + 2 + count)))
            i += 2 + count
        else:
            out.append([i])
            i += 1
    return out


def interleave_payload(point: Point, seconds: int) -> int:
    return list(Point).index(point) + len(Point) * (seconds - 1)


def mutate(data: bytes, pos: int, value: int) -> bytes:
    return data[:pos] + bytes([value]) + data[pos + 1:]


def record(kind: type[Op], payload: int = 0) -> bytes:
    return bytes([FIRST_OPCODE[kind]]) + payload.to_bytes(RECORD_SIZE - 1, "little")


# ---------------------------------------------------------------------- decoding is total


@SETTINGS
@given(program_bytes)
def test_decode_never_raises_and_stays_within_max_ops(data: bytes) -> None:
    p = decode(data)
    assert isinstance(p, Program) and isinstance(p.header, Header)
    assert all(isinstance(op, Op) for op in p.ops)
    assert record_count(p) <= MAX_OPS
    assert len(p.ops) == len(groups(data))
    for op in p.ops:  # operands of an interleave are simple ops
        if isinstance(op, Interleave):
            assert 1 <= len(op.second) <= MAX_SECOND
            assert not any(isinstance(o, Interleave) for o in (op.first, *op.second))


@pytest.mark.parametrize("size", [0, 1, 3, HEADER_SIZE, HEADER_SIZE + 7,
                                  HEADER_SIZE + RECORD_SIZE * MAX_OPS,
                                  HEADER_SIZE + RECORD_SIZE * (MAX_OPS + 1) + 5])
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0xA5])
def test_decode_edge_lengths(size: int, fill: int) -> None:
    p = decode(bytes([fill]) * size)
    assert record_count(p) <= MAX_OPS
    assert decode(encode(p)) == p


def test_empty_input_is_the_default_program() -> None:
    p = decode(b"")
    assert p.ops == ()
    assert p == decode(b"\0" * HEADER_SIZE)
    assert p.header.policy == "zap" and p.header.maxphyaddr == 40


@SETTINGS
@given(program_bytes, st.binary(min_size=1, max_size=RECORD_SIZE - 1))
def test_trailing_partial_record_is_ignored(data: bytes, tail: bytes) -> None:
    body = max(len(data) - HEADER_SIZE, 0)
    whole = data[:HEADER_SIZE + body - body % RECORD_SIZE] if len(data) >= HEADER_SIZE else data
    if len(whole) < HEADER_SIZE:
        whole = whole.ljust(HEADER_SIZE, b"\0")
    assert decode(whole + tail) == decode(whole)


@SETTINGS
@given(st.binary(min_size=HEADER_SIZE + RECORD_SIZE * MAX_OPS,
                 max_size=HEADER_SIZE + RECORD_SIZE * MAX_OPS),
       st.binary(min_size=1, max_size=4 * RECORD_SIZE))
def test_records_beyond_max_ops_are_ignored(data: bytes, extra: bytes) -> None:
    assert decode(data + extra) == decode(data)


@pytest.mark.parametrize("seconds", range(1, MAX_SECOND + 1))
def test_interleave_takes_its_op_and_its_second_ops(seconds: int) -> None:
    point = list(Point)[1]
    parts = [ZapAll(), Smi(1), Smi(0), ZapAll()][:1 + seconds]
    data = (b"\0" * HEADER_SIZE + record(Interleave, interleave_payload(point, seconds))
            + b"".join(record(type(o), getattr(o, "vcpu", 0)) for o in parts) + record(Smi))
    p = decode(data)
    assert p.ops == (Interleave(point, parts[0], tuple(parts[1:])), Smi(0))
    assert encode(p) == data


@pytest.mark.parametrize("seconds", range(1, MAX_SECOND + 1))
def test_interleave_without_all_its_records_ends_the_program(seconds: int) -> None:
    for present in range(1 + seconds):
        data = (b"\0" * HEADER_SIZE + record(ZapAll)
                + record(Interleave, interleave_payload(Point.FAULTIN, seconds))
                + record(ZapAll) * present)
        assert decode(data).ops == (ZapAll(),)


def test_interleave_operand_with_interleave_opcode_reads_as_access() -> None:
    data = b"\0" * HEADER_SIZE + record(Interleave) + record(Interleave) + record(ZapAll)
    (op,) = decode(data).ops
    assert isinstance(op, Interleave)
    assert isinstance(op.first, Access) and op.second == (ZapAll(),)
    assert decode(encode(decode(data))) == decode(data)


def test_load_and_fetch_seed_is_normalised() -> None:
    for payload in range(0, 1 << 20, 4099):
        (op,) = decode(b"\0" * HEADER_SIZE + record(Access, payload)).ops
        assert isinstance(op, Access)
        if op.kind is not AccessKind.WRITE:
            assert op.seed == 0
        assert op.offset + op.width <= 4096


# ---------------------------------------------------------------------- round trips


@SETTINGS
@given(program_bytes)
def test_decoded_programs_round_trip_through_bytes(data: bytes) -> None:
    p = decode(data)
    canonical = encode(p)
    assert decode(canonical) == p
    assert encode(decode(canonical)) == canonical  # the canonical form is a fixed point
    assert len(canonical) == HEADER_SIZE + RECORD_SIZE * record_count(p)


@settings(max_examples=400, deadline=None)
@given(programs())
def test_built_programs_round_trip_through_bytes(p: Program) -> None:
    data = encode(p)
    assert len(data) == HEADER_SIZE + RECORD_SIZE * record_count(p)
    assert decode(data) == p
    assert encode(decode(data)) == data


# ---------------------------------------------------------------------- locality


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=HEADER_SIZE + RECORD_SIZE, max_size=HEADER_SIZE + RECORD_SIZE * 20),
       st.data())
def test_payload_mutation_changes_at_most_its_op(data: bytes, draw: st.DataObject) -> None:
    """A payload byte of an op record (anything but an interleave record, whose payload says
    how many records the interleave takes) changes that op only."""
    n = (len(data) - HEADER_SIZE) // RECORD_SIZE
    rec = draw.draw(st.integers(0, n - 1), label="record")
    pos = HEADER_SIZE + rec * RECORD_SIZE
    if OPCODE[data[pos]] is Interleave:
        # Keep the count digit: only the point (and bits beyond the fields) may change.
        m = len(Point) * MAX_SECOND
        payload = int.from_bytes(data[pos + 1:pos + RECORD_SIZE], "little")
        count_digit = payload % m // len(Point)
        high = draw.draw(st.integers(0, (1 << 56) // m - 1), label="payload above the fields")
        point = draw.draw(st.integers(0, len(Point) - 1), label="point")
        new = high * m + count_digit * len(Point) + point
        mutated = data[:pos + 1] + new.to_bytes(RECORD_SIZE - 1, "little") + data[
            pos + RECORD_SIZE:]
    else:
        pos += draw.draw(st.integers(1, RECORD_SIZE - 1), label="payload byte")
        mutated = mutate(data, pos, draw.draw(st.integers(0, 255), label="value"))
    assert groups(mutated) == groups(data)
    _assert_local(data, mutated, rec)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=HEADER_SIZE + RECORD_SIZE, max_size=HEADER_SIZE + RECORD_SIZE * 20),
       st.data())
def test_opcode_mutation_keeping_the_shape_changes_at_most_its_op(
        data: bytes, draw: st.DataObject) -> None:
    """An opcode byte changed to another non-interleave kind leaves every other op alone."""
    n = (len(data) - HEADER_SIZE) // RECORD_SIZE
    rec = draw.draw(st.integers(0, n - 1), label="record")
    pos = HEADER_SIZE + rec * RECORD_SIZE
    if OPCODE[data[pos]] is Interleave:
        return
    simple = [b for b in range(256) if OPCODE[b] is not Interleave]
    mutated = mutate(data, pos, draw.draw(st.sampled_from(simple), label="opcode"))
    _assert_local(data, mutated, rec)


def _assert_local(data: bytes, mutated: bytes, rec: int) -> None:
    before, after = decode(data), decode(mutated)
    assert after.header == before.header
    assert len(after.ops) == len(before.ops)
    hit = [g for g, recs in enumerate(groups(data)) if rec in recs]
    changed = [i for i, (a, b) in enumerate(zip(before.ops, after.ops, strict=True)) if a != b]
    assert changed == [] or changed == hit
    if changed and isinstance(before.ops[hit[0]], Interleave):
        # Inside an interleave only the part the record encodes changes.
        a, b = before.ops[hit[0]], after.ops[hit[0]]
        assert isinstance(a, Interleave) and isinstance(b, Interleave)
        part = groups(data)[hit[0]].index(rec)
        same = [a.point == b.point, a.first == b.first,
                *(x == y for x, y in zip(a.second, b.second, strict=True))]
        assert same.count(False) == 1 and same[part] is False


@SETTINGS
@given(program_bytes, st.integers(0, HEADER_SIZE - 1), st.integers(0, 255))
def test_header_mutation_changes_only_the_header(data: bytes, pos: int, value: int) -> None:
    data = data.ljust(HEADER_SIZE, b"\0")
    assert decode(mutate(data, pos, value)).ops == decode(data).ops


@SETTINGS
@given(program_bytes, st.integers(0, RECORD_SIZE - 1), st.integers(0, 255))
def test_any_mutation_keeps_every_earlier_op(data: bytes, byte: int, value: int) -> None:
    """Whatever a mutation does to the shape of the program (an opcode turned into or out of
    an interleave, an interleave's count of second ops), ops before the hit op stay."""
    n = min(max(len(data) - HEADER_SIZE, 0) // RECORD_SIZE, MAX_OPS)
    if n == 0:
        return
    rec = n // 2
    mutated = mutate(data, HEADER_SIZE + rec * RECORD_SIZE + byte, value)
    before, after = decode(data), decode(mutated)
    first_hit = next((g for g, recs in enumerate(groups(data)) if recs[-1] >= rec),
                     len(before.ops))
    assert after.ops[:first_hit] == before.ops[:first_hit]


# ---------------------------------------------------------------------- encoding limits


def test_encode_rejects_more_than_max_ops_records() -> None:
    ok = Program(Header(), (ZapAll(),) * MAX_OPS)
    assert len(encode(ok)) == HEADER_SIZE + RECORD_SIZE * MAX_OPS
    with pytest.raises(ValueError, match=str(MAX_OPS)):
        encode(Program(Header(), (ZapAll(),) * (MAX_OPS + 1)))
    pair = Interleave(Point.FAULTIN, ZapAll(), (ZapAll(),))
    assert len(encode(Program(Header(), (pair,) * (MAX_OPS // 3)))) == (
        HEADER_SIZE + RECORD_SIZE * 3 * (MAX_OPS // 3))
    with pytest.raises(ValueError):
        encode(Program(Header(), (pair,) * (MAX_OPS // 3) + (ZapAll(),) * 2))


def test_encode_rejects_nested_interleave() -> None:
    inner = Interleave(Point.FAULTIN, ZapAll(), (ZapAll(),))
    with pytest.raises(ValueError, match="interleave"):
        encode(Program(Header(), (Interleave(Point.WALKED, inner, (ZapAll(),)),)))
    with pytest.raises(ValueError, match="interleave"):
        encode(Program(Header(), (Interleave(Point.WALKED, ZapAll(), (ZapAll(), inner)),)))


@pytest.mark.parametrize("seconds", [0, MAX_SECOND + 1])
def test_encode_rejects_interleave_group_size(seconds: int) -> None:
    op = Interleave(Point.FAULTIN, ZapAll(), (ZapAll(),) * seconds)
    with pytest.raises(ValueError):
        encode(Program(Header(), (op,)))


_READ = dict(vcpu=0, kind=AccessKind.READ, va=0x1000, offset=0, width=8, cpl=0, ac=False,
             seed=0)
_OUTSIDE_OK = {
    "vcpu 2": Smi(2),
    "table frame 64": WritePte(0, 64, 1, Entry(5, 1), 8),
    "slot 5": WritePte(0, 4, 5, Entry(5, 1), 8),
    "access offset 0x20": Access(**{**_READ, "offset": 0x20}),
    "width 3": Access(**{**_READ, "width": 3}),
    "root frame 5": LoadCr3(0, 5),
    "map entry with PS": Map(0, None, None, 0x1000, Entry(5, 0x81), 1, 0, 8),
}
_OUTSIDE_SILENT = {
    # found by looking them up in the world's tables
    "address not in the world": Invlpg(0, 0x1234000),
    "target frame not in the world": WritePte(0, 4, 1, Entry(0x999, 1), 8),
    # representable in bytes, but they would decode to a different program
    "entry flag G (bit 8)": WritePte(0, 4, 1, Entry(5, 0x101), 8),
    "read with a seed": Access(**{**_READ, "seed": 5}),
    "cpl 1": Access(**{**_READ, "cpl": 1}),
    "move with npages": Memslot(0, 1, MemslotChange.MOVE, 8, 4, 0),
    "1 GiB map in PAE tables": Map(0, None, GuestMode.PAE, 0x1000, Entry(5, 1), 3, 0, 8),
    "upper entries with P": Map(0, None, None, 0x1000, Entry(5, 1), 1, 1, 8),
}


@pytest.mark.parametrize(
    "op", [pytest.param(op, id=name)
           for name, op in (_OUTSIDE_OK | _OUTSIDE_SILENT).items()])
def test_encode_raises_value_error_outside_the_world(op: Op) -> None:
    """codec.encode: 'raises ValueError for values outside the world' (else the bytes would
    decode to another program)."""
    with pytest.raises(ValueError):
        encode(Program(Header(), (op,)))
