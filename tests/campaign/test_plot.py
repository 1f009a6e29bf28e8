"""`fuzzmmu plot`: reading a campaign's stats file, the figure, and every way it can refuse."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fuzzmmu.campaign.plot import (
    StatsFileError,
    default_output,
    parse_stats,
    pick,
    plot_note,
    recent_rate,
)
from fuzzmmu.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(t: float, divergences: int = 0, rss: float | None = 100.0) -> dict[str, object]:
    """One per-second line as fuzzmmu.campaign.fuzz.Campaign._record writes it."""
    return {"t": t, "execs": int(t * 250), "exec_per_s": 250, "cov": 1000 + int(t),
            "ft": 2000 + 3 * int(t), "corpus": 30 + int(t) // 2, "rss_mb": 0,
            "tree_rss_mb": rss, "processes": 2,
            "divergences": divergences, "signatures": {f"sig{i}": 1 for i in range(divergences)},
            "first_divergence_s": 20.5 if divergences else None}


def _stats(path: Path, campaigns: int = 1, seconds: int = 40) -> Path:
    lines = []
    for k in range(campaigns):
        lines.append({"campaign": "start", "bugs": [f"bug{k}"], "jobs": 1,
                      "corpus": "c", "max_time": seconds})
        lines += [_record(float(t), divergences=1 if t > 20 else 0, rss=None if t < 2 else 90.0)
                  for t in range(seconds)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_campaigns_are_split_at_their_start_lines_and_the_last_is_picked(tmp_path: Path) -> None:
    camps = parse_stats(_stats(tmp_path / "s.jsonl", campaigns=3, seconds=5).read_text())
    assert [c.bugs for c in camps] == [["bug0"], ["bug1"], ["bug2"]]
    assert [c.first_line for c in camps] == [1, 7, 13]
    assert all(len(c.samples) == 5 for c in camps)
    assert pick(camps, None) is camps[-1] and pick(camps, 1) is camps[0]
    assert pick(camps, -2) is camps[1]
    with pytest.raises(StatsFileError, match="1 to 3"):
        pick(camps, 4)


def test_a_last_line_cut_short_is_left_out(tmp_path: Path) -> None:
    text = _stats(tmp_path / "s.jsonl", seconds=3).read_text() + '{"t": 3.0, "exe'
    (camp,) = parse_stats(text)
    assert [s.t for s in camp.samples] == [0.0, 1.0, 2.0]


def test_records_without_a_start_line_are_a_campaign(tmp_path: Path) -> None:
    (camp,) = parse_stats(json.dumps(_record(1.0)) + "\n")
    assert camp.start == {} and camp.bugs == [] and len(camp.samples) == 1


def test_every_bad_line_is_named(tmp_path: Path) -> None:
    good = json.dumps(_record(1.0))
    text = "\n".join([good, "not json", good, '{"t": 2}', '[1, 2]',
                      json.dumps({**_record(3.0), "execs": "many"}), good]) + "\n"
    with pytest.raises(StatsFileError) as err:
        parse_stats(text, "s.jsonl")
    assert "4 lines" in str(err.value)
    problems = err.value.problems
    assert [p.split(":")[1] for p in problems] == ["2", "4", "5", "6"]
    assert "not JSON (Expecting value at column 1): 'not json'" in problems[0]
    assert "missing fields 'execs'" in problems[1]
    assert "not an object" in problems[2]
    assert "field 'execs' is \"many\", not a number" in problems[3]


def test_the_rate_comes_from_the_program_count_over_a_window() -> None:
    camp = parse_stats("".join(json.dumps(_record(float(t))) + "\n" for t in range(30)))[0]
    rates = recent_rate(camp.samples, 10.0)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(250.0)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["plot", *argv])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


def test_plot_writes_a_png_beside_the_stats_file(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the bench extra)")
    stats = _stats(tmp_path / "stats.jsonl", campaigns=2)
    code, out, err = _run(capsys, str(stats))
    assert code == 0, err
    png = default_output(stats)
    assert png == tmp_path / "stats.png"
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 20_000
    assert "wrote" in out and "one of 2" in " ".join(out.split())


def test_plot_html_is_a_page_with_the_figure(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the bench extra)")
    stats = _stats(tmp_path / "stats.jsonl")
    page = tmp_path / "campaign.html"
    code, _, err = _run(capsys, str(stats), "-o", str(page), "--campaign", "1")
    assert code == 0, err
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text and "<?xml" not in text
    assert 'http-equiv="refresh"' in text and "1 in 1 signature" in text


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("", "no statistics"),
    ('{"campaign": "start", "bugs": []}\n', "no statistics"),
    ("garbage\n{}\n", "garbage"),
])
def test_unusable_stats_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              content: str | None, message: str) -> None:
    stats = tmp_path / "stats.jsonl"
    if content is not None:
        stats.write_text(content)
    code, out, err = _run(capsys, str(stats))
    assert code == 2 and message in err and "Traceback" not in out + err
    assert not (tmp_path / "stats.png").exists()


def test_each_bad_line_gets_its_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stats = _stats(tmp_path / "stats.jsonl", seconds=3)
    stats.write_text(stats.read_text() + "oops\n" + json.dumps({"t": 1}) + "\n")
    code, _, err = _run(capsys, str(stats))
    assert code == 2
    assert f"{stats}:5:" in err and f"{stats}:6:" in err and "2 lines" in err


def test_campaign_out_of_range_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, str(_stats(tmp_path / "s.jsonl")), "--campaign", "2")
    assert code == 2 and "the file has 1 campaign" in err


def test_without_matplotlib_it_says_what_to_install(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    stats = _stats(tmp_path / "stats.jsonl")
    code, _, err = _run(capsys, str(stats))
    assert code == 2 and "needs matplotlib" in err and ".[bench]" in err
    assert plot_note(stats).startswith("no campaign plot: matplotlib is not installed")
    assert plot_note(tmp_path / "missing.jsonl").startswith("no campaign plot:")
