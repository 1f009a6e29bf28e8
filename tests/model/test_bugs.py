"""The mutant switches are typed: the model reads them as declared attributes of BugSet, so a
misspelt switch is a type error, not an AttributeError that the executor would report as a
model crash (a false finding)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mypy import api

from fuzzmmu.model.bugs import CATALOG, BugSet, UnknownBugError, bugset


def test_every_available_mutant_has_a_declared_switch() -> None:
    declared = {n for n, t in BugSet.__annotations__.items() if t == "bool"}
    assert declared == {b.attr for b in CATALOG if b.available}


def test_a_misspelt_switch_is_a_type_error(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from fuzzmmu.model.bugs import BugSet\n\n\n"
                     "def f(bugs: BugSet) -> bool:\n"
                     "    return (bugs.pte_write_no_misaligned_check\n"
                     "            or bugs.pte_write_no_misalign)\n")
    out, _, status = api.run([str(probe), "--no-incremental", "--cache-dir", str(tmp_path / "c")])
    assert status == 1
    assert 'has no attribute "pte_write_no_misalign"' in out
    assert "Found 1 error" in out  # the real switch type-checks


def test_bugset_shares_one_checked_set_per_choice() -> None:
    chosen = bugset(["wp-all-address-spaces"])
    assert chosen is bugset(("wp-all-address-spaces",))  # one per choice, made once
    assert chosen.wp_one_address_space and not chosen.nonpae_pde_single_spte
    assert bugset().ids == () and not bugset().wp_one_address_space
    with pytest.raises(UnknownBugError, match="unknown bug id 'no-such-bug'"):
        bugset(["no-such-bug"])
