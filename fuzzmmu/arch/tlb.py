"""Which stale translations the architecture lets a guest observe (SDM §4.10.2-4.10.4).

A processor may keep using any translation it made since the last invalidation that covers the
linear page: after the guest changes a paging-structure entry without INVLPG or a CR3 load, an
access may use the old translation or the new one. This module is that set: every translation
a successful walk produced since the page was last invalidated. The oracle accepts an outcome
of the model that matches the current walk or one of these.

What invalidates (SDM §4.10.4.1): INVLPG and a #PF for the page; MOV to CR3; MOV to CR4 that
toggles PGE or PAE or sets SMEP; MOV to CR0 that changes PG; SMI and RSM. A CR0.WP, SMAP, AC or
PKRU change does not: those are applied when a cached translation is used.
"""

from __future__ import annotations


class TlbEntry:
    """A cached translation: the guest-physical page, the rights accumulated over the walk,
    the leaf's D flag and protection key (SDM §4.10.2.2). Compared by value."""

    __slots__ = ("dirty", "gpa_page", "pkey", "rights")

    def __init__(self, gpa_page: int, rights: int, dirty: bool, pkey: int) -> None:
        self.gpa_page = gpa_page
        self.rights = rights
        self.dirty = dirty
        self.pkey = pkey

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TlbEntry):
            return NotImplemented
        return (self.gpa_page == other.gpa_page and self.rights == other.rights
                and self.dirty == other.dirty and self.pkey == other.pkey)

    def __hash__(self) -> int:
        return hash((self.gpa_page, self.rights, self.dirty, self.pkey))

    def __repr__(self) -> str:
        return (f"TlbEntry(gpa_page={self.gpa_page:#x}, rights={self.rights}, "
                f"dirty={self.dirty}, pkey={self.pkey})")


class Tlb:
    """Per linear page, the translations the processor may still hold."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[int, list[TlbEntry]] = {}

    def copy(self) -> Tlb:
        other = Tlb()
        other.entries = {page: list(es) for page, es in self.entries.items()}
        return other

    def cached(self, page: int) -> list[TlbEntry]:
        return self.entries.get(page, [])

    def fill(self, page: int, entry: TlbEntry) -> bool:
        """Cache ``entry``; whether it was not cached already."""
        es = self.entries.setdefault(page, [])
        if entry in es:
            return False
        es.append(entry)
        return True

    def discard(self, page: int, entry: TlbEntry) -> None:
        """Forget one translation (one that, as it turned out, was never made)."""
        es = self.entries.get(page)
        if es is not None and entry in es:
            es.remove(entry)

    def invalidate(self, page: int) -> None:
        """INVLPG, or a #PF, for one linear page."""
        self.entries.pop(page, None)

    def flush(self) -> None:
        self.entries.clear()
