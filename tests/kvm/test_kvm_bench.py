"""Real KVM's programs/s in `fuzzmmu bench`'s throughput report, next to the model's: measured
where /dev/kvm is usable, reported as skipped with the reason where it is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from fuzzmmu.bench.engines import KvmThroughput, kvm_throughput
from fuzzmmu.bench.runner import BenchConfig, report_from, write_outputs


@pytest.mark.usefixtures("kvm")
def test_real_kvm_and_the_model_are_timed_on_the_same_programs() -> None:
    got = kvm_throughput(0.3, seed=1)
    assert not got.skipped and got.programs >= 1
    assert got.kvm > 0 and got.model > 0


def test_a_host_without_usable_kvm_is_reported_as_skipped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fuzzmmu.kvm.support.kvm_problem",
                        lambda: "/dev/kvm does not exist (no KVM module loaded?)")
    assert kvm_throughput(0.3, seed=1) == KvmThroughput(
        skipped="real KVM is not usable here: /dev/kvm does not exist (no KVM module loaded?)")


@pytest.mark.filterwarnings("ignore:No artists with labels")  # no trials, an empty plot
@pytest.mark.parametrize("kvm", [KvmThroughput(312.4, 745.0, 6000),
                                 KvmThroughput(skipped="real KVM is not usable here: no module")])
def test_the_report_shows_real_kvms_throughput(tmp_path: Path, kvm: KvmThroughput,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    console = Console(record=True, width=200)
    write_outputs(BenchConfig(("a",), out=tmp_path), [], 1.0, console, kvm)
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert KvmThroughput.from_json(doc["summary"]["kvm_throughput"]) == kvm
    want = ("real KVM: skipped (real KVM is not usable here: no module)" if kvm.skipped else
            "real KVM (/dev/kvm, one VM reset in place): 312 programs/s; the clean model 745 "
            "programs/s on the same 6,000 random programs")
    assert want in console.export_text()
    again = Console(record=True, width=200)
    report_from(tmp_path, again)
    assert want in again.export_text()
    report_from(tmp_path, again, as_markdown=True)
    assert f"* {want}" in capsys.readouterr().out
