"""Program files (fuzzmmu.program.files): text or binary form told apart, unusable files are
ProgramFileError, write_program writes both forms, and a file is parsed, never evaluated."""

from __future__ import annotations

import builtins
import os
import random
import subprocess
from pathlib import Path

import pytest

from fuzzmmu.program.codec import decode, encode
from fuzzmmu.program.files import (
    ProgramFileError,
    looks_like_text,
    program_from_bytes,
    read_program,
    write_program,
)
from fuzzmmu.program.generate import random_program
from fuzzmmu.program.ops import Program
from fuzzmmu.program.text import FORMAT_LINE, format_program, parse_program

PROGRAM = random_program(random.Random(7), 25)


def some_programs(n: int = 40) -> list[Program]:
    return [random_program(random.Random(seed), 30) for seed in range(n)]


# ---------------------------------------------------------------------- text or binary


def test_text_form_is_text_and_binary_form_is_binary() -> None:
    for p in some_programs():
        assert looks_like_text(format_program(p).encode())
        assert not looks_like_text(encode(p))


@pytest.mark.parametrize(("data", "text"), [
    (b"", False),
    (b"\n \t\r\n", False),  # nothing but whitespace is no program text
    (b"zap-all\n", True),
    (b"zap-all\r\nsmi cpu0\r\n", True),
    (b"zap-all\0\n", False),
    (b"\xff\xfe\x00\x01", False),
    ("# fuzzmmu program v1\nsmi cpu0 # comment: é\n".encode(), True),
])
def test_looks_like_text(data: bytes, text: bool) -> None:
    assert looks_like_text(data) is text


def test_program_from_bytes_takes_either_form() -> None:
    for p in some_programs(20):
        assert program_from_bytes(format_program(p).encode()) == p
        assert program_from_bytes(encode(p)) == p
    junk = bytes(random.Random(3).randrange(256) for _ in range(300)) + b"\0"
    assert program_from_bytes(junk) == decode(junk)
    assert program_from_bytes(b"") == decode(b"")


def test_bad_text_is_a_file_error_with_name_and_line() -> None:
    with pytest.raises(ProgramFileError) as info:
        program_from_bytes(b"# fuzzmmu program v1\nsmi cpu0\nfrobnicate\n", "prog.txt")
    assert str(info.value) == "prog.txt: line 3: unknown operation 'frobnicate'"



@pytest.mark.parametrize("data", [
    ("\ufeff" + FORMAT_LINE + "\nsmi cpu0\n").encode(),
    (FORMAT_LINE + "\nsmi cpu0\x1b[0m\n").encode(),
], ids=["bom", "escape"])
def test_file_with_format_line_is_never_taken_for_binary(data: bytes) -> None:
    try:
        p = program_from_bytes(data)
    except ProgramFileError:
        return
    assert p == parse_program(FORMAT_LINE + "\nsmi cpu0\n")


# ---------------------------------------------------------------------- reading and writing


def test_unreadable_file_is_a_file_error(tmp_path: Path) -> None:
    with pytest.raises(ProgramFileError, match=r"cannot read .*missing\.bin"):
        read_program(tmp_path / "missing.bin")
    with pytest.raises(ProgramFileError, match="cannot read"):
        read_program(tmp_path)  # a directory
    bad = tmp_path / "bad.txt"
    bad.write_text(FORMAT_LINE + "\nread cpu0 0x1234000\n")
    with pytest.raises(ProgramFileError, match=r"bad\.txt: line 2: address 0x1234000"):
        read_program(bad)


def test_write_program_writes_both_forms(tmp_path: Path) -> None:
    path = tmp_path / "crash-0001"
    write_program(path, PROGRAM)
    assert path.read_bytes() == encode(PROGRAM)
    side = tmp_path / "crash-0001.txt"
    assert side.read_text() == format_program(PROGRAM)
    assert read_program(path) == PROGRAM
    assert read_program(side) == PROGRAM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crash-0001", "crash-0001.txt"]


def test_write_program_to_a_txt_path_writes_only_text(tmp_path: Path) -> None:
    path = tmp_path / "repro.txt"
    write_program(path, PROGRAM)
    assert path.read_text() == format_program(PROGRAM)
    assert [p.name for p in tmp_path.iterdir()] == ["repro.txt"]
    assert read_program(path) == PROGRAM


def test_written_files_read_back_for_many_programs(tmp_path: Path) -> None:
    for i, p in enumerate(some_programs(30)):
        write_program(tmp_path / f"p{i}.bin", p)
        assert read_program(tmp_path / f"p{i}.bin") == p
        assert read_program(tmp_path / f"p{i}.bin.txt") == p


# ---------------------------------------------------------------------- data, not code

_PAYLOADS = [
    "__import__('os').system('touch {marker}')\n",
    FORMAT_LINE + "\n__import__('os').system('touch {marker}')\n",
    FORMAT_LINE + "\nimport os\nos.system('touch {marker}')\n",
    FORMAT_LINE + "\nexec(\"open('{marker}', 'w').close()\")\n",
    FORMAT_LINE + "\nsmi cpu0 seed=__import__('os').system('touch {marker}')\n",
]


@pytest.mark.parametrize("template", _PAYLOADS)
def test_python_code_in_a_file_is_parsed_never_evaluated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: str) -> None:
    marker = tmp_path / "evaluated"
    path = tmp_path / "evil.txt"
    path.write_text(template.format(marker=marker))
    ran: list[str] = []

    def forbid(name: str):
        def call(*args: object, **kwargs: object) -> None:
            ran.append(name)
            raise AssertionError(f"{name} called while reading a program file")
        return call

    with monkeypatch.context() as m:
        for name in ("eval", "exec"):
            m.setattr(builtins, name, forbid(name))
        m.setattr(os, "system", forbid("os.system"))
        m.setattr(subprocess, "Popen", forbid("subprocess.Popen"))
        with pytest.raises(ProgramFileError, match=r"evil\.txt: line \d+: "):
            read_program(path)
    assert ran == []
    assert not marker.exists()
