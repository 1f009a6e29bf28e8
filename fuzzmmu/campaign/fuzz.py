"""`fuzzmmu fuzz`: a campaign around libFuzzer, with a live dashboard.

libFuzzer (through the Atheris target in harnesses/) owns scheduling, corpus management and
forking: ``--jobs N`` (or ``--keep-going``) runs it in fork mode. This driver prepares the
corpus (seeded from corpus/ when empty, resumed otherwise), starts the target, reads its status
lines, replays each new crash file to sign and classify it (writing ``.txt``/``.json`` beside
it), shows the dashboard, appends a JSON line of statistics every second, and stops cleanly on
Ctrl-C, at ``--max-time``, or at the first divergence unless ``--keep-going``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from fuzzmmu.campaign.corpus import HARNESS, SEEDS, binary_seeds, corpus_stats
from fuzzmmu.campaign.settings import TargetSettings
from fuzzmmu.campaign.triage import Crash, is_crash_file, load_crash, write_sidecar
from fuzzmmu.program.codec import HEADER_SIZE, MAX_OPS, RECORD_SIZE

MAX_LEN = HEADER_SIZE + RECORD_SIZE * MAX_OPS
DICTIONARY = HARNESS.with_suffix(".dict")

# libFuzzer status lines, in-process ("#123 NEW cov: ...") and fork mode ("#123: cov: ...").
_STATUS = re.compile(
    r"#(?P<execs>\d+):?\s+(?:\w+\s+)?cov: (?P<cov>\d+) ft: (?P<ft>\d+) corp: (?P<corp>\d+)"
    r"(?:/\S+)?(?: lim: \d+)? exec/s:? (?P<rate>\d+)(?: rss: (?P<rss>\d+)Mb)?"
    r"(?: oom/timeout/crash: (?P<oom>\d+)/(?P<timeout>\d+)/(?P<crash>\d+))?")


@dataclass
class CampaignConfig:
    bugs: tuple[str, ...] = ()
    max_time: int | None = None
    jobs: int = 1
    corpus: Path = Path(".fuzzmmu/corpus")
    crashes: Path = Path("crashes")
    seed: int | None = None
    keep_going: bool = False
    libfuzzer_args: tuple[str, ...] = ()
    audit: bool = False
    byte_share: float = 0.2
    stats: Path = Path(".fuzzmmu/stats.jsonl")
    seeds: Path = SEEDS
    dashboard: bool = True


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    execs: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    rate: int = 0
    rss: int = 0
    first_divergence: float | None = None
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=6))

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def update(self, line: str) -> None:
        m = _STATUS.search(line)
        if m is None:
            return
        self.execs = int(m["execs"])
        self.cov, self.ft, self.corpus = int(m["cov"]), int(m["ft"]), int(m["corp"])
        self.rate = int(m["rate"])
        if m["rss"]:
            self.rss = int(m["rss"])


@dataclass
class CampaignResult:
    stats: Stats
    crashes: list[Crash]
    returncode: int
    interrupted: bool

    @property
    def divergences(self) -> list[Crash]:
        return [c for c in self.crashes if c.divergence is not None]


def target_command(cfg: CampaignConfig) -> list[str]:
    cmd = [sys.executable, str(HARNESS), str(cfg.corpus), f"-artifact_prefix={cfg.crashes}/",
           f"-max_len={MAX_LEN}", "-print_final_stats=1"]
    if DICTIONARY.exists():
        cmd.append(f"-dict={DICTIONARY}")
    if cfg.seed is not None:
        cmd.append(f"-seed={cfg.seed}")
    if cfg.max_time:
        cmd.append(f"-max_total_time={cfg.max_time}")
    if cfg.jobs > 1 or cfg.keep_going:
        cmd.append(f"-fork={cfg.jobs}")
        if cfg.keep_going:
            cmd.append("-ignore_crashes=1")
    return cmd + list(cfg.libfuzzer_args)


def target_environment(cfg: CampaignConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TargetSettings(cfg.bugs, cfg.audit, cfg.byte_share).environment())
    # Fork mode re-executes the target by its path: its shebang must find this Python.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def prepare(cfg: CampaignConfig) -> int:
    """Create the directories; seed an empty corpus. Returns how many seeds were copied."""
    cfg.corpus.mkdir(parents=True, exist_ok=True)
    cfg.crashes.mkdir(parents=True, exist_ok=True)
    cfg.stats.parent.mkdir(parents=True, exist_ok=True)
    if any(cfg.corpus.iterdir()):
        return 0
    seeds = binary_seeds(cfg.seeds) if cfg.seeds.is_dir() else []
    for s in seeds:
        shutil.copy(s, cfg.corpus / s.name)
    return len(seeds)


class Campaign:
    def __init__(self, cfg: CampaignConfig, console: Console) -> None:
        self.cfg = cfg
        self.console = console
        self.stats = Stats()
        self.crashes: dict[str, Crash] = {}
        self.known: set[str] = set()
        self.ops: Counter[str] = Counter()
        self.modes: Counter[str] = Counter()
        self.corpus_files = 0
        self._next_corpus_scan = 0.0

    # -- what happens

    def _read(self, stream: object) -> None:
        for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
            line = raw.decode("utf-8", "replace").rstrip()
            self.stats.update(line)
            if line:
                self.stats.lines.append(line)

    def _scan_crashes(self) -> None:
        for path in sorted(self.cfg.crashes.iterdir()):
            if path.name in self.known or not is_crash_file(path):
                continue
            self.known.add(path.name)
            try:
                crash = load_crash(path, self.cfg.bugs)
            except ValueError as exc:
                self.stats.lines.append(f"could not replay {path.name}: {exc}")
                continue
            found = round(self.stats.elapsed, 2)
            if crash.divergence is not None and self.stats.first_divergence is None:
                self.stats.first_divergence = found
            crash.found_after = found
            write_sidecar(crash, found)
            self.crashes[path.name] = crash

    def _scan_corpus(self) -> None:
        if time.monotonic() < self._next_corpus_scan:
            return
        self._next_corpus_scan = time.monotonic() + 5
        st = corpus_stats(self.cfg.corpus, limit=400)
        self.ops, self.modes, self.corpus_files = st.ops, st.modes, st.files

    def _record(self, out: object) -> None:
        s = self.stats
        sigs = Counter(c.signature for c in self.crashes.values())
        line = {"t": round(s.elapsed, 2), "execs": s.execs, "exec_per_s": s.rate, "cov": s.cov,
                "ft": s.ft, "corpus": s.corpus, "rss_mb": s.rss,
                "divergences": sum(1 for c in self.crashes.values() if c.divergence),
                "signatures": dict(sigs), "first_divergence_s": s.first_divergence}
        out.write(json.dumps(line) + "\n")  # type: ignore[attr-defined]
        out.flush()  # type: ignore[attr-defined]

    # -- the dashboard

    def render(self) -> Group:
        s, cfg = self.stats, self.cfg
        limit = f" / {cfg.max_time}s" if cfg.max_time else ""
        head = Table.grid(padding=(0, 2))
        for _ in range(4):
            head.add_column()
        head.add_row("elapsed", f"{s.elapsed:6.0f}s{limit}", "programs", f"{s.execs:,}")
        head.add_row("programs/s", f"{s.rate:,}", "coverage", f"{s.cov:,} edges, {s.ft:,} "
                     "features")
        head.add_row("corpus", f"{max(s.corpus, self.corpus_files):,} programs", "memory",
                     f"{s.rss} MB")
        first = "-" if s.first_divergence is None else f"{s.first_divergence:.1f}s"
        head.add_row("jobs", str(cfg.jobs), "first divergence", first)
        bugs = ", ".join(cfg.bugs) or "none (the clean model)"
        top = Panel(head, title=f"fuzzmmu campaign - bugs: {escape(bugs)}", title_align="left")
        div = Table(title="divergences", title_justify="left", expand=True)
        for col in ("kind", "signature", "count", "first at", "smallest file"):
            div.add_column(col, overflow="fold")
        groups: dict[str, list[Crash]] = {}
        for c in self.crashes.values():
            groups.setdefault(c.signature, []).append(c)
        for sig, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            kind = members[0].divergence.kind.value if members[0].divergence else "-"
            firsts = [m.found_after for m in members if m.found_after is not None]
            small = min(members, key=lambda m: (m.ops, m.path.name))
            div.add_row(kind, escape(sig), str(len(members)),
                        f"{min(firsts):.1f}s" if firsts else "-", small.path.name)
        if not groups:
            div.add_row("-", "none yet", "", "", "")
        ex = Table(title="what the corpus exercises", title_justify="left", expand=True)
        ex.add_column("op kinds (programs)", overflow="fold")
        ex.add_column("guest modes (programs)", overflow="fold")
        ex.add_row(", ".join(f"{k} {n}" for k, n in self.ops.most_common(14)) or "-",
                   ", ".join(f"{k} {n}" for k, n in self.modes.most_common()) or "-")
        log = "\n".join(escape(x[:160]) for x in s.lines)
        return Group(top, div, ex, Panel(log or "starting...", title="libFuzzer",
                                         title_align="left"))

    # -- the run

    def run(self) -> CampaignResult:
        cfg = self.cfg
        copied = prepare(cfg)
        for p in cfg.crashes.iterdir():  # crashes from earlier campaigns are not news
            if is_crash_file(p):
                self.known.add(p.name)
        if copied:
            self.console.print(f"seeded {cfg.corpus} with {copied} programs from {cfg.seeds}")
        proc = subprocess.Popen(target_command(cfg), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, env=target_environment(cfg))
        reader = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        reader.start()
        interrupted = False
        next_record = 0.0
        with cfg.stats.open("a") as out:
            out.write(json.dumps({"campaign": "start", "bugs": list(cfg.bugs), "jobs": cfg.jobs,
                                  "corpus": str(cfg.corpus), "max_time": cfg.max_time}) + "\n")
            live = Live(self.render(), console=self.console, auto_refresh=False,
                        transient=False) if cfg.dashboard else None
            try:
                if live is not None:
                    live.start()
                while True:
                    done = proc.poll() is not None
                    self._scan_crashes()
                    self._scan_corpus()
                    if time.monotonic() >= next_record or done:
                        self._record(out)
                        next_record = time.monotonic() + 1
                        if live is None:
                            self._progress()
                    if live is not None:
                        live.update(self.render(), refresh=True)
                    if done:
                        break
                    time.sleep(0.25)
            except KeyboardInterrupt:
                interrupted = True
                self._stop(proc)
            except BaseException:
                self._stop(proc)  # an error here must not leave libFuzzer running unwatched
                raise
            finally:
                reader.join(timeout=5)
                self._scan_crashes()
                self._record(out)
                if live is not None:
                    live.update(self.render(), refresh=True)
                    live.stop()
        return CampaignResult(self.stats, list(self.crashes.values()), proc.returncode or 0,
                              interrupted)

    def _progress(self) -> None:
        s = self.stats
        self.console.print(f"[{s.elapsed:5.0f}s] programs {s.execs} ({s.rate}/s) cov {s.cov} "
                           f"ft {s.ft} corpus {s.corpus} divergences "
                           f"{sum(1 for c in self.crashes.values() if c.divergence)}",
                           highlight=False)

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Ctrl-C reached our process group; make sure libFuzzer stops and writes its stats."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def summary(console: Console, result: CampaignResult) -> None:
    s = result.stats
    console.print(f"{'stopped' if result.interrupted else 'finished'} after {s.elapsed:.0f}s: "
                  f"{s.execs:,} programs ({s.rate}/s at the end), coverage {s.cov} edges, "
                  f"corpus {s.corpus}", highlight=False)
    divs = result.divergences
    if not divs:
        console.print("[green]no divergence[/]")
        return
    first = min(divs, key=lambda c: (c.found_after or 0.0, c.path.name))
    console.print(f"[red]{len(divs)} divergent program(s)[/]; first after "
                  f"{s.first_divergence:.1f}s: {first.path}", highlight=False)
    for c in sorted(divs, key=lambda c: c.path.name):
        console.print(f"  {c.path}  {escape(c.signature)}", highlight=False)
