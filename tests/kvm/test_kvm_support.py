"""What the KVM target refuses, and the executor's target hook: nothing here needs /dev/kvm."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzzmmu.kvm.support import host_program, program_unsupported
from fuzzmmu.model.machine import Machine
from fuzzmmu.oracle.executor import MODEL, Target, Unsupported, run
from fuzzmmu.program.codec import decode
from fuzzmmu.program.files import read_program
from fuzzmmu.program.ops import GuestMode, Map
from fuzzmmu.program.text import parse_program

BASE = "config boot=4level\n"
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("text", "why"), [
    ("config boot=pae\n", "long mode only"),
    ("config boot=off\n", "long mode only"),
    (BASE + "smi cpu0\n", "no SMM"),
    (BASE + "mode cpu0 4level root=0x2\n", "leaves long mode"),
    (BASE + "set cpu1 smep=1\n", "SMEP"),
    (BASE + "memslot as=1 slot=0 delete\n", "SMM"),
    (BASE + "migrate as=0 gfn=0x5\n", "page migration"),
    (BASE + "shrink 5\n", "shrinker"),
    (BASE + "interleave at=walked\n  read cpu0 0x0+0x0\n  zap-all\n", "interleave"),
])
def test_what_the_host_cannot_do_is_refused_with_a_reason(text: str, why: str) -> None:
    reason = program_unsupported(parse_program(text))
    assert reason is not None and why in reason


def test_what_it_can_do_passes() -> None:
    text = BASE + """\
map cpu0 root=current current 0x0 -> 0x5 P|W|U|A|D level=1 upper=W|U|A pool=0x8
read cpu1 0x0+0x8 width=4 cpl=3
write cpu0 0x0+0x0 width=2 cpl=0 seed=0x3
fetch cpu0 0x0+0x0 cpl=3
pte cpu0 table=0xa index=1 -> 0x6 P|W width=8
store cpu0 frame=0xa offset=0x6 width=4 -> 0x0 0
invlpg cpu0 0x0
cr3 cpu0 root=0x2
set cpu0 wp=0
set cpu0 nxe=1
set cpu0 pse=1
memslot as=0 slot=2 create base=0x30 npages=4 hva=0x20
zap-all
mmu-pages 20
"""
    assert program_unsupported(parse_program(text)) is None


def test_a_target_that_refuses_a_program_makes_it_skipped() -> None:
    def refuse(program: object, bugs: object) -> Machine:
        raise Unsupported("not here")

    outcome = run(parse_program(BASE), target=Target("nothing", refuse))
    assert outcome.skipped == "not here" and outcome.divergence is None


class _Proxy:
    """A machine under test that is not the model: the model's methods, none of its
    internals."""

    def __init__(self, machine: Machine) -> None:
        self._m = machine

    def __getattr__(self, name: str) -> object:
        if name in ("kvm", "completes_without_exit"):
            raise AttributeError(name)
        return getattr(self._m, name)


def test_another_target_runs_programs_and_skips_what_needs_the_models_internals() -> None:
    proxy = Target("proxy", lambda p, b: _Proxy(MODEL.make(p, b)))  # type: ignore[arg-type]
    plain = parse_program(BASE + "map cpu0 root=current current 0x0 -> 0x5 P|W|A level=1 "
                                 "upper=W|A pool=0x8\nread cpu0 0x0+0x0\n")
    assert run(plain, target=proxy).divergence is None
    assert run(plain, target=proxy).ops_run == 2
    interleaved = parse_program(BASE + "interleave at=walked\n  read cpu0 0x0+0x0\n  zap-all\n")
    outcome = run(interleaved, target=proxy)
    assert "interleave point" in outcome.skipped
    assert "model's internals" in run(plain, target=proxy, audit=True).skipped


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_host_program_makes_any_input_one_the_host_can_try(data: bytes) -> None:
    """What a KVM campaign runs: every decoded input adapted, the same way every time, and
    adapting twice changes nothing (a crash file replays as the program that diverged)."""
    program = decode(data)
    adapted = host_program(program)
    assert program_unsupported(adapted) is None
    assert adapted == host_program(decode(data))
    assert host_program(adapted) == adapted
    assert adapted.header == replace(program.header, boot=GuestMode.LONG4)
    assert not any(isinstance(op, Map) and op.level == 3 for op in adapted.ops)
    assert len(adapted.ops) <= len(program.ops)


@pytest.mark.parametrize("path", [*sorted((ROOT / "tests" / "kvm" / "programs").glob("*.txt")),
                                  ROOT / "corpus" / "4level-basic.txt"])
def test_host_program_leaves_a_supported_program_as_it_is(path: Path) -> None:
    program = read_program(path)
    assert program_unsupported(program) is None
    assert host_program(program) == program


def test_host_program_drops_what_the_host_cannot_do_and_keeps_the_rest() -> None:
    program = parse_program("""\
config policy=update maxphyaddr=36 mmu-pages=64 boot=pae unsync
map cpu0 root=current current 0x0 -> 0x0 P|W level=3 upper=W pool=0x8
smi cpu0
read cpu0 0x0+0x0 width=8 cpl=0
interleave at=walked
  read cpu0 0x0+0x0
  zap-all
""")
    adapted = host_program(program)
    h = adapted.header
    assert (h.policy, h.maxphyaddr, h.mmu_pages, h.unsync, h.boot) == (
        "update", 36, 64, True, GuestMode.LONG4)
    assert [op.KIND for op in adapted.ops] == ["map", "access"]
    assert replace(program.ops[0], level=2) == adapted.ops[0]
