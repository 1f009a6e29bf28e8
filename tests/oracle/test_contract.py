"""KVM's contract with the VMM (docs/x86-paging.md §12): a page table written through a host
alias is not compared; aliases that no table write goes through are."""

from __future__ import annotations

from pathlib import Path

from fuzzmmu.oracle.executor import run
from fuzzmmu.oracle.reference import OutsideContract, ReferenceMachine
from fuzzmmu.program.files import read_program
from fuzzmmu.world.memslots import MemslotChange, MemslotUpdate
from fuzzmmu.world.observe import DONE, AccessKind

HERE = Path(__file__).parent


def test_a_page_table_written_through_an_alias_ends_the_comparison() -> None:
    program = read_program(HERE / "outside" / "page-table-written-through-a-host-alias.txt")
    outcome = run(program, audit=True)
    assert outcome.divergence is None
    assert outcome.ops_run == 5 and "per gfn" in outcome.skipped
    assert "gfn 0x1e" in outcome.skipped and "gfn 0x3e" in outcome.skipped


def test_an_alias_without_a_table_write_through_it_is_compared_whole() -> None:
    program = read_program(HERE / "clean" /
                           "unsync-speculative-translation-across-a-new-memslot.txt")
    outcome = run(program, audit=True)
    assert outcome.divergence is None and not outcome.skipped
    assert outcome.ops_run == len(program.ops)


def _paging_off_store(ref: ReferenceMachine, gpa: int) -> None:
    """cpu0 has paging off: a store to ``gpa`` goes to gfn gpa >> 12 of address space 0."""
    expected = ref.expected(0, gpa, AccessKind.WRITE, width=4, value=7)
    ok, _ = ref.access(0, gpa, AccessKind.WRITE, expected, width=4, value=7)
    assert ok


def test_the_reference_raises_only_for_a_walked_table_behind_an_alias() -> None:
    ref = ReferenceMachine()
    create = MemslotUpdate(MemslotChange.CREATE, 0, 2, base_gfn=0x30, npages=1, hva=5)
    assert ref.set_memslot(create) is DONE
    _paging_off_store(ref, 0x30_000)  # host page 5, which no walk has read: fine
    ref.tables.add(5)  # as if a walk had read a paging-structure entry from gfn 5
    _paging_off_store(ref, 0x5_000)  # through the table's own gfn: KVM sees it
    try:
        _paging_off_store(ref, 0x30_008)
    except OutsideContract as exc:
        assert "gfn 0x30" in str(exc) and "gfn 0x5" in str(exc)
    else:
        raise AssertionError("a store to a table through an alias must leave the contract")
