"""Seed corpora: programs kept as text (the source) with their binary form beside them, the
seed-corpus zip OSS-Fuzz/ClusterFuzzLite picks up, and what a corpus exercises."""

from __future__ import annotations

import collections
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from fuzzmmu.program.codec import decode, encode
from fuzzmmu.program.files import read_program
from fuzzmmu.program.ops import Interleave, Map, Op, Program, SetMode

REPO = Path(__file__).resolve().parents[2]
SEEDS = REPO / "corpus"
HARNESS = REPO / "harnesses" / "shadow_mmu_fuzzer.py"
SEED_ZIP = REPO / "harnesses" / "shadow_mmu_fuzzer_seed_corpus.zip"


def text_seeds(directory: Path = SEEDS) -> list[Path]:
    return sorted(directory.glob("*.txt"))


def binary_seeds(directory: Path = SEEDS) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix == "")


def build_seeds(directory: Path = SEEDS) -> list[Path]:
    """Write the binary form of every text seed beside it (NAME.txt -> NAME)."""
    out = []
    for src in text_seeds(directory):
        dst = src.with_suffix("")
        dst.write_bytes(encode(read_program(src)))
        out.append(dst)
    return out


def stale_seeds(directory: Path = SEEDS) -> list[str]:
    """Text seeds whose binary form is missing or differs from the text."""
    bad = []
    for src in text_seeds(directory):
        dst = src.with_suffix("")
        if not dst.exists() or dst.read_bytes() != encode(read_program(src)):
            bad.append(src.name)
    return bad


def seed_zip(out: Path = SEED_ZIP, directory: Path = SEEDS) -> Path:
    """The <target>_seed_corpus.zip of OSS-Fuzz / ClusterFuzzLite: the binary seeds."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for p in binary_seeds(directory):
            z.write(p, p.name)
    return out


@dataclass
class CorpusStats:
    files: int = 0
    ops: collections.Counter[str] = field(default_factory=collections.Counter)
    modes: collections.Counter[str] = field(default_factory=collections.Counter)


def _op_names(op: Op) -> list[str]:
    if isinstance(op, Interleave):
        return [f"interleave@{op.point.value}", *(n for o in (op.first, *op.second)
                                                  for n in _op_names(o))]
    if isinstance(op, Map):
        return ["map"]
    name = op.KIND
    kind = getattr(op, "kind", None)
    return [kind.value if kind is not None else name]


def program_features(p: Program) -> tuple[list[str], list[str]]:
    """The op kinds of a program and the guest modes it runs in."""
    ops = [n for op in p.ops for n in _op_names(op)]
    modes = {p.header.boot.value}
    modes |= {o.mode.value for o in p.flat_ops() if isinstance(o, SetMode)}
    return ops, sorted(modes)


def corpus_stats(directory: Path, limit: int = 2000) -> CorpusStats:
    """What the (newest ``limit``) programs of a corpus directory exercise."""
    stats = CorpusStats()
    dated = []
    for p in directory.iterdir():
        # libFuzzer removes and replaces corpus files while a campaign runs (fork-mode merges)
        try:
            if p.suffix != ".txt" and p.is_file():
                dated.append((p.stat().st_mtime, p.name, p))
        except OSError:
            continue
    dated.sort(reverse=True)
    stats.files = len(dated)
    for _, _, path in dated[:limit]:
        try:
            program = decode(path.read_bytes())
        except OSError:
            continue
        ops, modes = program_features(program)
        stats.ops.update(set(ops))
        stats.modes.update(modes)
    return stats
