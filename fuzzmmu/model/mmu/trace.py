"""Named MMU events, like KVM's mmutrace.h: what the model did, for `fuzzmmu replay --trace`."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from fuzzmmu.model.mmu.page import ShadowPage


class Event(NamedTuple):
    name: str
    sp: ShadowPage | None = None
    detail: str = ""

    def __str__(self) -> str:
        parts = [self.name]
        if self.sp is not None:
            parts.append(repr(self.sp))
        if self.detail:
            parts.append(self.detail)
        return " ".join(parts)
