"""Campaign settings that reach the fuzz target through the environment (libFuzzer owns
argv)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fuzzmmu.model.bugs import BugSet

ENV_BUGS = "FUZZMMU_BUGS"
ENV_CONFIG = "FUZZMMU_CONFIG"
ENV_AUDIT = "FUZZMMU_AUDIT"
ENV_BYTE_SHARE = "FUZZMMU_BYTE_SHARE"
ENV_FEEDBACK = "FUZZMMU_FEEDBACK"
ENV_CENSUS = "FUZZMMU_CENSUS"


class Feedback(enum.Enum):
    """What libFuzzer's coverage counters see: the lines of the model and the reference walker
    (Atheris's instrumentation), the model's state features (fuzzmmu.campaign.feedback; the
    code runs uninstrumented, about twice as fast), or both."""

    LINES = "lines"
    STATE = "state"
    BOTH = "both"

    @property
    def lines(self) -> bool:
        return self is not Feedback.STATE

    @property
    def state(self) -> bool:
        return self is not Feedback.LINES


class SettingsError(ValueError):
    """Settings the target cannot run with."""


@dataclass(frozen=True)
class TargetSettings:
    bugs: tuple[str, ...] = ()
    audit: bool = False
    byte_share: float = 0.2
    feedback: Feedback = Feedback.LINES
    census: Path | None = None  # where the target writes its state-feature counts

    def environment(self) -> dict[str, str]:
        env = {ENV_BUGS: ",".join(self.bugs), ENV_AUDIT: "1" if self.audit else "0",
               ENV_BYTE_SHARE: str(self.byte_share), ENV_FEEDBACK: self.feedback.value}
        if self.census is not None:
            env[ENV_CENSUS] = str(self.census)
        return env


def settings_from_environment(env: Mapping[str, str]) -> TargetSettings:
    """Read the target's settings; an unknown bug id or a bad value is a clear error."""
    bugs = [b for b in env.get(ENV_BUGS, "").split(",") if b.strip()]
    config = env.get(ENV_CONFIG)
    if config:
        try:
            text = Path(config).read_text()
        except OSError as exc:
            raise SettingsError(f"{ENV_CONFIG}={config}: {exc.strerror}") from exc
        bugs += [line.split("#", 1)[0].strip() for line in text.splitlines()]
        bugs = [b for b in bugs if b]
    bugs = [b.strip() for b in bugs]
    BugSet(bugs)  # raises UnknownBugError, listing the known ids
    try:
        share = float(env.get(ENV_BYTE_SHARE, "0.2"))
    except ValueError as exc:
        raise SettingsError(f"{ENV_BYTE_SHARE} must be a number between 0 and 1") from exc
    if not 0.0 <= share <= 1.0:
        raise SettingsError(f"{ENV_BYTE_SHARE} must be between 0 and 1, not {share}")
    try:
        feedback = Feedback(env.get(ENV_FEEDBACK, Feedback.LINES.value))
    except ValueError as exc:
        raise SettingsError(f"{ENV_FEEDBACK} must be one of "
                            f"{', '.join(f.value for f in Feedback)}") from exc
    census = env.get(ENV_CENSUS)
    return TargetSettings(tuple(bugs), env.get(ENV_AUDIT, "0") not in ("", "0"), share, feedback,
                          Path(census) if census else None)
