"""The README's commands and CI stay in step."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", quick)


def test_ci_runs_the_readme_test_command() -> None:
    _, test_cmd = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci
    assert "set -euo pipefail" in ci


def test_readme_main_command_installs_and_runs() -> None:
    main_cmd, _ = readme_commands()
    assert main_cmd.startswith("python3 -m venv .venv && ")
    assert ".venv/bin/fuzzmmu " in main_cmd
