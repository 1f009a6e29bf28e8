"""The fuzz target's pieces: the mutator stays inside the program space and is the only one
libFuzzer uses, and a divergence of each kind surfaces as its own exception from its own
function."""

from __future__ import annotations

import random
import re
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzzmmu.arch.bits import PTE_A, PTE_D, PTE_NX, PTE_P, PTE_U, PTE_W
from fuzzmmu.campaign import harness
from fuzzmmu.campaign.harness import RAISERS, mutate
from fuzzmmu.oracle.divergence import Divergence, DivergenceKind
from fuzzmmu.program.codec import HEADER_SIZE, MAX_OPS, RECORD_SIZE, decode, encode
from fuzzmmu.program.files import read_program
from fuzzmmu.program.ops import Op, Program

MAX_LEN = HEADER_SIZE + RECORD_SIZE * MAX_OPS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700), st.integers(0, 2**32 - 1),
       st.integers(min_value=HEADER_SIZE, max_value=MAX_LEN))
def test_mutate_any_bytes_gives_a_valid_program_within_max_size(data: bytes, seed: int,
                                                                max_size: int) -> None:
    out = mutate(data, max_size, seed)
    assert len(out) <= max_size
    program = decode(out)
    assert decode(encode(program)) == program
    assert mutate(data, max_size, seed) == out  # deterministic in (data, max_size, seed)


