"""The executor and the differential oracle (fuzzmmu.oracle.executor): runs are deterministic
(in one process, across processes, whatever ran before), the clean model never diverges on
long random programs, and each kind of model misbehaviour is reported as its divergence kind,
at its op, with a sensible signature. Misbehaviour is injected into the MODEL only (pytest's
monkeypatch on one model function); the reference and the oracle are never touched."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import runsummary
from runsummary import RACE, summary

import fuzzmmu.model.emulator as emulator
import fuzzmmu.model.machine as vm
import fuzzmmu.model.mmu.fault as fault
import fuzzmmu.model.mmu.walk as walk
from fuzzmmu.arch.bits import EFER_NXE, PFERR_W
from fuzzmmu.model.mmu.internal import RET_PF_RETRY, ModelError, VmError
from fuzzmmu.model.mmu.mmu import KvmMmu
from fuzzmmu.model.x86 import Vcpu
from fuzzmmu.oracle.divergence import Divergence, DivergenceKind
from fuzzmmu.oracle.executor import AccessStep, run
from fuzzmmu.program.codec import decode
from fuzzmmu.program.generate import random_program
from fuzzmmu.program.ops import Interleave
from fuzzmmu.program.text import format_program, parse_program
from fuzzmmu.program.world import data_value
from fuzzmmu.ui.replayview import AccessView, capture

HERE = Path(__file__).resolve().parent
HEAD = ("# fuzzmmu program v1\n"
        "config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level\n")

# One program with a step for every kind of outcome. Frame 0x200 is outside every memslot
# (MMIO); 0x40001000 is not mapped; nothing has an Accessed bit before op 2 reads 0x1000.
BASE = HEAD + """\
map cpu0 root=current current 0x1000 -> 0x5 P|W|U level=1 upper=W|U pool=0x8
map cpu0 root=current current 0x201000 -> 0x200 P|W|U|A|D level=1 upper=W|U|A pool=0x10
read cpu0 0x1000+0x0 width=8 cpl=0
write cpu0 0x1000+0x8 width=8 cpl=0 seed=0x11
read cpu0 0x40001000+0x0 width=8 cpl=0
read cpu0 0x201000+0x0 width=8 cpl=0
set cpu0 nxe=1
cr3 cpu0 root=0x2
zap-all
"""
OP_MAP, OP_READ, OP_WRITE, OP_UNMAPPED, OP_MMIO, OP_NXE, OP_CR3, OP_ZAP = 0, 2, 3, 4, 5, 6, 7, 8
WRITTEN = data_value(0x11, 8)

Patch = Callable[[pytest.MonkeyPatch], None]


def base_program():
    return parse_program(BASE)


def divergence_of(program_text: str, *, audit: bool = False, bugs: tuple[str, ...] = ()
                  ) -> Divergence | None:
    return run(parse_program(program_text), bugs, audit=audit).divergence


# ---------------------------------------------------------------------- model patches


def _wrong_pfn(mp: pytest.MonkeyPatch) -> None:
    orig = vm.translate

    def translate(kvm, vcpu, gva, write, fetch):
        pfn, code = orig(kvm, vcpu, gva, write, fetch)
        return (pfn + 1 if pfn >= 0 and gva == 0x1000 else pfn), code
    mp.setattr(vm, "translate", translate)


def _no_fault(mp: pytest.MonkeyPatch) -> None:
    orig = vm.translate

    def translate(kvm, vcpu, gva, write, fetch):
        if gva == 0x40001000:
            return 7, 0  # the hardware "finds" a translation the guest never made
        return orig(kvm, vcpu, gva, write, fetch)
    mp.setattr(vm, "translate", translate)


def _walk_fails(mp: pytest.MonkeyPatch) -> None:
    orig = fault.walk_addr

    def walk_addr(kvm, vcpu, addr, pfec, eflags_ac=False, implicit=False, defer_dirty=False):
        w = orig(kvm, vcpu, addr, pfec, eflags_ac, implicit, defer_dirty)
        if addr == 0x1000 and w.ok:
            w.ok, w.error_code = False, 1  # a protection fault on a good mapping
        return w
    mp.setattr(fault, "walk_addr", walk_addr)


def _error_code_w(mp: pytest.MonkeyPatch) -> None:
    orig = walk._walk_error

    def walk_error(kvm, w, mmu, errcode, pfec):
        w = orig(kvm, w, mmu, errcode, pfec)
        w.error_code |= PFERR_W
        return w
    mp.setattr(walk, "_walk_error", walk_error)


def _no_accessed_bits(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(walk, "update_accessed_dirty_bits", lambda vcpu, w, write_fault, esize: False)


def _store_wrong_value(mp: pytest.MonkeyPatch) -> None:
    orig = vm.Machine._ram

    def _ram(self, pfn, gva, write, width, value):
        if write and value == WRITTEN:
            value ^= 0x100
        return orig(self, pfn, gva, write, width, value)
    mp.setattr(vm.Machine, "_ram", _ram)


def _store_also_elsewhere(mp: pytest.MonkeyPatch) -> None:
    orig = vm.Machine._ram

    def _ram(self, pfn, gva, write, width, value):
        obs = orig(self, pfn, gva, write, width, value)
        if write and value == WRITTEN:  # the guest sees its store; a stray one lands too
            self.phys.backing.write(obs.addr + 8, 8, 0xDEAD)
        return obs
    mp.setattr(vm.Machine, "_ram", _ram)


def _mmio_value(mp: pytest.MonkeyPatch) -> None:
    orig = emulator.mmio_read_value
    mp.setattr(emulator, "mmio_read_value", lambda gpa, size: orig(gpa, size) ^ 1)


def _efer_drops_nxe(mp: pytest.MonkeyPatch) -> None:
    orig = Vcpu.set_efer
    mp.setattr(Vcpu, "set_efer", lambda self, efer: orig(self, efer & ~EFER_NXE))


def _cr3_refused(mp: pytest.MonkeyPatch) -> None:
    orig = Vcpu.set_cr3
    mp.setattr(Vcpu, "set_cr3",
               lambda self, cr3: False if cr3 == 0x2000 else orig(self, cr3))


def _translate_raises(mp: pytest.MonkeyPatch) -> None:
    orig = vm.translate

    def broken_translate(kvm, vcpu, gva, write, fetch):
        if gva == 0x1000:
            raise RuntimeError("boom")
        return orig(kvm, vcpu, gva, write, fetch)
    mp.setattr(vm, "translate", broken_translate)


def _double_count(mp: pytest.MonkeyPatch) -> None:
    orig = KvmMmu.account_shadowed

    def account_shadowed(self, sp):
        orig(self, sp)
        self.indirect_shadow_pages += 1
    mp.setattr(KvmMmu, "account_shadowed", account_shadowed)


# kind, patch, op index, signature, (expected, actual) substrings, audit
DIRECTED = [
    (DivergenceKind.WRONG_TRANSLATION, _wrong_pfn, OP_READ,
     "wrong-translation:access/read:4level:ram->ram", ("RAM hpa=0x5000", "RAM hpa=0x6000"),
     False),
    (DivergenceKind.MISSING_FAULT, _no_fault, OP_UNMAPPED,
     "missing-fault:access/read:4level:#PF(0)->ram", ("#PF cr2=0x40001000", "RAM hpa=0x7000"),
     False),
    (DivergenceKind.SPURIOUS_FAULT, _walk_fails, OP_READ,
     "spurious-fault:access/read:4level:ram->#PF(P)", ("RAM hpa=0x5000", "#PF cr2=0x1000"),
     False),
    (DivergenceKind.WRONG_ERROR_CODE, _error_code_w, OP_UNMAPPED,
     "wrong-error-code:access/read:4level:#PF(0)->#PF(W)", ("error=0x0", "error=0x2"), False),
    (DivergenceKind.AD_MISMATCH, _no_accessed_bits, OP_READ,
     "ad-mismatch:access:4level:memory->memory", ("0x00008027", "0x00008007"), False),
    (DivergenceKind.MEMORY_MISMATCH, _store_wrong_value, OP_WRITE,
     "memory-mismatch:access/write:4level:ram->ram",
     (f"value={WRITTEN:#x}", f"value={WRITTEN ^ 0x100:#x}"), False),
    (DivergenceKind.MMIO_MISMATCH, _mmio_value, OP_MMIO,
     "mmio-mismatch:access/read:4level:mmio->mmio", ("MMIO gpa=0x200000", "MMIO gpa=0x200000"),
     False),
    (DivergenceKind.STATE_MISMATCH, _efer_drops_nxe, OP_NXE,
     "state-mismatch:set:4level:regs->regs", ("efer=0xd00", "efer=0x500"), False),
    (DivergenceKind.WRONG_RESULT, _cr3_refused, OP_CR3, "wrong-result:cr3:4level:done->#GP",
     ("done", "#GP"), False),
    (DivergenceKind.MODEL_CRASH, _translate_raises, OP_READ,
     "model-crash:access/read:4level:-->RuntimeError@broken_translate",
     ("no exception", "RuntimeError: boom (at broken_translate, test_executor.py:"), False),
    (DivergenceKind.AUDIT_VIOLATION, _double_count, OP_MAP,
     "audit-violation:map:4level:I3->indirect-shadow-pages",
     ("no violation", "indirect_shadow_pages is"), True),
]


def test_directed_cases_cover_every_kind() -> None:
    assert {k for k, *_ in DIRECTED} == set(DivergenceKind)


def test_base_program_is_clean() -> None:
    outcome = run(base_program(), audit=True, trace=True)
    assert outcome.divergence is None
    assert outcome.ops_run == len(base_program().ops) == OP_ZAP + 1
    assert outcome.steps_run == len(outcome.trace)
    assert all(t.matched for t in outcome.trace)
    # The program reaches every outcome the directed tests corrupt.
    seen = {t.op_index: t.model for t in outcome.trace}
    assert seen[OP_READ].startswith("RAM hpa=0x5000")
    assert seen[OP_UNMAPPED].startswith("#PF")
    assert seen[OP_MMIO].startswith("MMIO")


@pytest.mark.parametrize(("kind", "patch", "op_index", "signature", "texts", "audit"),
                         DIRECTED, ids=[k.value for k, *_ in DIRECTED])
def test_model_misbehaviour_is_reported_as_its_kind(
        monkeypatch: pytest.MonkeyPatch, kind: DivergenceKind, patch: Patch, op_index: int,
        signature: str, texts: tuple[str, str], audit: bool) -> None:
    program = base_program()
    with monkeypatch.context() as m:
        patch(m)
        d = run(program, audit=audit).divergence
    assert d is not None, "the misbehaving model went unnoticed"
    assert (d.kind, d.op_index) == (kind, op_index), d
    assert d.signature == signature
    assert re.fullmatch(r"[0-9a-f]{10}", d.signature_id)
    assert texts[0] in d.expected and texts[1] in d.actual, d
    assert d.op == format_program(program).splitlines()[2 + op_index]
    assert d.to_json() == {"kind": kind.value, "op_index": op_index, "op": d.op,
                           "step": d.step, "expected": d.expected, "actual": d.actual,
                           "signature": signature}
    # Without the patch the same program is clean again (nothing leaked from the patched run).
    assert run(program, audit=True).divergence is None


def test_memory_written_behind_the_guests_back_is_a_memory_mismatch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The store the guest sees is right, but the model wrote elsewhere too: the comparison of
    memory after the op finds it."""
    with monkeypatch.context() as m:
        _store_also_elsewhere(m)
        d = run(base_program()).divergence
    assert d is not None
    assert (d.kind, d.op_index) == (DivergenceKind.MEMORY_MISMATCH, OP_WRITE)
    assert d.step == "frame 0x5 offset 0x10"
    assert (d.expected, d.actual) == ("0x00000000", "0x0000dead")
    assert d.signature == "memory-mismatch:access:4level:memory->memory"


