"""State feedback (fuzzmmu.campaign.feedback): a program that builds a relation of KVM's shadow
state yields the feature that names it; the features reach libFuzzer through its counters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import fuzzmmu.campaign.feedback as F
from fuzzmmu.campaign.settings import Feedback, SettingsError, settings_from_environment
from fuzzmmu.model.mmu.stats import STAT_NAMES
from fuzzmmu.oracle.executor import run
from fuzzmmu.program.files import read_program
from fuzzmmu.program.text import parse_program

HEAD = ("# fuzzmmu program v1\n"
        "config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level\n")
# 0x1000 through PML4[0] -> PDPT 8 -> PD 9 -> PT 0xa; 0x201000 is PD entry 1, PT entry 1.
MAP = HEAD + "map cpu0 root=current current 0x1000 -> 0x5 P|W|U|A|D level=1 upper=W|U|A " \
             "pool=0x8\n"


def features(text: str) -> list[F.Feature]:
    fb = F.StateFeedback()
    out = run(parse_program(text), observe=fb)
    assert out.divergence is None, out.divergence
    return fb.features


def family(feats: list[F.Feature], fam: int) -> list[F.Feature]:
    return [f for f in feats if f[0] == fam]


def test_the_kvm_path_names_the_counters_that_moved() -> None:
    feats = features(MAP + "read cpu0 0x1000+0x0 width=8 cpl=0\n"
                     "pte cpu0 table=0xa index=0x2 -> 0x6 P|W|A width=8\n")
    pte_write = STAT_NAMES.index("mmu_pte_write")
    cache_miss = STAT_NAMES.index("mmu_cache_miss")
    stats = {f[2] for f in family(feats, F.STAT)}
    assert {pte_write, cache_miss} <= stats
    paths = family(feats, F.PATH)
    assert any(p[3] >> pte_write & 1 for p in paths)  # the PT write's own path
    # A new shadow page is a consequence, not a decision: a STAT feature, not part of a path.
    assert not any(p[3] >> cache_miss & 1 for p in paths)
    assert len(family(feats, F.EDGE)) == len(paths)  # one edge per op


def test_a_misaligned_write_to_a_shadowed_table_is_a_path_of_its_own() -> None:
    # kvm_mmu_track_write() zaps a page written misaligned (detect_write_misaligned()): a
    # decision of the emulated write, so it is part of the path, not only a STAT feature.
    feats = features(MAP + "read cpu0 0x1000+0x0 width=8 cpl=0\n"
                     "store cpu0 frame=0xa offset=0xc width=8 -> 0x6 P|W|A\n")
    flooded = STAT_NAMES.index("mmu_flooded")
    assert any(p[3] >> flooded & 1 for p in family(feats, F.PATH))


def test_a_table_shared_by_two_parents() -> None:
    feats = features(MAP + "pte cpu0 table=0x9 index=0x1 -> 0xa P|W|U|A width=8\n"
                     "read cpu0 0x1000+0x0 width=8 cpl=0\n"
                     "read cpu0 0x201000+0x0 width=8 cpl=0\n")
    shared = family(feats, F.SHARED)
    assert (F.SHARED, 1, False, 1) in shared  # a level-1 page, two parents, the same rights
    assert any(p[1] == 1 and p[7] == F.bucket(2) for p in family(feats, F.PAGE))


def test_a_page_names_the_guest_context_it_was_built_for() -> None:
    # The role bits of the guest's control registers (kvm_calc_cpu_role()) are part of a
    # page's feature: the same table shadowed with CR0.WP clear, then with SMAP on as well,
    # is a page of another context each time.
    from fuzzmmu.model.mmu.role import CR0_WP, LONG_MODE, SMAP_ANDNOT_WP

    def contexts(sets: str) -> set[int]:
        text = HEAD + sets + MAP[len(HEAD):] + "read cpu0 0x1000+0x0 width=8 cpl=0\n"
        return {p[-1] for p in family(features(text), F.PAGE) if p[1] == 1 and not p[2]}

    assert contexts("") == {LONG_MODE | CR0_WP}
    assert contexts("set cpu0 wp=0\n") == {LONG_MODE}
    assert contexts("set cpu0 wp=0\nset cpu0 smap=1\n") == {LONG_MODE | SMAP_ANDNOT_WP}


def test_a_gfn_shadowed_under_two_roles() -> None:
    base = MAP + "pte cpu0 table=0x9 index=0x1 -> 0xa P|U|A width=8\n" \
                 "read cpu0 0x1000+0x0 width=8 cpl=0\n"
    def level1_indirect_roles(feats: list[F.Feature]) -> int:
        return max(g[5] for g in family(feats, F.GFN) if g[2] == 1 << 1 and g[3] == 1)

    assert level1_indirect_roles(features(base)) == 1
    # PT 0xa, read-only through PD entry 1: a second role for the same gfn
    assert level1_indirect_roles(features(base + "read cpu0 0x201000+0x0 width=8 cpl=0\n")) == 2


def test_a_gfn_write_tracked_in_one_address_space_mapped_in_the_other() -> None:
    feats = features(MAP + "read cpu0 0x1000+0x0 width=8 cpl=0\n"
                     "smi cpu0\n"
                     "read cpu0 0x8000+0x0 width=8 cpl=0\n")  # the PDPT, by its gpa in SMM
    tracked = family(feats, F.TRACKED)
    # gfn 8 is write-tracked in address space 0 and mapped, read-only, in address space 1
    assert (F.TRACKED, 0b01, 1, 1, 0) in tracked


def test_the_mmio_cache() -> None:
    feats = features(HEAD + "map cpu0 root=current current 0x201000 -> 0x31 P|W|A|D level=1 "
                            "upper=W|A pool=0x10\n"
                            "read cpu0 0x201000+0x0 width=8 cpl=0\n")
    assert (F.MMIO_CACHE, 0, True, True, True) in family(feats, F.MMIO_CACHE)


def test_features_are_the_same_on_every_run() -> None:
    program = read_program(Path("corpus/smm.txt"))
    a, b = F.StateFeedback(), F.StateFeedback()
    run(program, observe=a)
    run(program, observe=b)
    assert a.features == b.features and len(a.features) > 20
    assert {f[0] for f in a.features} >= {F.PATH, F.STAT, F.EDGE, F.GFN, F.PAGE, F.ROOT}


class _Hooks:
    def __init__(self) -> None:
        self.next = 100
        self.hits: list[int] = []

    def _reserve_counter(self) -> int:
        self.next += 1
        return self.next - 1

    def _trace_branch(self, index: int) -> None:
        self.hits.append(index)


def test_features_fold_onto_the_reserved_counters_through_the_current_hook() -> None:
    hooks = _Hooks()
    counters = F.CounterMap(hooks, size=8)
    assert counters.counters == list(range(100, 108))
    later: list[int] = []
    hooks._trace_branch = later.append  # type: ignore[method-assign]  # Atheris swaps its hooks
    counters.report([(1, 2), (1, 2), (3,)])
    # A feature repeated in one program hits its counter once: libFuzzer would take the
    # second hit for a new hit-count bucket, and a repeat for something new.
    assert hooks.hits == [] and len(later) == 2 and later[0] == hash((1, 2)) % 8 + 100
    assert all(100 <= i < 108 for i in later)
    counters.report([(1, 2)])  # the next program hits it again
    assert later[-1] == later[0]
    with pytest.raises(ValueError):
        F.CounterMap(hooks, size=6)


def test_feedback_setting() -> None:
    assert settings_from_environment({}).feedback is Feedback.LINES
    for value in ("lines", "state", "both"):
        assert settings_from_environment({"FUZZMMU_FEEDBACK": value}).feedback.value == value
    with pytest.raises(SettingsError, match="FUZZMMU_FEEDBACK"):
        settings_from_environment({"FUZZMMU_FEEDBACK": "edges"})


def test_the_harness_reports_state_features_to_libfuzzer(tmp_path: Path) -> None:
    """With state feedback only, the model runs uninstrumented and libFuzzer still sees
    coverage: the features."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "seed").write_bytes(Path("corpus/4level-basic").read_bytes())
    out = subprocess.run([sys.executable, "harnesses/shadow_mmu_fuzzer.py", str(corpus),
                          "-runs=300", "-seed=1", "-max_len=516"], capture_output=True,
                         text=True, timeout=120, env={"FUZZMMU_FEEDBACK": "state",
                                                      "PATH": "/usr/bin:/bin"})
    done = [line for line in out.stderr.splitlines() if "DONE" in line]
    assert done, out.stderr[-2000:]
    cov = int(done[-1].split("cov: ")[1].split()[0])
    assert cov > 50, done[-1]


def test_the_census_counts_counters_per_family_and_reads_back_the_largest(
        tmp_path: Path) -> None:
    counters = F.CounterMap(_Hooks(), size=1 << 12, census=tmp_path)
    counters.report([(F.PATH, 1), (F.PATH, 1), (F.PATH, 2), (F.GFN, 7)])
    fams = counters.families()
    assert fams["path"] == 2 and fams["gfn"] == 1 and fams["edge"] == 0
    assert list(tmp_path.glob("features-*.json"))  # the first report writes it
    (tmp_path / "features-1.json").write_text('{"path": 5, "gfn": 0}')
    (tmp_path / "features-2.json").write_text("{not json")
    (tmp_path / "features-3.json").write_text("[1, 2]")
    census = F.read_census(tmp_path)
    assert census["path"] == 5 and census["gfn"] == 1
    assert F.read_census(tmp_path / "missing") == {}
