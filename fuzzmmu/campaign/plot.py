"""`fuzzmmu plot`: a campaign over time, from the JSON lines `fuzzmmu fuzz` writes once a second
(``--stats``, default ``.fuzzmmu/stats.jsonl``).

Each campaign appends a start line (``{"campaign": "start", "bugs": [...], "jobs": N, ...}``)
and then one line per second: ``t`` (seconds since it started), ``execs``, ``exec_per_s``,
``cov`` (edges), ``ft`` (features), ``corpus``, ``divergences``, ``signatures`` (count per
signature), ``tree_rss_mb`` (resident MB of libFuzzer's process tree; null until measured)
and ``processes``. A file holds every campaign run with the same ``--stats``; one is plotted,
the last by default.

The figure is five panels over one time axis: programs/s, coverage (edges and features),
corpus size, divergences (and distinct signatures), memory. ``.png`` (and whatever else
matplotlib writes: ``.svg``, ``.pdf``) is the figure alone; ``.html`` is a page with the
figure inline as SVG and the campaign's final figures, which reloads itself every minute, so
that ``watch -n 60 fuzzmmu plot STATS -o stats.html`` keeps a browser tab current. Needs
matplotlib (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The per-second record's fields that every panel needs, and those that may be null.
REQUIRED = ("t", "execs", "exec_per_s", "cov", "ft", "corpus", "divergences")
OPTIONAL = ("tree_rss_mb", "processes", "rss_mb", "first_divergence_s")
MAX_POINTS = 5000  # plotted per series; longer campaigns are thinned evenly (the last kept)
HTML_REFRESH_S = 60


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


class StatsFileError(ValueError):
    """The stats file cannot be plotted: missing, empty, or with lines that are not records.
    ``problems`` has one message per bad line."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


@dataclass
class Sample:
    t: float
    execs: int
    exec_per_s: float
    cov: int
    ft: int
    corpus: int
    divergences: int
    signatures: int
    tree_rss_mb: float | None
    processes: int | None
    first_divergence_s: float | None = None


@dataclass
class CampaignStats:
    """One campaign of a stats file: its start line (empty when the file has none) and its
    records, in file order."""

    start: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    first_line: int = 1

    @property
    def bugs(self) -> list[str]:
        return [str(b) for b in self.start.get("bugs", [])]

    @property
    def first_divergence(self) -> float | None:
        """When the first divergent program was found: the campaign's own figure, or else the
        first second whose record counts one."""
        for s in reversed(self.samples):
            if s.first_divergence_s is not None:
                return s.first_divergence_s
        for s in self.samples:
            if s.divergences:
                return s.t
        return None


def _number(record: dict[str, Any], key: str, nullable: bool) -> float | None:
    value = record.get(key)
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"field {key!r} is {json.dumps(value)}, not a number")
    return float(value)


def _sample(record: dict[str, Any]) -> Sample:
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"missing field{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(repr(k) for k in missing)}")
    n = {k: _number(record, k, False) for k in REQUIRED}
    opt = {k: _number(record, k, True) for k in OPTIONAL}
    sigs = record.get("signatures") or {}
    if not isinstance(sigs, dict):
        raise ValueError(f"field 'signatures' is {json.dumps(sigs)}, not an object")
    return Sample(t=n["t"] or 0.0, execs=int(n["execs"] or 0), exec_per_s=n["exec_per_s"] or 0.0,
                  cov=int(n["cov"] or 0), ft=int(n["ft"] or 0), corpus=int(n["corpus"] or 0),
                  divergences=int(n["divergences"] or 0), signatures=len(sigs),
                  tree_rss_mb=opt["tree_rss_mb"],
                  processes=None if opt["processes"] is None else int(opt["processes"]),
                  first_divergence_s=opt["first_divergence_s"])


def parse_stats(text: str, name: str = "stats") -> list[CampaignStats]:
    """The campaigns of a stats file's text. A last line cut short (a campaign writing or
    killed mid-line) is left out; any other line that is not a record is a problem, and all of
    them are reported together in one StatsFileError."""
    campaigns: list[CampaignStats] = []
    problems: list[str] = []
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
            if record.get("campaign") == "start":
                campaigns.append(CampaignStats(start=record, first_line=number))
                continue
            sample = _sample(record)
        except ValueError as exc:
            if number == len(lines) and not text.endswith("\n"):
                continue  # the line being written: the next read has it whole
            problems.append(f"{name}:{number}: {exc}: {line[:80]!r}")
            continue
        if not campaigns:  # records before any start line: a campaign of their own
            campaigns.append(CampaignStats(first_line=number))
        campaigns[-1].samples.append(sample)
    if problems:
        raise StatsFileError(f"{name}: {len(problems)} line{'s' if len(problems) > 1 else ''} "
                             "that are not campaign statistics", problems)
    if not any(c.samples for c in campaigns):
        raise StatsFileError(f"{name}: no statistics (a campaign writes one line a second "
                             "once libFuzzer runs)")
    return campaigns