def test_libfuzzer_mutates_only_through_the_op_level_mutator(tmp_path: Path) -> None:
    """libFuzzer names the mutations behind each input it keeps ("MS: 2 Custom-Custom-"; its
    own byte mutations too, which the op-level mutator hands a share of its calls); a custom
    crossover would take half of the calls ("CustomCrossOver")."""
    import subprocess
    import sys

    harness_py = Path(__file__).resolve().parents[2] / "harnesses" / "shadow_mmu_fuzzer.py"
    out = subprocess.run([sys.executable, str(harness_py), "-runs=400", "-seed=1",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    sequences = re.findall(r"MS: \d+ (\S+)", out.stderr)
    assert sequences, out.stderr[-2000:]
    used = [m for seq in sequences for m in seq.strip("-").split("-")]
    assert "Custom" in used and "CustomCrossOver" not in used


def test_mutate_uses_the_byte_mutator_for_its_share() -> None:
    calls = []

    def byte_mutator(data: bytes, max_size: int) -> bytes:
        calls.append(len(data))
        return data[::-1]

    for seed in range(200):
        mutate(b"\x00" * 20, MAX_LEN, seed, byte_mutator, byte_share=0.25)
    assert 25 <= len(calls) <= 80
    calls.clear()
    for seed in range(50):
        mutate(b"\x00" * 20, MAX_LEN, seed, byte_mutator, byte_share=0.0)
    assert not calls


def test_one_input_is_quiet_without_divergence() -> None:
    harness.test_one_input(encode(read_program("corpus/4level-basic.txt")))


def test_one_input_raises_the_kind_of_the_divergence() -> None:
    data = encode(read_program("tests/bugs/reproducers/misaligned-pt-write-two-sptes.txt"))
    with pytest.raises(harness.MissingFault) as err:
        harness.test_one_input(data, ("misaligned-pt-write-two-sptes",))
    assert err.value.divergence.kind is DivergenceKind.MISSING_FAULT


def test_every_kind_has_its_own_exception_and_top_frame() -> None:
    seen_types, seen_frames = set(), set()
    for kind in DivergenceKind:
        d = Divergence(kind, 0, "op", "step", "e", "a", f"{kind.value}:x")
        with pytest.raises(harness.DivergenceFound) as err:
            RAISERS[kind](d)
        seen_types.add(type(err.value))
        seen_frames.add(traceback.extract_tb(err.value.__traceback__)[-1].name)
    assert len(seen_types) == len(seen_frames) == len(DivergenceKind)


# -- swarm programs and breadth


SWARM_PROGRAM = """\
# fuzzmmu program v1
config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level
map cpu0 root=current current 0x40000000 -> 0x0 P|W level=1 upper=W pool=0x8
read cpu0 0x40000000+0x0 width=8 cpl=0
write cpu1 0x40000000+0x8 width=4 cpl=3 seed=0x1
"""


def test_inserted_ops_keep_to_the_programs_kinds_most_of_the_time() -> None:
    import random

    from fuzzmmu.program.generate import op_kind
    from fuzzmmu.program.text import parse_program

    program = parse_program(SWARM_PROGRAM)
    header = encode(program)[:HEADER_SIZE]
    inside = outside = 0
    for seed in range(2000):
        recs = harness._new_records(random.Random(seed), program)
        op = decode(header + b"".join(recs)).ops[0]
        if op_kind(op) in ("map", "access"):
            inside += 1
        else:
            outside += 1
    # 25% uniform records and 20% of generated ops may leave the swarm; the generator alone
    # draws a map or an access less than half the time.
    assert inside / (inside + outside) > 0.7
    assert outside > 100  # and the lineage does leave it


def test_fresh_programs_are_breadth_first_and_leave_kinds_out() -> None:
    import random

    from fuzzmmu.program.generate import OP_KINDS, kinds_of
    from fuzzmmu.program.ops import GuestMode

    modes, policies, kind_sets = set(), set(), set()
    for seed in range(300):
        draft = harness._Draft(b"", [], decode(b""))
        harness._fresh(random.Random(seed), draft)
        program = decode(draft.header + b"".join(draft.recs))
        assert len(draft.header) == HEADER_SIZE and program.ops
        modes.add(program.header.boot)
        policies.add(program.header.policy)
        kind_sets.add(kinds_of(program))
    assert modes == set(GuestMode) and policies == {"zap", "update"}
    assert len(kind_sets) > 50  # swarms differ
    assert any(len(k) < len(OP_KINDS) // 2 for k in kind_sets)


def test_random_swarm_always_keeps_maps_and_accesses() -> None:
    import random

    swarms = [harness.random_swarm(random.Random(s)) for s in range(200)]
    assert all({"map", "access"} <= s.keys() for s in swarms)
    assert len({frozenset(s) for s in swarms}) > 100
    # each kind kept is weighed on its own
    assert all(set(s.values()) <= set(harness.SWARM_SCALES) for s in swarms)
    assert len({tuple(sorted(s.items())) for s in swarms}) > 190


def test_a_swarm_s_scales_shape_the_programs_it_generates() -> None:
    import random

    from fuzzmmu.program.generate import Generator, op_kind

    def share_of_maps(scale: float) -> float:
        gen = Generator(random.Random(3), kinds={"access": 1.0, "map": scale})
        ops = [gen.op() for _ in range(2000)]
        return sum(op_kind(op) == "map" for op in ops) / len(ops)

    # the generator's own weights are 30 accesses to 16 maps
    assert share_of_maps(4.0) > 0.6 > 0.35 > share_of_maps(1.0) > 0.3 > 0.15 > share_of_maps(0.25)


def _mutated(mutation: Callable[[random.Random, harness._Draft], None], program: Program,
             seed: int) -> tuple[tuple[Op, ...], list[Op]]:
    """The ops of ``program`` after one ``mutation`` with ``seed``, and those it added."""
    header, recs = harness._records(encode(program))
    draft = harness._Draft(header, list(recs), program)
    mutation(random.Random(seed), draft)
    ops = decode(draft.header + b"".join(draft.recs)).ops
    return ops, [op for op in ops if op not in program.ops]


def test_a_reaccess_touches_an_accessed_address_again_another_way() -> None:

    from fuzzmmu.program.ops import Access, CrBit, Invlpg, Memslot, SetBit, Smi
    from fuzzmmu.program.text import parse_program

    program = parse_program(SWARM_PROGRAM)
    accesses = [op for op in program.ops if isinstance(op, Access)]
    changed = set()
    flipped = slots = switched = 0
    for seed in range(300):
        ops, added = _mutated(harness._reaccess, program, seed)
        new = added[-1]
        assert isinstance(new, Access) and len(added) in (1, 2, 3)
        # in front of the copy, maybe a control bit of its vCPU flipped, a memslot update or
        # an SMI of its vCPU, then an INVLPG
        if len(added) > 1 and isinstance(added[0], SetBit):
            flipped += 1
            # flipped: the program never set a bit, so CR0.WP is on and the others off
            assert added[0].vcpu == new.vcpu and added[0].on == (added[0].bit is not CrBit.WP)
            added = added[1:]
        elif len(added) > 1 and isinstance(added[0], Memslot):
            slots += 1
            added = added[1:]
        elif len(added) > 1 and isinstance(added[0], Smi):
            switched += 1  # the program has no SMI: the vCPU is outside SMM
            assert added[0].vcpu == new.vcpu
            added = added[1:]
        assert all(isinstance(op, Invlpg) and op.va == new.va for op in added[:-1])
        # a copy of an earlier access with one field changed, placed after it
        origin = [a for a in accesses if sum(x != y for x, y in zip(
            (a.kind, a.cpl, a.ac, a.vcpu), (new.kind, new.cpl, new.ac, new.vcpu),
            strict=True)) == 1 and (a.va, a.offset, a.width) == (new.va, new.offset, new.width)]
        assert origin and ops.index(new) > ops.index(origin[0])
        changed |= {f for f in ("kind", "cpl", "ac", "vcpu")
                    if getattr(new, f) != getattr(origin[0], f)}
    assert changed == {"kind", "cpl", "ac", "vcpu"}
    assert 60 < flipped < 120  # 30%
    assert 8 < slots < 40 and 8 < switched < 40  # 7.5% each


ALIAS_PROGRAM = """\
# fuzzmmu program v1
config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level
map cpu0 root=current current 0x0 -> 0x5 P|W|U|A level=1 upper=W|U pool=0x8
map cpu1 root=current current 0x201000 -> 0x0 P|W|U|A|D level=2 upper=W|U pool=0x8
pte cpu0 table=0x9 index=0x100 -> 0xa P|W|U|A width=8
store cpu1 frame=0xa offset=0x10 width=8 -> 0x6 P|W|A|D
read cpu0 0x0+0x0 width=8 cpl=0
"""


def test_an_alias_maps_a_mapped_frame_through_a_neighbouring_entry_with_other_rights() -> None:

    from fuzzmmu.program.ops import Access, Map, Store, WritePte
    from fuzzmmu.program.text import parse_program

    program = parse_program(ALIAS_PROGRAM)
    rights = {1 << 1, 1 << 2, 1 << 63}
    seen: set[tuple[str, int]] = set()
    for seed in range(300):
        ops, added = _mutated(harness._alias, program, seed)
        alias = added[0]
        origin = next(op for op in program.ops
                      if type(op) is type(alias) and op.entry.target == alias.entry.target)
        # after its original, with the same target and exactly one right changed
        assert ops.index(alias) > ops.index(origin)
        assert alias.entry.flags ^ origin.entry.flags in rights
        changed = alias.entry.flags ^ origin.entry.flags
        if isinstance(alias, WritePte):
            assert isinstance(origin, WritePte) and len(added) == 1
            # the next slot of the same table
            assert (alias.table, alias.width, alias.index) == (origin.table, 8, 0x101)
            seen.add(("pte", changed))
            continue
        if isinstance(alias, Store):
            assert isinstance(origin, Store) and len(added) == 1
            # an entry next to the one stored to, in the same frame
            assert (alias.frame, alias.width, alias.vcpu) == (origin.frame, 8, 1)
            assert alias.offset in (0x8, 0x18)
            seen.add(("store", changed))
            continue
        assert isinstance(alias, Map) and isinstance(origin, Map)
        # the next address of the leaf's level: the neighbouring entry of the same table
        assert alias.va == origin.va ^ {1: 0x1000, 2: 0x200000}[origin.level]
        assert (alias.level, alias.pool, alias.vcpu) == (origin.level, origin.pool, origin.vcpu)
        touches = added[1:]
        assert 1 <= len(touches) <= 2 and all(isinstance(t, Access) for t in touches)
        assert [t.va for t in touches] == [alias.va, origin.va][:len(touches)]
        assert all(t.vcpu == origin.vcpu for t in touches)
        seen.add((f"map{origin.level}", changed))
    # every right changed on each of the four
    assert seen == {(k, r) for k in ("pte", "store", "map1", "map2") for r in rights}


def test_an_alias_of_a_program_without_maps_inserts_an_op() -> None:
    import random

    data = encode(decode(b""))
    header, recs = harness._records(data)
    draft = harness._Draft(header, list(recs), decode(data))
    harness._alias(random.Random(1), draft)
    assert len(draft.recs) >= 1


VACATE_PROGRAM = """\
# fuzzmmu program v1
config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level
map cpu0 root=current current 0x1000 -> 0x5 P|W|A level=1 upper=W|A pool=0x8
read cpu0 0x1000+0x0 width=8 cpl=0
smi cpu1
read cpu1 0x200000+0x0 width=8 cpl=0
"""


def test_a_vacate_takes_a_memslot_from_under_an_access_and_gives_it_back() -> None:
    from fuzzmmu.program import world as W
    from fuzzmmu.program.ops import Access, Memslot
    from fuzzmmu.program.text import parse_program
    from fuzzmmu.world.layout import DEFAULT_SLOTS
    from fuzzmmu.world.memslots import MemslotChange

    program = parse_program(VACATE_PROGRAM)
    boot_slots = {(m.as_id, m.slot_id): m for m in DEFAULT_SLOTS}
    seen = set()
    for seed in range(200):
        ops, _ = _mutated(harness._vacate, program, seed)
        assert len(ops) == len(program.ops) + 3
        k = next(i for i, op in enumerate(ops) if isinstance(op, Memslot))
        delete, access = ops[k], ops[k + 1]
        assert isinstance(delete, Memslot) and delete.change is MemslotChange.DELETE
        assert isinstance(access, Access) and access in program.ops
        # the address space the access's vCPU is in: cpu1 is in SMM
        assert delete.as_id == access.vcpu
        j = next(i for i, op in enumerate(ops) if i > k and isinstance(op, Memslot))
        back = ops[j]
        assert isinstance(back, Memslot) and back.change is MemslotChange.CREATE
        slot = boot_slots[delete.as_id, delete.slot]
        assert (back.as_id, back.slot, back.base, back.hva) == (
            delete.as_id, delete.slot, slot.base_gfn, slot.hva)
        assert back.npages == max(n for n in W.SLOT_SIZES if n <= slot.npages)
        assert ops[j + 1] == access  # the same access once more
        seen.add((delete.as_id, delete.slot))
    assert seen == set(boot_slots)


FILL_PROGRAM = """\
# fuzzmmu program v1
config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level
map cpu0 root=current current 0x1000 -> 0x30 P|W|A level=1 upper=W|A pool=0x8
map cpu0 root=current current 0x0 -> 0x5 P|W|A level=1 upper=W|A pool=0x8
read cpu0 0x1000+0x0 width=8 cpl=0
smi cpu1
read cpu1 0x0+0x0 width=8 cpl=0
"""


def test_a_fill_gives_memory_to_a_mapped_gfn_that_has_none_and_accesses_it_again() -> None:
    from fuzzmmu.model.mmu.internal import Point
    from fuzzmmu.program.ops import Access, Interleave, Memslot
    from fuzzmmu.program.text import parse_program
    from fuzzmmu.world.layout import MMIO_HOLE
    from fuzzmmu.world.memslots import MemslotChange

    program = parse_program(FILL_PROGRAM)
    filled = vacated = raced = 0
    regions = set()
    for seed in range(200):
        ops, _ = _mutated(harness._fill, program, seed)
        flat = Program(program.header, ops).flat_ops()
        slots = [i for i, op in enumerate(flat) if isinstance(op, Memslot)]
        if len(slots) == 2:  # cpu1's access: gfn 0x30 is SMRAM in SMM, so vacate instead
            vacated += 1
            continue
        filled += 1
        assert len(slots) == 1
        create = flat[slots[0]]
        assert isinstance(create, Memslot) and create.change is MemslotChange.CREATE
        # the hole's gfn 0x30 in address space 0 (cpu0 is outside SMM), in the first free
        # slot, the region within the hole
        assert create.as_id == 0 and create.slot == 2
        assert create.base <= 0x30 < create.base + create.npages
        assert set(range(create.base, create.base + create.npages)) <= set(MMIO_HOLE)
        regions.add((create.base, create.npages))
        # after the access to the address mapped to it, and the same access after it
        access = program.ops[2]
        assert isinstance(access, Access)
        k = next(i for i, op in enumerate(ops) if create in (op, getattr(op, "first", None)))
        assert ops.index(access) < k and access in ops[k + 1:]
        if isinstance(ops[k], Interleave):
            # now and then with the access, from either vCPU, inside the update: after its
            # generation is published, before the MMIO sptes of the old one are zapped
            assert ops[k].point is Point.MEMSLOT_PUBLISH and len(ops[k].second) == 1
            assert replace(ops[k].second[0], vcpu=0) == access
            raced += 1
        else:
            assert len(ops) == len(program.ops) + 2
    assert filled > 60 and vacated > 60 and 15 < raced < filled // 2
    assert regions == {(0x30, 1), (0x30, 4), (0x30, 8)}


def test_a_fill_takes_a_memslot_that_is_free_where_it_goes_in() -> None:
    from fuzzmmu.program.ops import Memslot
    from fuzzmmu.program.text import parse_program

    # slot 2 is free at the access and taken after it
    program = parse_program(FILL_PROGRAM.split("smi")[0]
                            + "memslot as=0 slot=2 create base=0x40 npages=1 hva=0x30\n")
    taken = {False: set(), True: set()}
    for seed in range(100):
        ops, _ = _mutated(harness._fill, program, seed)
        flat = Program(program.header, ops).flat_ops()
        made = [i for i, op in enumerate(flat) if isinstance(op, Memslot) and op.base != 0x40]
        assert len(made) == 1
        given = flat[made[0]]
        assert isinstance(given, Memslot)
        taken[made[0] > flat.index(program.ops[-1])].add(given.slot)
    assert taken == {False: {2}, True: {3}}


def test_a_mutator_that_raises_ends_the_process_with_the_call_that_reproduces_it() -> None:
    import subprocess
    import sys

    script = ("from fuzzmmu.campaign.harness import exit_on_error\n"
              "@exit_on_error\n"
              "def CustomMutator(data, max_size, seed):\n"
              "    return data[:max_size // seed]\n"
              "assert CustomMutator(b'abc', 4, 2) == b'ab'\n"  # quiet while it works
              "CustomMutator(b'ab', 10, 0)\n"
              "print('not reached')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == harness.MUTATOR_FAILED, out.stderr
    assert "not reached" not in out.stdout
    assert ("CustomMutator raised on data=bytes.fromhex('6162'), max_size=10, seed=0"
            in out.stderr)
    assert out.stderr.rstrip().endswith("ZeroDivisionError: integer division or modulo by zero")


def test_the_target_stops_when_its_mutator_raises_instead_of_hanging(tmp_path: Path) -> None:
    """Atheris leaves a process whose custom mutator raised hanging; the target exits."""
    import subprocess
    import sys

    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "seed").write_bytes(Path("corpus/4level-basic").read_bytes())
    script = ("import runpy, sys\n"
              "import fuzzmmu.campaign.harness as h\n"
              "def mutate(data, max_size, seed, *rest):\n"
              "    raise RuntimeError('a bug in the mutator')\n"
              "h.mutate = mutate\n"
              "sys.argv = ['harnesses/shadow_mmu_fuzzer.py'] + sys.argv[1:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", script, str(corpus), "-runs=1000", "-seed=1",
                          "-max_len=516"], capture_output=True, text=True, timeout=60,
                         env={"FUZZMMU_FEEDBACK": "state", "PATH": "/usr/bin:/bin"})
    assert out.returncode == harness.MUTATOR_FAILED, out.stderr[-2000:]
    assert "RuntimeError: a bug in the mutator" in out.stderr
    assert "CustomMutator raised on data=bytes.fromhex(" in out.stderr


REWRITE_PROGRAM = """\
# fuzzmmu program v1
config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot={boot}
map cpu0 root=current current 0x1000 -> 0x5 P|W|U level=1 upper=W|U pool=0x8
read cpu0 0x1000+0x0 width=8 cpl=3
"""


PRESENT_RW_USER = PTE_P | PTE_W | PTE_U  # how REWRITE_PROGRAM's map writes each entry


@pytest.mark.parametrize(("boot", "size", "entries"), [
    # 32-bit paging: the PDE in the boot root (frame 1), the PTE in the pool's first frame
    ("32bit", 4, {(1, 0): 8, (8, 4): 5}),
    # 4-level paging: PML4E, PDPTE, PDE, PTE in the root and three pool frames
    ("4level", 8, {(1, 0): 8, (8, 0): 9, (9, 0): 10, (10, 8): 5}),
])
def test_a_rewrite_writes_an_entry_the_access_walked_and_accesses_again(
        boot: str, size: int, entries: dict[tuple[int, int], int]) -> None:
    from fuzzmmu.model.mmu.internal import Point
    from fuzzmmu.program.ops import Access, Interleave, Invlpg, Store, WritePte
    from fuzzmmu.program.text import parse_program
    from fuzzmmu.program.world import Extra

    program = parse_program(REWRITE_PROGRAM.format(boot=boot))
    access = program.ops[1]
    assert isinstance(access, Access)
    bits = {PTE_W, PTE_U, PTE_P, PTE_A, PTE_D} | ({PTE_NX} if size == 8 else set())
    extras = {Extra.RSVD, Extra.BIT13} | ({Extra.BIT62} if size == 8 else set())
    rewritten, straddled, flipped, kinds, marked = set(), set(), set(), set(), set()
    points, others, after, flushed = set(), 0, 0, 0
    for seed in range(400):
        ops, _ = _mutated(harness._rewrite, program, seed)
        assert ops[0] == program.ops[0]
        if isinstance(ops[1], Interleave):
            # the other vCPU writes while the access is inside KVM, maybe walks the same way
            # itself; the access runs again behind an INVLPG of its address
            race = ops[1]
            assert race.first == access and race.point in harness._RACE_POINTS
            points.add(race.point)
            write, rest = race.second[0], race.second[1:]
            assert write.vcpu == 1 and rest in ((), (replace(access, vcpu=1),))
            assert ops[2] == Invlpg(0, access.va)
            again = ops[3:]
        else:
            assert ops[1] == access
            write, again = ops[2], ops[3:]
            after += 1
            if again[0] == Invlpg(0, access.va):  # half the time behind an INVLPG
                again = again[1:]
                flushed += 1
        # the access again, now and then as another kind of access, or from both vCPUs
        assert isinstance(again[0], Access) and again[0].vcpu == 0
        assert replace(again[0], kind=access.kind, seed=0) == access
        kinds.add(again[0].kind)
        assert again[1:] in ((), (replace(again[0], vcpu=1),))
        others += len(again) == 2
        if isinstance(write, WritePte):
            # an entry the walk read, with one bit of its rights, presence or A/D flipped
            # (every entry on the way is present, writable and user), or a bit that is
            # reserved in some modes only
            assert write.width == size
            assert write.entry.target == entries[write.table, write.index * size]
            if write.entry.extra is Extra.NONE:
                assert write.entry.flags ^ PRESENT_RW_USER in bits
                flipped.add(write.entry.flags ^ PRESENT_RW_USER)
            else:
                assert write.entry.flags == PRESENT_RW_USER
                marked.add(write.entry.extra)
            rewritten.add(write.table)
        else:
            # a store across the boundary of an entry the walk read and its neighbour's
            assert isinstance(write, Store) and write.width in (2, 4, 8)
            assert any(frame == write.frame and write.offset < b < write.offset + write.width
                       for frame, at in entries for b in (at, at + size))
            straddled.add(write.frame)
    frames = {frame for frame, _ in entries}
    assert rewritten == frames and straddled == frames
    assert flipped == bits and marked == extras and len(kinds) == 3
    assert points == set(harness._RACE_POINTS) and Point.MEMSLOT_PUBLISH not in points
    assert 200 < after < 340 and 60 < others < 180 and 0.35 < flushed / after < 0.65


def test_a_rewrite_races_only_an_access_of_its_own() -> None:
    """An access that is part of an interleave is not made the first of another one."""
    from fuzzmmu.program.text import parse_program

    program = parse_program(REWRITE_PROGRAM.format(boot="4level").replace(
        "read cpu0", "interleave at=walked\n  read cpu0") + "  zap-all\n" + "zap-all\n")
    _, recs = harness._records(encode(program))
    # map; interleave header, its read, its zap-all; zap-all
    assert [harness._top_level(recs, i) for i in range(len(recs))] == [
        True, True, False, False, True]


SHARE_PROGRAM = """\
# fuzzmmu program v1
config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level
pte cpu0 table=0x1 index=0 -> 0x8 P|W|U|A width=8
pte cpu0 table=0x8 index=0 -> 0x9 P|W|U|A width=8
pte cpu0 table=0x9 index=0 -> 0xa P|U|A width=8
pte cpu0 table=0x9 index=1 -> 0xb P|W|U|A width=8
pte cpu0 table=0xa index=0 -> 0x5 P|W|U|A|D width=8
pte cpu0 table=0xb index=0 -> 0x6 P|W|U|A|D width=8
read cpu0 0x0+0x0 width=8 cpl=3
write cpu0 0x200000+0x0 width=8 cpl=3 seed=0x1
"""


def test_a_share_links_a_walked_table_twice_and_replays_its_accesses_the_other_way() -> None:
    from fuzzmmu.program.ops import Access, Invlpg, WritePte
    from fuzzmmu.program.text import parse_program
    from fuzzmmu.world.observe import AccessKind

    program = parse_program(SHARE_PROGRAM)
    entries = {(op.table, op.index): op.entry for op in program.ops if isinstance(op, WritePte)}
    accesses = [op for op in program.ops if isinstance(op, Access)]
    level_of = {0x1: 4, 0x8: 3, 0x9: 2, 0xA: 1, 0xB: 1}  # the table in each frame
    levels, both, written = set(), 0, 0
    for seed in range(300):
        ops, _ = _mutated(harness._share, program, seed)
        k = next(i for i, op in enumerate(ops) if op not in program.ops)
        link = ops[k]
        assert isinstance(link, WritePte) and link.width == 8
        # an entry the walk read, written again at another index of its table, one right
        # (W, U or NX) changed
        first = next(j for (t, j), e in entries.items()
                     if t == link.table and j != link.index and e.target == link.entry.target)
        assert link.entry.flags ^ entries[link.table, first].flags in (PTE_W, PTE_U, PTE_NX)
        level = level_of[link.table]
        levels.add(level)
        shift = 12 + 9 * (level - 1)
        # then the program's accesses through the first entry, in their order, through the
        # second (addresses that differ at that level only), maybe the first access again
        added = list(ops[k + 1:])
        flushes = [j for j, op in enumerate(added) if isinstance(op, Invlpg)]
        if flushes:
            # then, now and then, both ways written: the second one's first replay as a
            # write, an INVLPG and the walked access as a write
            j, = flushes
            first_write, flush, last_write = added[j - 1:j + 2]
            assert isinstance(first_write, Access) and isinstance(last_write, Access)
            assert isinstance(added[0], Access) and first_write.kind is AccessKind.WRITE
            assert replace(first_write, kind=added[0].kind, seed=added[0].seed) == added[0]
            walked = next(a for a in accesses
                          if replace(last_write, kind=a.kind, seed=a.seed) == a)
            assert flush == Invlpg(walked.vcpu, walked.va)
            assert last_write.kind is AccessKind.WRITE and last_write.seed
            del added[j - 1:j + 2]
            written += 1
        moved = [op for op in added if op not in accesses]
        assert all(isinstance(m, Access) and m.va >> shift == moved[0].va >> shift
                   and (m.va >> shift) & 511 == link.index for m in moved)
        way = moved[0].va >> shift ^ link.index ^ first
        assert [replace(m, va=0) for m in moved] == [
            replace(a, va=0) for a in accesses if a.va >> shift == way]
        both += len(moved) == 2
    assert levels == {3, 2, 1} and both > 30 and 50 < written < 150
