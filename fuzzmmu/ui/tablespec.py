"""A small text description of guest page tables and CPU state, for `fuzzmmu walk`.

Format, one item per line (``#`` starts a comment)::

    mode 4level          # off | 32bit | pae | 4level | 5level
    cr3 0x1000
    nxe                  # flags: wp (default on), nowp, nxe, smep, smap, pse, pke, ac, user,
                         #        implicit, set-ad
    access write         # read | write | fetch
    gva 0x401000
    maxphyaddr 40
    pkru 0x0
    0x1000 = 0x2007      # an entry: GPA = VALUE, of the mode's entry size (4 or 8 bytes)

Command-line flags add to or override what the file says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fuzzmmu.arch.bits import PAGE_SHIFT, PagingMode
from fuzzmmu.arch.walker import Access, CpuState, mode_from_label
from fuzzmmu.world.memory import GuestMemory

_FLAGS = {"wp", "nowp", "nxe", "smep", "smap", "pse", "pke", "ac", "user", "implicit", "set-ad"}
_VALUED = {"mode", "cr3", "gva", "access", "maxphyaddr", "pkru", "pages"}


class TableSpecError(ValueError):
    """A page-table description that cannot be used, with the line it comes from."""


@dataclass
class TableSpec:
    mode: PagingMode = PagingMode.LONG4
    cr3: int = 0
    gva: int = 0
    access: str = "read"
    flags: set[str] = field(default_factory=lambda: {"wp"})
    maxphyaddr: int = 40
    pkru: int = 0
    pages: int = 0
    entries: list[tuple[int, int]] = field(default_factory=list)

    def set(self, key: str, value: str | None, where: str) -> None:
        key = key.lower()
        if key in _FLAGS:
            if value is not None:
                raise TableSpecError(f"{where}: flag {key!r} takes no value")
            if key == "nowp":
                self.flags.discard("wp")
            else:
                self.flags.add(key)
            return
        if key not in _VALUED:
            known = ", ".join(sorted(_VALUED | _FLAGS))
            raise TableSpecError(f"{where}: unknown setting {key!r} (known: {known})")
        if value is None:
            raise TableSpecError(f"{where}: {key!r} needs a value")
        try:
            if key == "mode":
                self.mode = mode_from_label(value)
            elif key == "access":
                if value not in ("read", "write", "fetch"):
                    raise ValueError(f"access must be read, write or fetch, not {value!r}")
                self.access = value
            else:
                setattr(self, key, int(value, 0))
        except ValueError as exc:
            raise TableSpecError(f"{where}: {exc}") from exc

    def add_entry(self, text: str, where: str) -> None:
        gpa_s, _, value_s = text.partition("=")
        try:
            gpa, value = int(gpa_s.strip(), 0), int(value_s.strip(), 0)
        except ValueError as exc:
            raise TableSpecError(f"{where}: an entry is 'GPA = VALUE' with integers, got {text!r}"
                                 ) from exc
        if gpa < 0 or value < 0:
            raise TableSpecError(f"{where}: negative numbers are not addresses: {text!r}")
        self.entries.append((gpa, value))

    def parse_text(self, text: str, source: str) -> None:
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{source}:{n}"
            if "=" in line:
                self.add_entry(line, where)
                continue
            key, *rest = line.split(None, 1)
            self.set(key, rest[0].strip() if rest else None, where)

    def build(self) -> tuple[GuestMemory, CpuState, Access]:
        """Guest memory holding the entries, the CPU state (PDPTEs loaded for PAE), the access."""
        esize = self.mode.entry_size if self.mode is not PagingMode.OFF else 8
        top = max([gpa + esize for gpa, _ in self.entries] + [self.cr3 + 32, 1])
        pages = max(self.pages, (top + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT, 1)
        mem = GuestMemory(pages)
        for gpa, value in self.entries:
            if value >= 1 << (8 * esize):
                raise TableSpecError(f"entry {value:#x} at {gpa:#x} is wider than {esize} bytes")
            mem.write(gpa, esize, value)
        f = self.flags
        try:
            cpu = CpuState.build(self.mode, self.cr3, mem=mem, wp="wp" in f, nxe="nxe" in f,
                                 smep="smep" in f, smap="smap" in f, pse="pse" in f,
                                 pke="pke" in f, maxphyaddr=self.maxphyaddr,
                                 eflags_ac="ac" in f, pkru=self.pkru)
        except ValueError as exc:  # includes PdpteLoadError
            raise TableSpecError(str(exc)) from exc
        acc = Access(write=self.access == "write", fetch=self.access == "fetch",
                     user="user" in f, implicit="implicit" in f)
        return mem, cpu, acc
