"""`fuzzmmu bench` end to end on a tiny budget (the figures themselves are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fuzzmmu.bench.engines import Engine
from fuzzmmu.bench.runner import BenchConfig, plan
from fuzzmmu.cli import main

EASY = "walk-addr-access-checks.accessed-bit"


def bench(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fuzzmmu.cli", "bench", *map(str, argv)],
                          capture_output=True, text=True, timeout=400, check=False,
                          env={"COLUMNS": "200", "PATH": str(Path(sys.executable).parent)})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench")
    res = bench("--bugs", EASY, "--trials", "1", "--budget", "20", "--throughput-time", "1",
                "--jobs", "2", "--out", out)
    return out, res


def test_every_engine_runs_and_everything_is_written(tiny: tuple[Path, object]) -> None:
    out, res = tiny
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads((out / "bench.json").read_text())
    engines = [e.value for e in Engine]
    assert data["meta"]["engines"] == engines and data["meta"]["bugs"] == [EASY]
    trials = data["trials"]
    assert sorted((t["bug"] or "", t["engine"]) for t in trials) == sorted(
        [("", e) for e in engines] + [(EASY, e) for e in engines])
    for t in trials:
        assert t["error"] is None, t
        assert t["programs"] > 0
        if t["found"]:
            # what was found replays, was minimized to a 1-minimal program
            assert t["signature"].startswith("ad-mismatch")
            assert t["minimized"]["one_minimal"]
            assert t["minimized"]["ops_after"] <= t["minimized"]["ops_before"]
    assert {c["engine"] for c in data["summary"]["cells"]} == set(engines)
    assert set(data["summary"]["throughput"]) == set(engines)
    assert any(g["goal"].startswith("throughput") for g in data["summary"]["goals"])
    lines = (out / "trials.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["settings"]["budget"] == 20.0
    assert len(lines) == 1 + len(trials)
    assert "time to first divergence" in res.stdout and "engines over the catalog" in res.stdout
    if (out / "survival.png").exists():
        assert (out / "survival.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "no plot" in res.stdout


def test_resume_runs_only_what_is_missing(tiny: tuple[Path, object]) -> None:
    out, _ = tiny
    before = (out / "trials.jsonl").read_text()
    res = bench("--bugs", EASY, "--trials", "1", "--budget", "20", "--throughput-time", "1",
                "--out", out, "--resume")
    assert res.returncode == 0, res.stderr
    assert "0 to run" in res.stdout
    assert (out / "trials.jsonl").read_text() == before
    res = bench("--bugs", EASY, "--budget", "5", "--out", out, "--resume")
    assert res.returncode == 2 and "settings" in res.stderr


def test_report_reprints_a_finished_run(tiny: tuple[Path, object]) -> None:
    out, _ = tiny
    res = bench("--report", "--out", out)
    assert res.returncode == 0 and "engines over the catalog" in res.stdout
    res = bench("--report", "--markdown", "--out", out)
    assert res.returncode == 0 and f"| `{EASY}` (seed) | **1/1 " in res.stdout
    assert "| engine | programs/s (clean) |" in res.stdout


@pytest.mark.parametrize(("argv", "message"), [
    (["--bugs", "no-such-bug"], "unknown bug id"),
    (["--engines", "afl"], "'afl' is not a valid Engine"),
    (["--trials", "0"], "--trials must be at least 1"),
    (["--budget", "0"], "--budget must be at least 1"),
    (["--report", "--out", "/nonexistent"], "cannot read a benchmark"),
    (["--markdown"], "--markdown goes with --report"),
])
def test_bad_flags_are_clear_errors(capsys: pytest.CaptureFixture[str], argv: list[str],
                                    message: str) -> None:
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_engines_that_watch_no_line_run_the_compiled_model() -> None:
    from fuzzmmu.bench.trial import watches_lines

    cfg = BenchConfig(("a",), tuple(Engine), trials=1, throughput_time=0, native=True)
    assert all(s.native for s in plan(cfg))
    assert not any(s.native for s in plan(BenchConfig(("a",), tuple(Engine), trials=1)))
    assert {e for e in Engine if watches_lines(e)} == {
        Engine.ATHERIS, Engine.ATHERIS_BYTES, Engine.ATHERIS_BOTH}


def test_plan_puts_throughput_first_then_interleaves_engines() -> None:
    cfg = BenchConfig(("a", "b"), (Engine.ATHERIS, Engine.RANDOM), trials=2, seed=5,
                      throughput_time=3)
    specs = plan(cfg)
    assert [(s.bug, s.engine) for s in specs[:2]] == [(None, Engine.ATHERIS),
                                                      (None, Engine.RANDOM)]
    assert [(s.bug, s.engine.value, s.trial, s.seed) for s in specs[2:6]] == [
        ("a", "atheris", 0, 5), ("a", "random", 0, 5), ("b", "atheris", 0, 5),
        ("b", "random", 0, 5)]
    assert len(specs) == 2 + 2 * 2 * 2
