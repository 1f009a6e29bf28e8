"""`fuzzmmu fuzz` end to end on real libFuzzer runs (short ones: these test the machinery, not
how fast bugs are found; that is bench/)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fuzzmmu.campaign.fuzz import CampaignConfig, target_command
from fuzzmmu.campaign.settings import SettingsError, settings_from_environment
from fuzzmmu.model.bugs import UnknownBugError

REPRO = Path("tests/bugs/reproducers")


def _fuzz(tmp_path: Path, *args: str, seeds: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fuzzmmu.cli", "fuzz", "--corpus", str(tmp_path / "corpus"),
           "--crashes", str(tmp_path / "crashes"), "--stats", str(tmp_path / "stats.jsonl"),
           "--no-dashboard", "--seed", "1", *args]
    if seeds is not None:
        (tmp_path / "corpus").mkdir()
        for p in seeds.iterdir():
            shutil.copy(p, tmp_path / "corpus" / p.name)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_campaign_stops_at_the_first_divergence_and_signs_it(tmp_path: Path) -> None:
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    from fuzzmmu.program.codec import encode
    from fuzzmmu.program.files import read_program

    (seeds / "s").write_bytes(encode(read_program(REPRO / "cr0wp-not-in-role.txt")))
    res = _fuzz(tmp_path, "--bug", "cr0wp-not-in-role", "--max-time", "60", seeds=seeds)
    assert res.returncode == 1, res.stdout + res.stderr
    crashes = [p for p in (tmp_path / "crashes").iterdir() if p.suffix == ""]
    assert crashes
    side = json.loads(crashes[0].with_name(crashes[0].name + ".json").read_text())
    assert side["bugs"] == ["cr0wp-not-in-role"]
    assert side["divergence"]["kind"] == "missing-fault"
    assert crashes[0].with_name(crashes[0].name + ".txt").read_text().startswith("# fuzzmmu")
    assert "first after" in res.stdout
    lines = [json.loads(x) for x in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert lines[0]["campaign"] == "start" and lines[-1]["divergences"] >= 1


def test_short_clean_campaign_resumes_from_its_corpus(tmp_path: Path) -> None:
    res = _fuzz(tmp_path, "--max-time", "4")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "seeded" in res.stdout and "no divergence" in res.stdout
    corpus = list((tmp_path / "corpus").iterdir())
    assert len(corpus) >= 11
    again = _fuzz(tmp_path, "--max-time", "3")
    assert again.returncode == 0 and "seeded" not in again.stdout


def test_a_target_that_fails_is_not_a_clean_campaign(tmp_path: Path) -> None:
    res = _fuzz(tmp_path, "--max-time", "30", "--", "-dict=/nonexistent/fuzzmmu.dict")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "the fuzz target failed" in res.stdout and "no divergence" not in res.stdout
    assert "ParseDictionaryFile" in res.stdout  # what libFuzzer said last


def test_a_crash_that_is_no_divergence_comes_with_what_libfuzzer_said(tmp_path: Path) -> None:
    # libFuzzer's RSS limit below what any Python process takes: the first check stops it
    # with an out-of-memory crash file, whose replay shows no divergence.
    res = _fuzz(tmp_path, "--max-time", "30", "--", "-rss_limit_mb=10")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "replays without a divergence" in res.stdout and "oom-" in res.stdout
    assert "the fuzz target failed" in res.stdout
    assert "out-of-memory" in res.stdout  # libFuzzer's own words
    assert "no divergence" not in res.stdout


def test_a_crash_file_without_a_divergence_is_reported(tmp_path: Path) -> None:
    from rich.console import Console

    from fuzzmmu.campaign.fuzz import CampaignResult, Stats, summary
    from fuzzmmu.campaign.triage import Crash
    from fuzzmmu.program.files import read_program

    oom = Crash(tmp_path / "oom-1234", read_program(REPRO / "cr0wp-not-in-role.txt"), (), None)
    result = CampaignResult(Stats(), [oom], 1, False)
    assert result.failed and not result.divergences
    console = Console(record=True, width=200)
    summary(console, result)
    text = console.export_text()
    assert "replays without a divergence" in text and "oom-1234" in text
    assert "no divergence" not in text
    assert not CampaignResult(Stats(), [], 0, False).failed


def test_bad_flags_are_clear_errors(tmp_path: Path) -> None:
    res = _fuzz(tmp_path, "--bug", "nope")
    assert res.returncode == 2 and "unknown bug id" in res.stderr
    res = _fuzz(tmp_path, "--jobs", "0")
    assert res.returncode == 2 and "--jobs" in res.stderr


def test_target_command_passes_libfuzzer_flags_through() -> None:
    cmd = target_command(CampaignConfig(jobs=2, keep_going=True, max_time=9,
                                        libfuzzer_args=("-rss_limit_mb=4096",)))
    assert "-fork=2" in cmd and "-ignore_crashes=1" in cmd and "-max_total_time=9" in cmd
    assert cmd[-1] == "-rss_limit_mb=4096"


def test_target_settings_from_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "bugs.conf"
    cfg.write_text("# the seed bugs\nmisaligned-pt-write-two-sptes\n\n")
    s = settings_from_environment({"FUZZMMU_CONFIG": str(cfg), "FUZZMMU_AUDIT": "1",
                                   "FUZZMMU_BUGS": "cr0wp-not-in-role"})
    assert s.bugs == ("cr0wp-not-in-role", "misaligned-pt-write-two-sptes") and s.audit
    with pytest.raises(UnknownBugError):
        settings_from_environment({"FUZZMMU_BUGS": "no-such"})
    with pytest.raises(SettingsError):
        settings_from_environment({"FUZZMMU_BYTE_SHARE": "2"})
    with pytest.raises(SettingsError):
        settings_from_environment({"FUZZMMU_CONFIG": str(tmp_path / "missing")})


def test_a_state_feedback_campaign_counts_its_features_by_family(tmp_path: Path) -> None:
    from fuzzmmu import native

    res = _fuzz(tmp_path, "--feedback", "state", "--max-time", "8")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [json.loads(x) for x in (tmp_path / "stats.jsonl").read_text().splitlines()]
    # --model auto: the compiled model wherever one can be built (built first if need be)
    assert lines[0]["feedback"] == "state"
    assert lines[0]["compiled_model"] is (native.compiler_problem() is None)
    counted = [x["state_features"] for x in lines if "state_features" in x]
    assert counted, lines[-3:]
    last = counted[-1]
    assert last["path"] > 0 and last["edge"] > 0 and last["gfn"] > 0
    assert re.search(r"state\s+features\s+\d+", res.stdout)  # the progress lines


def test_the_target_and_suppressions_from_the_environment(tmp_path: Path) -> None:
    from fuzzmmu.campaign.settings import TargetSettings

    assert settings_from_environment({}).target == "model"
    sup = tmp_path / "known"
    sup.write_text("# known findings\n  missing-fault:access/read:4level:#PF(U)->ram  \n\n"
                   "# another\nwrong-result:cr/cr4:4level:done->#GP\n")
    s = settings_from_environment({"FUZZMMU_TARGET": "kvm", "FUZZMMU_SUPPRESS": str(sup),
                                   "FUZZMMU_SUPPRESSED_LOG": str(tmp_path / "log")})
    assert s.target == "kvm" and s.suppressed_log == tmp_path / "log"
    # a '#' inside a signature is no comment: only lines starting with one are
    assert s.suppress == ("missing-fault:access/read:4level:#PF(U)->ram",
                          "wrong-result:cr/cr4:4level:done->#GP")
    assert settings_from_environment({"FUZZMMU_SUPPRESS": str(sup)}).suppress == s.suppress
    env = TargetSettings(target="kvm", suppressed_log=tmp_path / "log").environment()
    again = settings_from_environment(env)
    assert (again.target, again.suppressed_log, again.suppress) == ("kvm", tmp_path / "log", ())
    with pytest.raises(SettingsError, match="model, kvm"):
        settings_from_environment({"FUZZMMU_TARGET": "qemu"})
    with pytest.raises(SettingsError, match="mutants are for the model"):
        settings_from_environment({"FUZZMMU_TARGET": "kvm", "FUZZMMU_BUGS": "cr0wp-not-in-role"})
    for feedback in ("state", "both"):
        with pytest.raises(SettingsError, match="state feedback"):
            settings_from_environment({"FUZZMMU_TARGET": "kvm", "FUZZMMU_FEEDBACK": feedback})
    with pytest.raises(SettingsError, match="audit"):
        settings_from_environment({"FUZZMMU_TARGET": "kvm", "FUZZMMU_AUDIT": "1"})
    with pytest.raises(SettingsError, match="suppression file"):
        settings_from_environment({"FUZZMMU_SUPPRESS": str(tmp_path / "missing")})
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SettingsError, match="suppression file"):
        settings_from_environment({"FUZZMMU_SUPPRESS": str(tmp_path / "binary")})


def test_the_campaign_names_its_target_and_suppressions_to_the_fuzz_target(
        tmp_path: Path) -> None:
    from fuzzmmu.campaign.fuzz import target_environment

    known = tmp_path / "known.txt"
    known.write_text("missing-fault:access/read:4level:#PF(U)->ram\n")
    cfg = CampaignConfig(target="kvm", suppress=known, stats=tmp_path / "stats.jsonl")
    s = settings_from_environment(target_environment(cfg))
    assert s.target == "kvm" and s.suppress == ("missing-fault:access/read:4level:#PF(U)->ram",)
    assert s.suppressed_log == tmp_path / "suppressed.log"
    assert "FUZZMMU_SUPPRESS" not in target_environment(CampaignConfig())


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "kvm", "--bug", "cr0wp-not-in-role"], "mutants are for the model"),
    (["--target", "kvm", "--feedback", "state"], "state feedback"),
    (["--target", "kvm", "--feedback", "both"], "state feedback"),
    (["--target", "kvm", "--audit"], "audit"),
    (["--suppress", "/nonexistent/known.txt"], "suppression file"),
])
def test_what_a_kvm_campaign_cannot_do_is_an_error_before_it_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
        message: str) -> None:
    from fuzzmmu.cli import main

    corpus = tmp_path / "corpus"
    assert main(["fuzz", "--corpus", str(corpus), "--crashes", str(tmp_path / "crashes"),
                 "--stats", str(tmp_path / "stats.jsonl"), "--no-dashboard", *args]) == 2
    assert message in capsys.readouterr().err
    assert not corpus.exists()  # nothing was started


def test_a_kvm_campaign_without_a_usable_dev_kvm_is_an_error_before_it_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fuzzmmu.cli import main

    monkeypatch.setattr("fuzzmmu.kvm.device.KVM_PATH", "/nonexistent/kvm")
    corpus = tmp_path / "corpus"
    assert main(["fuzz", "--target", "kvm", "--corpus", str(corpus), "--no-dashboard",
                 "--crashes", str(tmp_path / "crashes"),
                 "--stats", str(tmp_path / "stats.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "real KVM is not usable here" in err and "/nonexistent/kvm" in err
    assert not corpus.exists()
