"""The shipped seed corpus, its zip and what a corpus exercises."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from fuzzmmu.campaign.corpus import (
    SEEDS,
    binary_seeds,
    build_seeds,
    corpus_stats,
    seed_zip,
    stale_seeds,
    text_seeds,
)
from fuzzmmu.program.codec import decode
from fuzzmmu.program.files import read_program
from fuzzmmu.program.ops import GuestMode, Program


def test_shipped_binary_seeds_match_their_text() -> None:
    assert text_seeds() and stale_seeds() == []
    for src in text_seeds():
        assert decode(src.with_suffix("").read_bytes()) == read_program(src)


def test_seeds_cover_every_guest_mode_smm_mmio_and_interleavings() -> None:
    st = corpus_stats(SEEDS)
    assert {m.value for m in GuestMode} <= set(st.modes)
    for op in ("smi", "rsm", "memslot", "zap-all", "map", "pte", "invlpg", "cr3"):
        assert st.ops[op] > 0, op
    assert sum(n for op, n in st.ops.items() if op.startswith("interleave@")) >= 3


def test_an_edited_text_seed_is_stale_until_built(tmp_path: Path) -> None:
    for src in text_seeds():
        (tmp_path / src.name).write_text(src.read_text())
    assert len(stale_seeds(tmp_path)) == len(text_seeds())
    build_seeds(tmp_path)
    assert stale_seeds(tmp_path) == []
    first = sorted(tmp_path.glob("*.txt"))[0]
    first.write_text(first.read_text() + "smi cpu0\n")
    assert stale_seeds(tmp_path) == [first.name]


def test_seed_zip_holds_the_binary_seeds(tmp_path: Path) -> None:
    out = seed_zip(tmp_path / "shadow_mmu_fuzzer_seed_corpus.zip")
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == [p.name for p in binary_seeds()]
        for p in binary_seeds():
            assert z.read(p.name) == p.read_bytes()


def test_corpus_stats_survive_files_vanishing_under_them(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """libFuzzer replaces corpus files while a campaign's dashboard reads them."""
    for p in binary_seeds():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    gone = sorted(tmp_path.iterdir())[0]
    real_stat = Path.stat

    def stat(self: Path, **kw: object) -> object:
        if self == gone:
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_stat(self, **kw)

    monkeypatch.setattr(Path, "stat", stat)
    st = corpus_stats(tmp_path)
    assert st.files == len(binary_seeds()) - 1


def test_shipped_corpus_has_a_seed_per_configuration() -> None:
    """Every boot mode x policy x address space x unsync pages, as generated (a change to the
    generator shows here: `fuzzmmu corpus configs` and `build` write them again)."""
    from fuzzmmu.campaign.corpus import POLICIES, SPACES, configuration_seeds
    from fuzzmmu.program.ops import Smi

    generated = configuration_seeds()
    combos = set()
    for name, program in generated.items():
        assert read_program(SEEDS / f"{name}.txt") == program
        h = program.header
        space = "smm" if isinstance(program.ops[2], Smi) else "normal"
        unsync = "-unsync" if h.unsync else ""
        assert name == f"config-{h.boot.value}-{h.policy}-{space}{unsync}"
        combos.add((h.boot, h.policy, space, h.unsync))
    assert len(combos) == len(GuestMode) * len(POLICIES) * len(SPACES) * 2


def test_configuration_seeds_are_deterministic_and_run_clean() -> None:
    from fuzzmmu.campaign.corpus import configuration_seeds
    from fuzzmmu.oracle.executor import run

    seeds = configuration_seeds()
    assert seeds == configuration_seeds()
    for name, program in seeds.items():
        outcome = run(program, audit=True)
        assert outcome.divergence is None, (name, outcome.divergence)
        assert outcome.ops_run == len(program.ops)


def test_a_configuration_seed_is_the_draw_that_covers_most() -> None:
    # Of its draws, each configuration keeps the program with the most distinct state
    # features: never fewer than the first draw alone, and more for most configurations.
    from fuzzmmu.campaign.corpus import configuration_seeds
    from fuzzmmu.campaign.feedback import StateFeedback
    from fuzzmmu.oracle.executor import run

    def covered(program: Program) -> int:
        feedback = StateFeedback()
        run(program, observe=feedback)
        return len(set(feedback.features))

    one, best = configuration_seeds(draws=1), configuration_seeds()
    gains = [covered(best[name]) - covered(one[name]) for name in one]
    assert min(gains) >= 0
    assert sum(g > 0 for g in gains) > len(gains) // 2