def test_stray_bit_in_a_data_page_is_a_memory_mismatch(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    orig = vm.Machine._ram

    def _ram(self, pfn, gva, write, width, value):
        obs = orig(self, pfn, gva, write, width, value)
        if write and value == WRITTEN:
            self.phys.backing.write(obs.addr + 8, 8, 0x20)
        return obs

    with monkeypatch.context() as m:
        m.setattr(vm.Machine, "_ram", _ram)
        d = run(base_program()).divergence
    assert d is not None and (d.op_index, d.step) == (OP_WRITE, "frame 0x5 offset 0x10")
    assert d.kind is DivergenceKind.MEMORY_MISMATCH


@pytest.mark.parametrize("where", ["access", "host-op"])
def test_model_returning_garbage_is_a_model_crash(monkeypatch: pytest.MonkeyPatch, where: str
                                                  ) -> None:
    with monkeypatch.context() as m:
        if where == "access":
            orig = vm.Machine._ram
            m.setattr(vm.Machine, "_ram", lambda self, pfn, gva, write, width, value: (
                None if write and value == WRITTEN else orig(self, pfn, gva, write, width,
                                                             value)))
            op_index = OP_WRITE
        else:
            m.setattr(vm.Machine, "zap_all", lambda self: None)
            op_index = OP_ZAP
        d = run(base_program()).divergence
    assert d is not None
    assert (d.kind, d.op_index) == (DivergenceKind.MODEL_CRASH, op_index)


def test_audit_violation_needs_the_audit(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        _double_count(m)
        assert run(base_program(), audit=False).divergence is None
        assert run(base_program(), audit=True).divergence is not None


# ---------------------------------------------------------------------- model crashes


def _raise(exc: BaseException) -> Callable[..., object]:
    def broken(*args: object, **kwargs: object) -> object:
        raise exc
    return broken


def _hang(mp: pytest.MonkeyPatch) -> None:
    orig = vm.kvm_mmu_page_fault
    mp.setattr(vm, "kvm_mmu_page_fault", lambda kvm, vcpu, addr, code: (
        RET_PF_RETRY if addr == 0x1000 else orig(kvm, vcpu, addr, code)))


def _vm_error(mp: pytest.MonkeyPatch) -> None:
    orig = vm.kvm_mmu_page_fault

    def page_fault(kvm, vcpu, addr, code):
        if addr == 0x1000:
            raise VmError("KVM_RUN: -EFAULT")
        return orig(kvm, vcpu, addr, code)
    mp.setattr(vm, "kvm_mmu_page_fault", page_fault)


def _efer_nxe_raises(mp: pytest.MonkeyPatch) -> None:
    orig = Vcpu.set_efer

    def set_efer(self, efer):
        if efer & EFER_NXE:
            raise KeyError(efer)
        return orig(self, efer)
    mp.setattr(Vcpu, "set_efer", set_efer)


CRASHES = [
    ("access-exception", _translate_raises, OP_READ,
     "model-crash:access/read:4level:-->RuntimeError@broken_translate"),
    ("access-hang", _hang, OP_READ, "model-crash:access/read:4level:ram->hang"),
    ("access-vm-error", _vm_error, OP_READ, "model-crash:access/read:4level:ram->vm-error"),
    ("model-error", lambda m: m.setattr(KvmMmu, "account_shadowed",
                                        _raise(ModelError("shadowing gfn nowhere"))),
     OP_MAP, "model-crash:access/write:4level:-->ModelError@broken"),
    ("cr-write", _efer_nxe_raises, OP_NXE, "model-crash:efer:4level:-->KeyError@set_efer"),
    ("host-op", lambda m: m.setattr(KvmMmu, "kvm_mmu_zap_all_fast",
                                    _raise(AssertionError("zap"))),
     OP_ZAP, "model-crash:zap-all:host:-->AssertionError@broken"),
    ("boot", lambda m: m.setattr(Vcpu, "set_cr0", _raise(ZeroDivisionError())), -1,
     "model-crash:cr0:off:-->ZeroDivisionError@broken"),
]


@pytest.mark.parametrize(("patch", "op_index", "signature"), [c[1:] for c in CRASHES],
                         ids=[c[0] for c in CRASHES])
def test_model_crash_never_propagates(monkeypatch: pytest.MonkeyPatch, patch: Patch,
                                      op_index: int, signature: str) -> None:
    with monkeypatch.context() as m:
        patch(m)
        outcome = run(base_program(), audit=True)
    d = outcome.divergence
    assert d is not None
    assert (d.kind, d.op_index) == (DivergenceKind.MODEL_CRASH, op_index), d
    assert d.signature == signature
    assert outcome.ops_run == max(op_index + 1, 0)


# ---------------------------------------------------------------------- interleavings


def _read_result(text: str, op_index: int) -> str:
    outcome = run(parse_program(text), trace=True)
    assert outcome.divergence is None
    (entry,) = [t for t in outcome.trace if t.op_index == op_index]
    return entry.model


def test_interleave_satisfied_only_by_the_second_order_is_accepted() -> None:
    program = parse_program(RACE)
    outcome = run(program, trace=True, audit=True)
    assert outcome.divergence is None
    steps = [t for t in outcome.trace if t.op_index == 1]
    # The accepted order: cpu1's PTE write, then cpu0's read through the new PTE.
    assert [t.step.split(":")[0] for t in steps] == ["pte", "access"]
    assert steps[1].model.startswith("RAM hpa=0x7000")
    # In the first order the read would have seen the old PTE.
    lines = RACE.splitlines()
    read, pte = lines[4].strip(), lines[5].strip()
    first_order = "\n".join([*lines[:3], read, pte]) + "\n"
    second_order = "\n".join([*lines[:3], pte, read]) + "\n"
    assert _read_result(first_order, 0 + 1).startswith("RAM hpa=0x5000")
    assert _read_result(second_order, 1 + 1).startswith("RAM hpa=0x7000")


# cpu1 (paging off) writes 4-level entries into frame 2 while cpu0, in PAE mode with its PDPT
# there, is in the middle of a map: its first store done, the second faulting. cpu1's store puts
# NX, reserved in a PDPTE, into frame 2, so cpu0's CR3 reload at the end of its map must #GP.
# Only the order "cpu0's first store, cpu1's map, the rest of cpu0's map" explains it.
MID_MAP = """\
# fuzzmmu program v1
config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=pae
cr3 cpu0 root=0x2
mode cpu1 off root=0x2
interleave at=faultin
  map cpu0 root=current current 0x0 -> 0x0 NX level=1 upper=NX pool=0x8
  map cpu1 root=current current 0x0 -> 0x0 NX level=1 upper=NX pool=0x8
"""


def test_second_op_run_between_the_steps_of_a_map_is_accepted() -> None:
    outcome = run(parse_program(MID_MAP), trace=True, audit=True)
    assert outcome.divergence is None
    steps = [t.step.split(" (")[0].split(": write cpu")[0] for t in outcome.trace
             if t.op_index == 2]
    assert steps == ["map: level-3 table at 0x8", "map: level-4 table at 0x8",
                     "map: level-3 table at 0x9", "map: level-2 table at 0xa", "map: leaf",
                     "map: level-2 table at 0x9", "mov cr3, 0x2000", "map: leaf"]
    assert outcome.trace[[t.op_index for t in outcome.trace].index(2) + 6].model == "#GP"


# cpu0's read of 0x1000 (MMIO) walks the tables, setting A flags, and at that point cpu1 turns
# the PDE above it into a 2 MiB page with NX, reserved while EFER.NXE=0. KVM's fetch sees the
# changed gpte and retries; the new walk takes a reserved-bit #PF. Architecturally: a
# translation made (A flags set), dropped, then a walk of the new tables.
AFTER_WALK = """\
# fuzzmmu program v1
config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level
map cpu0 root=current current 0x1000 -> 0x30 P level=1 upper=0 pool=0x8
interleave at=walked
  read cpu0 0x1000+0x0 width=1 cpl=0
  map cpu1 root=current current 0x0 -> 0x0 P|NX level=2 upper=NX pool=0x8
"""


def test_access_that_translated_before_the_second_op_ran_is_accepted() -> None:
    outcome = run(parse_program(AFTER_WALK), trace=True, audit=True)
    assert outcome.divergence is None
    steps = [t for t in outcome.trace if t.op_index == 1]
    assert steps[0].step.startswith("translation ahead of the access")
    assert steps[-1].model == "#PF cr2=0x1000 error=0x9 (P|RSVD)"


RACE_WRITE = HEAD + """\
map cpu0 root=current current 0x1000 -> 0x5 P|W|U|A|D level=1 upper=W|U|A pool=0x8
map cpu1 root=current current 0x0 -> 0x6 P|W|U|A|D level=1 upper=W|U|A pool=0x8
interleave at=faultin
  read cpu0 0x1000+0x0 width=8 cpl=0
  write cpu1 0x0+0x0 width=8 cpl=0 seed=0x22
read cpu1 0x0+0x0 width=8 cpl=0
"""


def test_misbehaviour_inside_an_interleave_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    assert divergence_of(RACE_WRITE, audit=True) is None
    orig = vm.Machine._ram
    where: list[set[str]] = []

    def _ram(self, pfn, gva, write, width, value):
        if write and value == data_value(0x22, 8):
            where.append({f.name for f in traceback.extract_stack()})
            value ^= 1
        return orig(self, pfn, gva, write, width, value)

    with monkeypatch.context() as m:
        m.setattr(vm.Machine, "_ram", _ram)
        d = divergence_of(RACE_WRITE)
    # cpu1's store ran at the point, inside cpu0's fault, and neither order explains it.
    assert len(where) == 1 and {"paging_page_fault", "hook"} <= where[0]
    assert d is not None
    assert (d.kind, d.op_index) == (DivergenceKind.MEMORY_MISMATCH, 2)
    assert d.op.startswith("interleave at=faultin\n  read cpu0")
    assert d.signature == "memory-mismatch:access/write:4level:ram->ram"


def test_wrong_translation_of_the_first_op_of_an_interleave_is_caught(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        _wrong_pfn(m)
        d = divergence_of(RACE_WRITE)
    assert d is not None
    assert (d.kind, d.op_index) == (DivergenceKind.WRONG_TRANSLATION, 2)


def _cpu1_store_raises(mp: pytest.MonkeyPatch) -> None:
    orig = vm.translate

    def cpu1_translate(kvm, vcpu, gva, write, fetch):
        if vcpu.id == 1 and write:
            raise RuntimeError("boom in cpu1")
        return orig(kvm, vcpu, gva, write, fetch)
    mp.setattr(vm, "translate", cpu1_translate)


def test_crash_in_the_second_op_of_an_interleave_is_a_model_crash(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        _cpu1_store_raises(m)
        d = run(parse_program(RACE)).divergence
    assert d is not None
    assert (d.kind, d.op_index) == (DivergenceKind.MODEL_CRASH, 1)


def test_crash_in_the_second_op_of_an_interleave_names_the_real_exception(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        _cpu1_store_raises(m)
        d = run(parse_program(RACE)).divergence
        again = run(parse_program(RACE)).divergence
    assert d is not None
    assert d.step.startswith("pte: write cpu1")
    assert d.actual.startswith("RuntimeError: boom in cpu1 (at cpu1_translate")
    assert d.signature.endswith("-->RuntimeError@cpu1_translate")
    assert " at 0x" not in d.actual
    assert again == d


# ---------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def in_process() -> dict[str, dict]:
    return runsummary.run_all()


def test_cases_exercise_many_divergences(in_process: dict[str, dict]) -> None:
    kinds = {v["divergence"]["kind"] for v in in_process.values() if v["divergence"]}
    assert len(kinds) >= 3, kinds
    assert in_process["misaligned"]["divergence"] is None
    assert in_process["misaligned+bug"]["divergence"]["kind"] == "missing-fault"


def test_same_program_twice_gives_identical_outcomes() -> None:
    for name, program, bugs in runsummary.cases():
        a = run(program, bugs, trace=True)
        b = run(program, bugs, trace=True)
        assert a.divergence == b.divergence, name
        assert (a.ops_run, a.steps_run, a.div_step) == (b.ops_run, b.steps_run, b.div_step)
        assert a.trace == b.trace, name


def test_runs_do_not_depend_on_what_ran_before(in_process: dict[str, dict]) -> None:
    """A, B, A: with and without mutants, in both directions."""
    cases = {name: (p, bugs) for name, p, bugs in runsummary.cases()}
    order = ["misaligned", "misaligned+bug", "misaligned", "race+all", "race", "gen3+all",
             "gen3", "gen3+all", "bytes2+all", "misaligned+bug"]
    rng = random.Random(5)
    order += rng.sample(sorted(cases), len(cases))
    for name in order:
        p, bugs = cases[name]
        assert summary(run(p, bugs, trace=True)) == in_process[name], name


@pytest.mark.parametrize("hashseed", ["0", "4242"])
def test_runs_are_identical_across_processes(in_process: dict[str, dict], hashseed: str
                                             ) -> None:
    env = {**os.environ, "PYTHONHASHSEED": hashseed,
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", "import runsummary; runsummary.main()"],
                         capture_output=True, text=True, check=True, env=env, timeout=120)
    other = json.loads(out.stdout)
    assert other.keys() == in_process.keys()
    for name in in_process:
        assert other[name] == in_process[name], name


def test_explained_rerun_gives_the_same_outcome() -> None:
    """`fuzzmmu replay` runs a diverging program again to look at both machines before the
    diverging step; that second run must find the same divergence."""
    checked = 0
    for name, program, bugs in runsummary.cases():
        first = run(program, bugs)
        if first.divergence is None or first.div_step < 0:
            continue
        again = run(program, bugs, explain=(first.div_step, capture))
        assert again.divergence == first.divergence, name
        assert again.steps_run == first.steps_run
        if first.divergence.step.startswith(("access:", "map:", "pte:", "store:", "kernel")):
            assert isinstance(again.view, AccessView), name
        checked += 1
    assert checked >= 3


# ---------------------------------------------------------------------- the clean model


def test_long_random_programs_do_not_diverge_on_the_clean_model() -> None:
    start = time.monotonic()
    failures = []
    interleaves = 0
    outside = 0
    for seed in range(300):
        p = random_program(random.Random(seed), 64)
        interleaves += sum(isinstance(op, Interleave) for op in p.ops)
        outcome = run(p, audit=seed % 4 == 0)
        if outcome.divergence is not None:
            failures.append(f"random_program seed {seed}: {outcome.divergence}\n"
                            f"{format_program(p)}")
        elif outcome.skipped:
            outside += 1  # a page table written through a host alias: not compared after
        else:
            assert outcome.ops_run == len(p.ops)
    assert outside <= 6  # rare: the oracle compares nearly every program whole
    rng = random.Random(2024)
    for i in range(300):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(4, 4 + 8 * 70)))
        p = decode(data)
        interleaves += sum(isinstance(op, Interleave) for op in p.ops)
        outcome = run(p, audit=i % 4 == 0)
        if outcome.divergence is not None:
            failures.append(f"decoded bytes {data.hex()}: {outcome.divergence}\n"
                            f"{format_program(p)}")
    assert not failures, "\n\n".join(failures[:3])
    assert interleaves > 100
    assert time.monotonic() - start < 40


def test_every_step_of_a_clean_run_is_traced() -> None:
    for seed in range(20):
        p = random_program(random.Random(seed), 64)
        outcome = run(p, trace=True)
        assert outcome.divergence is None
        assert outcome.steps_run == len(outcome.trace)
        assert all(t.matched for t in outcome.trace)
        assert {t.op_index for t in outcome.trace} <= set(range(-1, len(p.ops)))


def test_access_step_carries_the_guest_access() -> None:
    p = base_program()
    seen: list[AccessStep] = []

    def look(model, ref, step):
        seen.append(step)

    run(p, explain=(0, look))
    assert len(seen) == 1 and isinstance(seen[0], AccessStep)
