"""Seed corpora: programs kept as text (the source) with their binary form beside them, the
seed-corpus zip OSS-Fuzz/ClusterFuzzLite picks up, and what a corpus exercises."""

from __future__ import annotations

import collections
import itertools
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fuzzmmu.program.codec import decode, encode
from fuzzmmu.program.files import read_program
from fuzzmmu.program.generate import Generator
from fuzzmmu.program.ops import (
    GuestMode,
    Header,
    Interleave,
    Map,
    Op,
    Program,
    Rsm,
    SetMode,
    Smi,
)
from fuzzmmu.program.text import format_program
from fuzzmmu.program.world import BOOT_ROOT

REPO = Path(__file__).resolve().parents[2]
SEEDS = REPO / "corpus"
HARNESS = REPO / "harnesses" / "shadow_mmu_fuzzer.py"
SEED_ZIP = REPO / "harnesses" / "shadow_mmu_fuzzer_seed_corpus.zip"


POLICIES = ("zap", "update")
SPACES = ("normal", "smm")  # the address space the program's ops run in: KVM's as_id 0 or 1


def configuration_seeds(n_ops: int = 16, draws: int = 8) -> dict[str, Program]:
    """A generated seed per boot mode x emulated-PT-write policy x address space x unsync
    pages, named config-MODE-POLICY-SPACE[-unsync], so that a campaign starts from every
    configuration KVM keeps apart (roles differ by paging mode, the policy picks
    kvm_mmu_pte_write's path, SMM has its own memslots and roots, unsync pages change what a
    guest store to a table does) rather than from the few the hand-written seeds use. In an SMM
    seed vCPU 0 enters SMM, turns paging on there and leaves at the end; vCPU 1 stays
    outside, so the two address spaces meet. Each is the one of ``draws`` generated programs
    that shows the most distinct state features on the clean model (one draw alone made the
    seed mutants' times swing with every change to the generator). Deterministic: the
    generators are seeded by the seed's name."""
    # Imported here: the campaign's processes import this module for its paths, before they
    # choose between the compiled and the Python model.
    from fuzzmmu.campaign.feedback import StateFeedback
    from fuzzmmu.oracle.executor import run

    seeds = {}
    for mode, policy, space, unsync in itertools.product(GuestMode, POLICIES, SPACES,
                                                         (False, True)):
        name = f"config-{mode.value}-{policy}-{space}" + ("-unsync" if unsync else "")
        header = Header(policy=policy, boot=mode, unsync=unsync)
        best: tuple[int, Program] | None = None
        for k in range(draws):
            gen = Generator(random.Random(name if k == 0 else f"{name}#{k}"), header)
            body = gen.program(n_ops).ops
            if space == "smm":
                body = (*body[:2], Smi(0), SetMode(0, mode, BOOT_ROOT), *body[2:], Rsm(0))
            program = Program(gen.header, body)
            feedback = StateFeedback()
            if run(program, observe=feedback).divergence is not None:
                continue
            covered = len(set(feedback.features))
            if best is None or covered > best[0]:
                best = (covered, program)
        assert best is not None, f"every draw of {name} diverges on the clean model"
        seeds[name] = best[1]
    return seeds


def write_configuration_seeds(directory: Path = SEEDS) -> list[Path]:
    """Write :func:`configuration_seeds` as text seeds (``build_seeds`` adds their binary
    form)."""
    out = []
    for name, program in configuration_seeds().items():
        path = directory / f"{name}.txt"
        path.write_text(format_program(program))
        out.append(path)
    return out


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


def corpus_stats(directory: Path, limit: int = 2000,
                 adapt: Callable[[Program], Program] | None = None) -> CorpusStats:
    """What the (newest ``limit``) programs of a corpus directory exercise; with ``adapt``,
    what they exercise as the target runs them (fuzzmmu.kvm.support.host_program)."""
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
        if adapt is not None:
            program = adapt(program)
        ops, modes = program_features(program)
        stats.ops.update(set(ops))
        stats.modes.update(modes)
    return stats
