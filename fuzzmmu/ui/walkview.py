"""Readable rendering of a reference walk: each entry, the rights accumulated, the verdict."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from fuzzmmu.arch.bits import PagingMode, acc_str, pferr_str, pte_flags_str
from fuzzmmu.arch.walker import Access, CpuState, Memory, WalkResult, WalkStep, walk_trace

LEVEL_NAMES: dict[PagingMode, dict[int, str]] = {
    PagingMode.OFF: {0: "-"},
    PagingMode.BIT32: {2: "PDE", 1: "PTE"},
    PagingMode.PAE: {3: "PDPTE", 2: "PDE", 1: "PTE"},
    PagingMode.LONG4: {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"},
    PagingMode.LONG5: {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"},
}
PAGE_SIZE_NAMES = {0: "identity", 1: "4 KiB", 2: "2 MiB", 3: "1 GiB"}


def access_str(acc: Access) -> str:
    kind = "write" if acc.write else "fetch" if acc.fetch else "read"
    who = "implicit supervisor" if acc.implicit else "user" if acc.user else "supervisor"
    return f"{who} {kind}"


def page_size_name(mode: PagingMode, level: int) -> str:
    if mode is PagingMode.BIT32 and level == 2:
        return "4 MiB"
    return PAGE_SIZE_NAMES.get(level, f"level {level}")


def verdict_str(cpu: CpuState, res: WalkResult) -> str:
    if res.ok:
        return (f"ok: gpa {res.gpa:#x} ({page_size_name(cpu.mode, res.level)} page, "
                f"rights {acc_str(res.rights)})")
    return f"#PF error code {res.error_code:#x} = {pferr_str(res.error_code)}"


def steps_table(cpu: CpuState, steps: list[WalkStep], title: str = "reference walk") -> Table:
    names = LEVEL_NAMES[cpu.mode]
    esize = cpu.mode.entry_size if cpu.mode is not PagingMode.OFF else 8
    table = Table(title=title, title_justify="left")
    for col in ("level", "entry at", "value", "flags", "rights so far", "note"):
        table.add_column(col)
    for st in steps:
        at = "register" if st.entry_gpa is None else f"{st.entry_gpa:#x}"
        table.add_row(names.get(st.level, str(st.level)), at, f"{st.value:#0{2 + 2 * esize}x}",
                      pte_flags_str(st.value, entry_size=esize), acc_str(st.rights), st.note)
    return table


def show_walk(console: Console, mem: Memory, cpu: CpuState, gva: int, acc: Access,
              *, set_ad: bool = False) -> WalkResult:
    """Print the walk of ``gva`` and return its result."""
    console.print(f"[bold]{cpu.mode.label}[/] paging  CR0={cpu.cr0:#x} CR3={cpu.cr3:#x} "
                  f"CR4={cpu.cr4:#x} EFER={cpu.efer:#x}  MAXPHYADDR={cpu.maxphyaddr}")
    console.print(f"gva {gva:#x}, {access_str(acc)}")
    res, steps = walk_trace(mem, cpu, gva, acc, set_ad=set_ad)
    console.print(steps_table(cpu, steps))
    style = "green" if res.ok else "red"
    console.print(f"[{style}]{verdict_str(cpu, res)}[/]")
    if set_ad:
        esize = cpu.mode.entry_size
        for st in steps:
            if st.entry_gpa is None or st.level == 0:
                continue
            now = mem.read(st.entry_gpa, esize)
            if now != st.value:
                console.print(f"  A/D: entry at {st.entry_gpa:#x} {st.value:#x} -> {now:#x}")
    return res


def walk_json(cpu: CpuState, gva: int, acc: Access, res: WalkResult, steps: list[WalkStep]
              ) -> dict[str, Any]:
    return {
        "mode": cpu.mode.label,
        "gva": gva,
        "access": access_str(acc),
        "ok": res.ok,
        "gpa": res.gpa,
        "level": res.level,
        "error_code": res.error_code,
        "error_bits": pferr_str(res.error_code) if not res.ok else None,
        "rights": acc_str(res.rights) if res.ok else None,
        "steps": [{"level": s.level, "entry_gpa": s.entry_gpa, "value": s.value,
                   "rights": acc_str(s.rights), "note": s.note} for s in steps],
    }
