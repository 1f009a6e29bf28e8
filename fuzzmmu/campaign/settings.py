"""Campaign settings that reach the fuzz target through the environment (libFuzzer owns
argv)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fuzzmmu import native
from fuzzmmu.model.bugs import BugSet

ENV_BUGS = "FUZZMMU_BUGS"
ENV_CONFIG = "FUZZMMU_CONFIG"
ENV_AUDIT = "FUZZMMU_AUDIT"
ENV_BYTE_SHARE = "FUZZMMU_BYTE_SHARE"
ENV_FEEDBACK = "FUZZMMU_FEEDBACK"
ENV_CENSUS = "FUZZMMU_CENSUS"
ENV_TARGET = "FUZZMMU_TARGET"
ENV_SUPPRESS = "FUZZMMU_SUPPRESS"
ENV_SUPPRESSED_LOG = "FUZZMMU_SUPPRESSED_LOG"

# What the inputs run on against the reference: the model of KVM's shadow MMU, or this
# machine's real KVM through /dev/kvm (fuzzmmu.kvm).
TARGETS = ("model", "kvm")


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
    target: str = "model"  # one of TARGETS
    # Divergence signatures to record and go on from (known findings): not raised.
    suppress: tuple[str, ...] = ()
    suppressed_log: Path | None = None  # where each suppressed divergence's signature goes
    native: bool = False  # the compiled model (fuzzmmu.native): only where no line is watched

    def environment(self) -> dict[str, str]:
        """The settings as the target reads them, but for ``suppress``: the target reads the
        signatures from a file (``FUZZMMU_SUPPRESS``), which the caller names."""
        env = {ENV_BUGS: ",".join(self.bugs), ENV_AUDIT: "1" if self.audit else "0",
               ENV_BYTE_SHARE: str(self.byte_share), ENV_FEEDBACK: self.feedback.value,
               ENV_TARGET: self.target, native.ENV_NATIVE: "1" if self.native else "0"}
        if self.census is not None:
            env[ENV_CENSUS] = str(self.census)
        if self.suppressed_log is not None:
            env[ENV_SUPPRESSED_LOG] = str(self.suppressed_log)
        return env


def read_suppressions(path: Path) -> tuple[str, ...]:
    """The signatures of a suppression file: one a line; a line starting with ``#`` is a
    comment (only a whole line: signatures hold ``#``, as in ``#PF(U)``)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = (exc.strerror or str(exc)) if isinstance(exc, OSError) else "not a text file"
        raise SettingsError(f"suppression file {path}: {why}") from exc
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def target_problem(target: str, bugs: tuple[str, ...], audit: bool,
                   feedback: Feedback) -> str | None:
    """Why these settings cannot go together, or None: real KVM runs its own code, so it has
    no mutants, no model internals to audit, and no model state to give as feedback."""
    if target not in TARGETS:
        return f"the target must be one of {', '.join(TARGETS)}, not {target!r}"
    if target != "kvm":
        return None
    if bugs:
        return "mutants are for the model: real KVM runs its own code"
    if audit:
        return "the audit checks the model's internals: real KVM has none to check"
    if feedback.state:
        return ("state feedback is the model's state, and the model does not run on real KVM's "
                "inputs (use line feedback)")
    return None


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
    audit = env.get(ENV_AUDIT, "0") not in ("", "0")
    target = env.get(ENV_TARGET, "model")
    problem = target_problem(target, tuple(bugs), audit, feedback)
    if problem is not None:
        raise SettingsError(f"{ENV_TARGET}={target}: {problem}")
    compiled = env.get(native.ENV_NATIVE, "0") == "1"
    if compiled and feedback.lines:
        # Atheris instruments Python bytecode: the compiled model has no lines to watch.
        raise SettingsError(f"{native.ENV_NATIVE}=1 (the compiled model) has no lines for "
                            f"line feedback: use {ENV_FEEDBACK}=state, or {native.ENV_NATIVE}=0")
    suppress = env.get(ENV_SUPPRESS)
    log = env.get(ENV_SUPPRESSED_LOG)
    return TargetSettings(tuple(bugs), audit, share, feedback, Path(census) if census else None,
                          target, read_suppressions(Path(suppress)) if suppress else (),
                          Path(log) if log else None, compiled)