def read_stats(path: Path) -> list[CampaignStats]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise StatsFileError(f"{path}: no such file (`fuzzmmu fuzz --stats FILE` writes it; "
                             "default .fuzzmmu/stats.jsonl)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise StatsFileError(f"{path}: cannot read it: {exc}") from exc
    return parse_stats(text, str(path))


def pick(campaigns: list[CampaignStats], which: int | None) -> CampaignStats:
    """Campaign ``which`` (1 = the first in the file, -1 = the last), or the last one with
    records when None."""
    if which is None:
        return [c for c in campaigns if c.samples][-1]
    if which == 0 or abs(which) > len(campaigns):
        raise StatsFileError(f"--campaign {which}: the file has {len(campaigns)} campaign"
                             f"{'s' if len(campaigns) != 1 else ''} (1 to {len(campaigns)}, or "
                             "-1 for the last)")
    chosen = campaigns[which - 1 if which > 0 else which]
    if not chosen.samples:
        raise StatsFileError(f"--campaign {which} (line {chosen.first_line}) has no statistics")
    return chosen


def default_output(stats: Path) -> Path:
    """Next to the stats file: .fuzzmmu/stats.jsonl -> .fuzzmmu/stats.png."""
    return stats.with_suffix(".png")


def _thin(samples: list[Sample]) -> list[Sample]:
    if len(samples) <= MAX_POINTS:
        return samples
    step = math.ceil(len(samples) / MAX_POINTS)
    out = samples[::step]
    if out[-1] is not samples[-1]:
        out.append(samples[-1])
    return out


def recent_rate(samples: list[Sample], window: float) -> list[float]:
    """Programs per second over the ``window`` seconds before each sample, from the program
    count (libFuzzer's own exec/s is the average since it started, and its count moves only
    when it prints a status line)."""
    out = []
    j = 0
    for s in samples:
        while j + 1 < len(samples) and samples[j + 1].t <= s.t - window:
            j += 1
        base = samples[j] if samples[j].t <= s.t - window else samples[0]
        span = s.t - base.t
        out.append((s.execs - base.execs) / span if span > 0 else 0.0)
    return out


def _time_axis(seconds: float) -> tuple[float, str]:
    if seconds >= 3 * 3600:
        return 3600.0, "hours"
    if seconds >= 180:
        return 60.0, "minutes"
    return 1.0, "seconds"


def title(c: CampaignStats, source: str) -> str:
    bugs = ", ".join(c.bugs) if c.bugs else "none (the clean model)"
    jobs = c.start.get("jobs")
    return f"fuzzmmu campaign ({source}): bugs {bugs}" + (f"; {jobs} job{'s' if jobs != 1 else ''}"
                                                         if jobs else "")


def summary_rows(c: CampaignStats) -> list[tuple[str, str]]:
    last = c.samples[-1]
    first = c.first_divergence
    rss = [s.tree_rss_mb for s in c.samples if s.tree_rss_mb is not None]
    return [
        ("elapsed", f"{last.t:,.0f} s"),
        ("programs", f"{last.execs:,} ({last.execs / last.t if last.t else 0:,.0f}/s on "
                     "average)"),
        ("coverage", f"{last.cov:,} edges, {last.ft:,} features"),
        ("corpus", f"{last.corpus:,} programs"),
        ("divergences", f"{last.divergences:,} in {last.signatures:,} signature"
                        f"{'s' if last.signatures != 1 else ''}"
                        + (f", the first after {first:,.1f} s" if first is not None else "")),
        ("memory", f"{rss[-1]:,.0f} MB (peak {max(rss):,.0f} MB)" if rss else "-"),
    ]


def figure(c: CampaignStats, source: str) -> Any:
    """The matplotlib figure of one campaign (Agg backend: files only, no display)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on a fuzzing machine or in CI
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise PlotUnavailable("the plot needs matplotlib: pip install -e '.[bench]'") from exc
    samples = _thin(c.samples)
    scale, unit = _time_axis(samples[-1].t)
    t = [s.t / scale for s in samples]
    dot = "." if len(samples) < 60 else None  # a short campaign's few seconds stay visible
    fig, axes = plt.subplots(5, 1, sharex=True, figsize=(9, 11), dpi=110,
                             gridspec_kw={"hspace": 0.12})
    rate, cov, corpus, div, mem = axes

    window = max(10.0, round(c.samples[-1].t / 100))
    rate.plot(t, recent_rate(samples, window), color="tab:blue", linewidth=1.2, marker=dot,
              label=f"over the last {window:.0f} s")
    rate.plot(t, [s.exec_per_s for s in samples], color="tab:cyan", linewidth=1.2,
              linestyle="--", label="libFuzzer's exec/s")
    rate.legend(loc="lower right", fontsize=8)
    rate.set_ylabel("programs/s")
    rate.set_ylim(bottom=0)

    cov.plot(t, [s.cov for s in samples], color="tab:green", linewidth=1.5, marker=dot,
             label="edges")
    cov.set_ylabel("edges", color="tab:green")
    feat = cov.twinx()
    feat.plot(t, [s.ft for s in samples], color="tab:olive", linewidth=1.5, linestyle="--",
              marker=dot, label="features")
    feat.set_ylabel("features", color="tab:olive")
    cov.legend(handles=[*cov.get_lines(), *feat.get_lines()], loc="lower right", fontsize=8)

    corpus.plot(t, [s.corpus for s in samples], color="tab:purple", linewidth=1.5, marker=dot)
    corpus.set_ylabel("corpus\n(programs)")

    div.step(t, [s.divergences for s in samples], where="post", color="tab:red",
             linewidth=1.5, label="divergent programs")
    div.step(t, [s.signatures for s in samples], where="post", color="tab:orange",
             linewidth=1.2, linestyle="--", label="distinct signatures")
    div.set_ylabel("divergences")
    div.set_ylim(bottom=0, top=max(1, max(s.divergences for s in samples)) * 1.1)
    if c.first_divergence is not None:
        for ax in axes:
            ax.axvline(c.first_divergence / scale, color="tab:red", alpha=0.35, linewidth=1)
    div.legend(loc="upper left", fontsize=8)

    rss = [(x, s.tree_rss_mb) for x, s in zip(t, samples, strict=True)
           if s.tree_rss_mb is not None]
    if rss:
        mem.plot([x for x, _ in rss], [y for _, y in rss], color="tab:gray", linewidth=1.5,
                 marker=dot)
        mem.set_ylim(bottom=0)
    else:
        mem.text(0.5, 0.5, "not measured", transform=mem.transAxes, ha="center",
                 va="center", color="gray")
    mem.set_ylabel("resident MB\n(fuzzing tree)")
    mem.set_xlabel(f"{unit} since the campaign started")

    for ax in axes:
        ax.grid(True, alpha=0.3)
    for ax in (rate, cov, corpus, div, mem, feat):
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    for ax in (cov, feat, corpus, div):  # counts
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    last = c.samples[-1]
    fig.suptitle(f"{title(c, source)}\n{last.t:,.0f} s, {last.execs:,} programs; "
                 f"divergences: {dict(summary_rows(c))['divergences']}", fontsize=10)
    fig.subplots_adjust(left=0.11, right=0.89, top=0.94, bottom=0.05)
    return fig


def _page(c: CampaignStats, source: str, svg: str) -> str:
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                     for k, v in summary_rows(c))
    name = html.escape(title(c, source))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{HTML_REFRESH_S}">
<title>{name}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ text-align: left; padding: 0.2em 1em 0.2em 0; }}
svg {{ max-width: 100%; height: auto; }}
</style>
</head>
<body>
<h1>{name}</h1>
<table>
{rows}
</table>
{svg}
</body>
</html>
"""


def plot_campaign(c: CampaignStats, out: Path, source: str) -> Path:
    """Write campaign ``c`` to ``out``: a figure file, or with ``.html`` a page around it."""
    fig = figure(c, source)
    import matplotlib.pyplot as plt

    try:
        if out.suffix.lower() in (".html", ".htm"):
            buf = io.StringIO()
            fig.savefig(buf, format="svg")
            svg = buf.getvalue()
            svg = svg[svg.index("<svg"):]  # drop the XML prolog and DOCTYPE inside HTML
            out.write_text(_page(c, source, svg), encoding="utf-8")
        else:
            fig.savefig(out)
    finally:
        plt.close(fig)
    return out


def plot_stats_file(stats: Path, out: Path | None = None, which: int | None = None
                    ) -> tuple[Path, CampaignStats, int]:
    """Plot one campaign of ``stats`` (the last by default) to ``out`` (default: beside it, as
    PNG). Returns the file written, the campaign and how many campaigns the file holds."""
    campaigns = read_stats(stats)
    chosen = pick(campaigns, which)
    out = out if out is not None else default_output(stats)
    return plot_campaign(chosen, out, stats.name), chosen, len(campaigns)


def plot_note(stats: Path, out: Path | None = None) -> str:
    """For the end of a campaign (the demo's): plot its stats file's last campaign and say
    where, or why there is no plot; never raises."""
    try:
        written, _, _ = plot_stats_file(stats, out)
    except PlotUnavailable:
        return "no campaign plot: matplotlib is not installed (pip install -e '.[bench]')"
    except (StatsFileError, OSError, ValueError) as exc:
        return f"no campaign plot: {exc}"
    return f"campaign plot: {written} (`fuzzmmu plot {stats}` draws it again)"
