"""Program files: the text form (``*.txt``, starting with ``# fuzzmmu program``) or the binary
form (whatever bytes; every byte string is a program). A file is data: it is parsed, never
evaluated."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fuzzmmu.program.codec import decode, encode
from fuzzmmu.program.ops import Program
from fuzzmmu.program.text import FORMAT_LINE, ProgramSyntaxError, format_program, parse_program


class ProgramFileError(ValueError):
    """A program file that cannot be used, with the reason."""


_BOM: Final = "\ufeff".encode()


def looks_like_text(data: bytes) -> bool:
    """A file that opens with the format line is text, whatever follows (an editor's byte-order
    mark aside); otherwise printable UTF-8 is taken for text (a binary program almost never is).
    """
    if data.removeprefix(_BOM).startswith(FORMAT_LINE.encode()):
        return True
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(text.strip()) and all(c.isprintable() or c in "\n\r\t" for c in text)


def program_from_bytes(data: bytes, name: str = "<input>") -> Program:
    if looks_like_text(data):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ProgramFileError(f"{name}: not UTF-8 text (byte {exc.start})") from None
        try:
            return parse_program(text)
        except ProgramSyntaxError as exc:
            raise ProgramFileError(f"{name}: {exc}") from exc
    return decode(data)


def read_program(path: str | Path) -> Program:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ProgramFileError(f"cannot read {p}: {exc.strerror}") from exc
    return program_from_bytes(data, str(p))


def write_program(path: str | Path, program: Program) -> None:
    """Write the binary form to ``path`` and the text form beside it (``path`` + ``.txt``)
    unless ``path`` itself ends in ``.txt``."""
    p = Path(path)
    if p.suffix == ".txt":
        p.write_text(format_program(program))
        return
    p.write_bytes(encode(program))
    p.with_name(p.name + ".txt").write_text(format_program(program))


__all__ = ["FORMAT_LINE", "ProgramFileError", "program_from_bytes", "read_program",
           "write_program"]
