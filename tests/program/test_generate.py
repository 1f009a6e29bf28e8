"""The op-level generator: deterministic, and a swarm restricts it to its kinds."""

from __future__ import annotations

import random

import pytest

from fuzzmmu.model.mmu.internal import Point
from fuzzmmu.program import world as W
from fuzzmmu.program.generate import OP_KINDS, Generator, kinds_of, op_kind
from fuzzmmu.program.ops import (
    Access,
    CrBit,
    GuestMode,
    Header,
    Interleave,
    Memslot,
    Program,
    Rsm,
    SetBit,
    SetMode,
    Smi,
)
from fuzzmmu.world.layout import new_world
from fuzzmmu.world.memslots import MemslotChange, MemslotError, MemslotUpdate


def test_same_seed_same_program() -> None:
    assert Generator(random.Random(7)).program(20) == Generator(random.Random(7)).program(20)


def test_without_a_swarm_every_kind_is_drawn() -> None:
    gen = Generator(random.Random(1))
    assert {op_kind(gen.op()) for _ in range(2000)} == {k for k, _ in OP_KINDS}


@pytest.mark.parametrize("kinds", [{"pte"}, {"smm", "memslot"}, {"interleave", "cr3"},
                                   {"interleave"}])
def test_a_swarm_draws_only_its_kinds(kinds: set[str]) -> None:
    gen = Generator(random.Random(3), kinds=kinds)
    drawn = {op_kind(gen.op()) for _ in range(500)}
    allowed = kinds | ({"access"} if kinds == {"interleave"} else set())
    assert drawn == allowed
    if "interleave" in kinds:  # an interleave's first part is a plain op
        ops = [gen.op() for _ in range(200)]
        assert any(isinstance(op, Interleave) for op in ops)


def test_kinds_of_a_program() -> None:
    program = Generator(random.Random(5), kinds={"access", "invlpg"}).program(30)
    # The first two ops of a generated program are maps (something to translate).
    assert kinds_of(program) == {"map", "access", "invlpg"}


def test_a_swarm_mostly_of_interleaves_draws_without_recursing() -> None:
    # An interleave's first part is a plain op of the swarm; drawn as "any op, again while an
    # interleave" each retry could nest a whole interleave, and with interleaves 80% of the
    # swarm the nesting did not end (a campaign's mutator died of RecursionError).
    for seed in range(200):
        gen = Generator(random.Random(seed), kinds={"interleave", "memslot"})
        for _ in range(50):
            op = gen.op()
            if isinstance(op, Interleave):
                assert not isinstance(op.first, Interleave)


def test_an_interleave_is_drawn_to_fit_its_point() -> None:
    # A memslot update is what reaches the publish point; at the fault-path points the second
    # part is another vCPU or the host, never a memslot update; inside mmu_lock, only another
    # vCPU's access. Drawn otherwise, the second part cannot run at the point.
    gen = Generator(random.Random(11), kinds={"interleave"})
    points = set()
    for _ in range(400):
        op = gen.op()
        if not isinstance(op, Interleave):
            continue
        points.add(op.point)
        if op.point is Point.MEMSLOT_PUBLISH:
            assert isinstance(op.first, Memslot)
            continue
        assert not any(isinstance(s, Memslot) for s in op.second)
        vcpu = getattr(op.first, "vcpu", None)
        assert all(getattr(s, "vcpu", None) != vcpu for s in op.second if vcpu is not None)
        if op.point.locked:
            assert all(isinstance(s, Access) for s in op.second)
    assert points == set(Point)


def test_memslot_updates_fit_the_slots_the_program_has() -> None:
    # Each update is checked as KVM_SET_USER_MEMORY_REGION would check it, against the slots
    # the updates before it left; most are taken, and deleted regions come back.
    accepted = rejected = recreated = 0
    for seed in range(300):
        gen = Generator(random.Random(seed), kinds={"memslot"})
        _, slots, _ = new_world()
        deleted: set[tuple[int, int, int]] = set()
        for _ in range(6):
            op = gen.op()
            assert isinstance(op, Memslot)
            upd = MemslotUpdate(op.change, op.as_id, op.slot, op.base, op.npages, op.hva)
            try:
                old, new = slots.check(upd)
            except MemslotError:
                rejected += 1
                continue
            accepted += 1
            if old is not None and new is None:
                deleted.add((old.as_id, old.base_gfn, old.hva))
            if old is None and new is not None and (new.as_id, new.base_gfn, new.hva) in deleted:
                recreated += 1
            slots.install(old, new)
    assert accepted > 4 * rejected
    assert recreated > 50


def test_an_inserted_memslot_update_sees_the_program_s_slots() -> None:
    # With a program as context, the generator starts from the slots its updates left: a
    # slot the program deleted is not deleted again.
    context = Program(Generator(random.Random(0)).random_header(),
                      (Memslot(0, 1, MemslotChange.DELETE),))
    for seed in range(100):
        gen = Generator(random.Random(seed), context.header, context, kinds={"memslot"})
        assert 1 not in gen.memslots.spaces[0]


