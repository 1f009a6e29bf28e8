"""Three-way verdicts (fuzzmmu.kvm.verdict), `replay --target all` and `fuzzmmu agreement`:
the model-as-KVM against real KVM. Those that run real KVM skip where it is unusable."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from fuzzmmu.bench.agreement import make_program, measure, write
from fuzzmmu.cli import main
from fuzzmmu.kvm.support import op_unsupported, random_supported_program, random_unsync_program
from fuzzmmu.kvm.target import KVM, KVM_POOLED
from fuzzmmu.kvm.verdict import (
    AS_HOST,
    UnsyncSeen,
    Verdict,
    classify,
    explain,
    kvm_profile,
    three_way,
)
from fuzzmmu.model.bugs import CATALOG, BugSet
from fuzzmmu.model.machine import Machine
from fuzzmmu.model.mmu.internal import MmuConfig
from fuzzmmu.oracle.executor import Outcome, Target, run
from fuzzmmu.program.codec import decode, encode
from fuzzmmu.program.files import read_program
from fuzzmmu.program.ops import Access, Map, Program
from fuzzmmu.program.text import format_program, parse_program

PROGRAMS = Path(__file__).with_name("programs")
EXPECT = re.compile(r"^# expect on kvm: (\S+) at op (\d+)$", re.M)
DEVIATIONS = sorted(p.name for p in PROGRAMS.glob("*.txt") if EXPECT.search(p.read_text()))
UNSYNC = """\
config boot=4level unsync
map cpu0 root=current current 0x0 -> 0x5 P|W|U|A|D level=1 upper=W|U|A pool=0x8
map cpu0 root=current current 0x1000 -> 0xa P|W|U|A|D level=1 upper=W|U|A pool=0x8
read cpu0 0x0+0x0 width=8 cpl=3
write cpu0 0x1000+0x0 width=8 cpl=3 seed=0x5a
invlpg cpu0 0x0
read cpu0 0x0+0x0 width=8 cpl=3
"""


# ---------------------------------------------------------------------- without real KVM


def test_the_profile_is_the_catalogs_current_kvm() -> None:
    profile = kvm_profile()
    assert "kvm.pte-write-widen-misaligned" in profile and "efer-nxe-not-in-role" in profile
    assert "cr0wp-not-in-role" not in profile  # fixed in KVM, not current
    assert all(b.year == "current" for b in CATALOG if b.id in profile
               and b.id != "efer-nxe-not-in-role")


def test_classification() -> None:
    p = parse_program(UNSYNC)
    agree = run(p)
    diverged = run(read_program(PROGRAMS / "pte-write-widen-misaligned.txt"),
                   ["kvm.pte-write-widen-misaligned"])
    assert diverged.divergence is not None and agree.divergence is None
    skipped = Outcome(p, (), skipped="no SMM here")
    assert classify(agree, agree, agree) is Verdict.AGREE
    assert classify(agree, diverged, diverged) is Verdict.KVM_FINDING
    assert classify(agree, agree, diverged) is Verdict.KVM_UNPREDICTED
    assert classify(agree, diverged, agree) is Verdict.MODEL_ONLY
    assert classify(diverged, agree, agree) is Verdict.CLEAN_MODEL_DIVERGES
    assert classify(agree, agree, skipped) is Verdict.SKIPPED
    assert Verdict.MODEL_ONLY.infidelity and not Verdict.KVM_FINDING.infidelity


def test_the_model_as_this_host_emulates_cpl0_and_may_unsync() -> None:
    """On a kvm_pvm host a CPL0 store to a shadowed table is emulated (no unsync page); a CPL3
    store makes the page unsync. The pte-write-widen program shows KVM's deviation only when its
    CPL0 store is emulated, so only the model of this host predicts it."""
    program = read_program(PROGRAMS / "pte-write-widen-misaligned.txt")
    bug = ("kvm.pte-write-widen-misaligned",)
    assert run(program, bug, target=AS_HOST).divergence is not None
    native = parse_program(format_program(program).replace("boot=4level", "boot=4level unsync"))
    assert run(native, bug).divergence is None  # CPL0 natively: the page goes unsync


def test_generated_programs_are_valid_and_runnable_here() -> None:
    unsync_path = 0
    for k in range(40):
        for family in (random_supported_program, random_unsync_program):
            p = family(random.Random(k))
            assert parse_program(format_program(p)) == p and decode(encode(p)) == p
            assert p.header.boot.value == "4level" and p.header.unsync
            assert all(op_unsupported(op) is None for op in p.ops)
            assert not any(isinstance(op, Map) and op.level == 3 for op in p.ops)
        prelude = random_unsync_program(random.Random(k)).ops[:4]
        assert [type(op) for op in prelude] == [Map, Map, Access, Access]
        assert prelude[3].cpl == 3 and prelude[3].va == prelude[1].va
        seen = UnsyncSeen()
        run(make_program(k, 1, 16), kvm_profile(), target=AS_HOST, observe=seen)
        unsync_path += seen.seen
    assert unsync_path >= 30  # the family that works on its own table takes the unsync path


# ---------------------------------------------------------------------- on real KVM


@pytest.mark.usefixtures("kvm")
@pytest.mark.parametrize("pool", [False, True], ids=["fresh-vm", "pooled-vm"])
@pytest.mark.parametrize("name", DEVIATIONS)
def test_each_confirmed_deviation_is_a_predicted_kvm_finding(name: str, pool: bool) -> None:
    t = three_way(read_program(PROGRAMS / name), kvm_target=KVM_POOLED if pool else KVM)
    assert t.verdict is Verdict.KVM_FINDING, t
    assert explain(t)  # a mutant of the profile predicts it alone


@pytest.mark.usefixtures("kvm")
def test_a_cpl3_table_store_takes_the_unsync_path_on_both() -> None:
    t = three_way(parse_program(UNSYNC))
    assert t.verdict is Verdict.AGREE and t.unsync


@pytest.mark.usefixtures("kvm")
def test_replay_target_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(PROGRAMS / "sdm-tour.txt"), "--target", "all"]) == 0
    assert "verdict: agree" in capsys.readouterr().out
    path = str(PROGRAMS / "efer-nxe-not-in-role.txt")
    assert main(["replay", path, "--target", "all", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "kvm-finding" and doc["explained_by"] == ["efer-nxe-not-in-role"]
    assert doc["model"]["divergence"] is None
    assert doc["kvm"]["divergence"]["kind"] == doc["model_as_kvm"]["divergence"]["kind"]
    # Without the mutant that predicts it, the same program is a model infidelity.
    assert main(["replay", path, "--target", "all", "--bug", "kvm.pte-write-widen-misaligned"
                 ]) == 1
    assert "kvm-unpredicted" in capsys.readouterr().out
    assert main(["replay", str(PROGRAMS.parents[2] / "corpus" / "smm.txt"), "--target",
                 "all"]) == 2


@pytest.mark.usefixtures("kvm")
def test_agreement_measures_and_writes_its_groups(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    result = measure(60, seed=5)
    assert result.programs == 60 and result.ran >= 50 and result.unsync >= 20
    assert result.clean and result.agreement == 1.0
    write(result, tmp_path)
    doc = json.loads((tmp_path / "agreement.json").read_text())
    assert doc["programs"] == 60 and doc["verdicts"]["agree"] + doc["verdicts"]["skipped"] \
        + doc["verdicts"]["kvm-finding"] == 60
    assert len(list((tmp_path / "groups").glob("*.txt"))) == len(doc["groups"])
    assert main(["agreement", "--programs", "40", "--seed", "5", "--out", str(tmp_path / "b")
                 ]) == 0  # the first 40 of the same programs
    out = capsys.readouterr().out
    assert "three-way verdicts of 40" in out and "agreement of the model-as-KVM" in out
    assert (tmp_path / "b" / "agreement.json").exists()
    assert main(["agreement", "--programs", "0"]) == 2


def test_this_host_drops_the_mmio_cache_at_a_user_fault() -> None:
    """Without the host setting the model-as-KVM keeps the MMIO gva cache through the CPL3
    not-present #PF (upstream KVM's rule) and op 10 goes to MMIO; with it, the read faults as
    the SDM (and this host's KVM) say."""
    program = read_program(PROGRAMS / "mmio-cache-dropped-by-a-user-fault.txt")

    def upstream(p: Program, bugs: BugSet) -> Machine:
        h = p.header
        return Machine(MmuConfig(h.policy, h.mmio_gen_bits, h.maxphyaddr, h.mmu_pages,
                                 unsync=True, emulate_cpl0=True, mmio_caching=False), bugs)

    kept = run(program, kvm_profile(), target=Target("upstream", upstream, speculative=True))
    assert kept.divergence is not None and kept.divergence.op_index == 10
    assert kept.divergence.actual.startswith("MMIO")
    assert run(program, kvm_profile(), target=AS_HOST).divergence is None

