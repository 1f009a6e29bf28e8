"""`fuzzmmu replay --target kvm`: exit 0 when real KVM agrees with the reference, 1 on a
divergence, 2 when this host cannot run the target or the program."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuzzmmu.cli import main

PROGRAMS = Path(__file__).with_name("programs")
ROOT = Path(__file__).resolve().parents[2]


def test_a_program_the_host_cannot_run_is_skipped_with_exit_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(ROOT / "corpus" / "smm.txt"), "--target", "kvm"]) == 2
    err = capsys.readouterr().err
    assert "skipped:" in err and "no SMM" in err
    assert main(["replay", str(ROOT / "corpus" / "pae-basic.txt"), "--target", "kvm",
                 "--json"]) == 2
    assert "long mode only" in json.loads(capsys.readouterr().out)["skipped"]


def test_without_a_usable_dev_kvm_the_target_says_why(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fuzzmmu.kvm.device.KVM_PATH", "/nonexistent/kvm")
    assert main(["replay", str(PROGRAMS / "sdm-tour.txt"), "--target", "kvm"]) == 2
    err = capsys.readouterr().err
    assert "KVM target cannot run on this host" in err and "/nonexistent/kvm" in err


def test_bugs_are_for_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(PROGRAMS / "sdm-tour.txt"), "--target", "kvm", "--bug",
                 "cr0wp-not-in-role"]) == 2
    assert "mutants of the model" in capsys.readouterr().err


@pytest.mark.usefixtures("kvm")
def test_agreement_is_exit_0_and_a_deviation_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(PROGRAMS / "sdm-tour.txt"), "--target", "kvm"]) == 0
    assert "no divergence" in capsys.readouterr().out
    path = str(PROGRAMS / "pte-write-widen-misaligned.txt")
    assert main(["replay", path, "--target", "kvm"]) == 1
    out = capsys.readouterr().out
    assert "missing-fault at op 7" in out and "actual (kvm)" in out
    assert main(["replay", path]) == 0  # the model follows the SDM there
    capsys.readouterr()
    assert main(["replay", path, "--target", "kvm", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "kvm" and result["divergence"]["kind"] == "missing-fault"