def test_smis_and_rsms_mostly_fit_the_vcpu_s_mode() -> None:
    # An RSM outside SMM is #UD and an SMI inside SMM is only latched: most drawn transitions
    # are ones the vCPU can make.
    gen = Generator(random.Random(4), kinds={"smm"})
    in_smm = [False, False]
    fit = 0
    for _ in range(1000):
        op = gen.op()
        assert isinstance(op, Smi | Rsm)
        fit += isinstance(op, Smi) != in_smm[op.vcpu]
        in_smm[op.vcpu] = isinstance(op, Smi)
    assert fit > 800


def test_the_generator_follows_the_vcpus_control_bits() -> None:
    # As the ops drawn so far leave them: at reset CR0.WP on and the rest off, CR4.PSE from
    # a 32-bit PSE boot; an SMI clears CR4 and EFER, RSM restores them.
    gen = Generator(random.Random(5), Header(boot=GuestMode.BIT32_PSE),
                    kinds={"set", "smm", "mode"})
    bits = [{CrBit.WP, CrBit.PSE}, {CrBit.WP, CrBit.PSE}]
    saved: list[set[CrBit]] = [set(), set()]
    in_smm = [False, False]
    kinds = set()
    for _ in range(2000):
        op = gen.op()
        kinds.add(type(op))
        if isinstance(op, SetBit):
            (bits[op.vcpu].add if op.on else bits[op.vcpu].discard)(op.bit)
        elif isinstance(op, SetMode):
            bits[op.vcpu].discard(CrBit.PSE)
            if op.mode is GuestMode.BIT32_PSE:
                bits[op.vcpu].add(CrBit.PSE)
        elif isinstance(op, Smi) and not in_smm[op.vcpu]:
            in_smm[op.vcpu], saved[op.vcpu] = True, bits[op.vcpu]
            bits[op.vcpu] = bits[op.vcpu] & {CrBit.WP}
        elif isinstance(op, Rsm) and in_smm[op.vcpu]:
            in_smm[op.vcpu], bits[op.vcpu] = False, saved[op.vcpu]
        assert [set(b) for b in gen.bits] == bits
    assert kinds == {SetBit, SetMode, Smi, Rsm}


def test_a_flip_sees_the_control_bits_the_program_leaves() -> None:
    context = Program(Header(boot=GuestMode.LONG4),
                      (SetBit(0, CrBit.WP, False), SetBit(0, CrBit.SMAP, True),
                       SetMode(1, GuestMode.BIT32_PSE, 1)))
    for seed in range(50):
        gen = Generator(random.Random(seed), context.header, context)
        assert gen.bits == [{CrBit.SMAP}, {CrBit.WP, CrBit.PSE}]
        op = gen.flip(0)
        assert op.vcpu == 0 and op.on == (op.bit is not CrBit.SMAP)


def test_a_switch_of_address_space_is_the_move_the_vcpu_can_make() -> None:
    context = Program(Header(boot=GuestMode.LONG4), (Smi(1),))
    gen = Generator(random.Random(1), context.header, context)
    # cpu0 is outside SMM, cpu1 inside: an SMI for one, an RSM for the other, and back
    assert [gen.switch_space(0), gen.switch_space(1)] == [Smi(0), Rsm(1)]
    assert [gen.switch_space(0), gen.switch_space(1)] == [Rsm(0), Smi(1)]


def test_a_memslot_update_is_one_kvm_takes_on_the_slots_the_program_leaves() -> None:
    context = Program(Header(boot=GuestMode.LONG4),
                      (Memslot(0, 1, MemslotChange.DELETE), Memslot(1, 2, MemslotChange.DELETE)))
    taken = 0
    for seed in range(100):
        gen = Generator(random.Random(seed), context.header, context)
        assert {(m.as_id, m.slot_id) for m in gen.memslots.all_slots()} == {(0, 0), (1, 0),
                                                                           (1, 1)}
        before = gen.memslots.copy()
        op = gen.memslot_update()
        try:  # what KVM_SET_USER_MEMORY_REGION says to it on the slots the program left
            old, new = before.check(
                MemslotUpdate(op.change, op.as_id, op.slot, op.base, op.npages, op.hva))
        except MemslotError:
            continue  # now and then one drawn blindly, as a VMM may err
        taken += 1
        if old is not new:
            before.install(old, new)
        assert sorted(map(str, gen.memslots.all_slots())) == sorted(
            map(str, before.all_slots()))  # and the generator follows it
    assert taken >= 80


def test_a_deleted_region_comes_back_to_its_own_address_space_often_whole() -> None:
    # A VMM deletes a slot and registers the region again (QEMU does to change a slot): the
    # creates drawn after a delete bring the region back to its address space, under its old
    # slot id, and often as much of it as one update can.
    context = Program(Generator(random.Random(0)).random_header(),
                      (Memslot(1, 0, MemslotChange.DELETE),))
    creates = back = whole = 0
    for seed in range(400):
        gen = Generator(random.Random(seed), context.header, context, kinds={"memslot"})
        op = gen.op()
        if op.change is not MemslotChange.CREATE:
            continue
        creates += 1
        if (op.as_id, op.slot, op.base, op.hva) == (1, 0, 0, 0):
            back += 1
            whole += op.npages == max(W.SLOT_SIZES)
    assert back > creates / 2
    assert whole > back / 2
