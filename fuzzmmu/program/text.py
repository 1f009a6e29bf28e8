"""The text form of programs: one op per line, round-tripping exactly with Program.

    config policy=zap mmio-gen-bits=19 maxphyaddr=40 mmu-pages=2000 boot=4level
    map cpu0 root=current current 0x1000 -> 0x5 P|W|U|A|D level=1 upper=W|U|A pool=0x8
    read cpu0 0x1000+0x8 width=8 cpl=3
    interleave at=faultin
      read cpu0 0x1000+0x0 width=8 cpl=0
      zap-all

``#`` starts a comment. Numbers are hex or decimal; addresses, slots, frames and offsets must
be among the world's (fuzzmmu.program.world), so every text program has a binary form.

A line is the op's name, then its fields in schema order (fuzzmmu.program.ops): positional
words in that order, ``key=value`` settings anywhere; a field that the op's other fields force
to one value (a load's seed) is left out.
"""

from __future__ import annotations

from typing import Any, Final

from fuzzmmu.program.codec import MAX_OPS
from fuzzmmu.program.ops import MAX_SECOND, SIMPLE_OPS, Header, Interleave, Op, Program
from fuzzmmu.program.schema import (
    Address,
    FieldError,
    FlagWord,
    Key,
    Layout,
    Name,
    Plus,
    SwitchName,
    SwitchValue,
    Table,
    Word,
    layout,
    to_int,
)

FORMAT_LINE: Final = "# fuzzmmu program v1"


class ProgramSyntaxError(ValueError):
    def __init__(self, line: int, message: str) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}")


def _key(lay: Layout, i: int) -> str:
    """Field ``i``'s key on a line (its name if it is not a key: for error messages)."""
    syntax = lay.fields[i].syntax
    if not isinstance(syntax, Key):
        return lay.fields[i].name
    return syntax.name or lay.fields[i].name.replace("_", "-")


def _op_name(op: Op) -> str:
    """An op's name on a line: its KIND, or the value of its Name field (an access's kind)."""
    for f in layout(type(op)).fields:
        if isinstance(f.syntax, Name):
            return f.domain.format(getattr(op, f.name))
    return op.KIND


def _op_names() -> dict[str, type[Op]]:
    out: dict[str, type[Op]] = {}
    for kind in SIMPLE_OPS:
        named = [f.domain for f in layout(kind).fields if isinstance(f.syntax, Name)]
        for domain in named:
            out |= {domain.format(domain.value(d)): kind for d in range(domain.radix)}
        if not named:
            out[kind.KIND] = kind
    return out


_BY_NAME: Final = _op_names()


# ---------------------------------------------------------------------- formatting


def _format_fields(lay: Layout, obj: object) -> list[str]:
    words: list[str] = []
    for i, f in enumerate(lay.fields):
        value = getattr(obj, f.name)
        syntax, domain = f.syntax, f.domain
        if f.fix is not None and len(lay.choices(i, obj)) == 1:
            continue  # forced to this value by the field it depends on (a load's seed)
        if isinstance(syntax, Word | Address):
            words.append(domain.format(value))
        elif isinstance(syntax, Plus):
            words[-1] += f"+{domain.format(value)}"
        elif isinstance(syntax, Key):
            words.append(f"{_key(lay, i)}={domain.format(value)}")
        elif isinstance(syntax, FlagWord):
            words += [syntax.word] if value else []
        elif isinstance(syntax, SwitchValue):
            named = lay.fields[i - 1]
            words.append(f"{named.domain.format(getattr(obj, named.name))}="
                         f"{domain.format(value)}")
    return words


def format_op(op: Op) -> str:
    words = [_op_name(op), *_format_fields(layout(type(op)), op)]
    if isinstance(op, Interleave):
        return "\n  ".join([" ".join(words), format_op(op.first),
                            *(format_op(o) for o in op.second)])
    return " ".join(words)


def format_header(h: Header) -> str:
    return " ".join(["config", *_format_fields(layout(Header), h)])


def format_program(p: Program) -> str:
    return "\n".join([FORMAT_LINE, format_header(p.header)] + [format_op(op) for op in p.ops]
                     ) + "\n"


# ---------------------------------------------------------------------- parsing


class _Line:
    """The tokens of one line: positional words and key=value settings."""

    def __init__(self, number: int, text: str) -> None:
        self.number = number
        self.words: list[str] = []
        self.keys: dict[str, str] = {}
        for tok in text.split():
            key, eq, value = tok.partition("=")
            if eq:
                if key in self.keys:
                    raise ProgramSyntaxError(number, f"{key} given twice")
                self.keys[key] = value
            else:
                self.words.append(tok)
        if not self.words:
            raise ProgramSyntaxError(number, "a line must start with an operation name")

    def fail(self, message: str) -> ProgramSyntaxError:
        return ProgramSyntaxError(self.number, message)

    def done(self, used_words: int) -> None:
        if self.keys:
            raise self.fail(f"unknown setting {next(iter(self.keys))}=")
        if len(self.words) > used_words:
            raise self.fail(f"unexpected {self.words[used_words]!r}")


_MISSING: Final[Any] = object()


def _parse_fields(ln: _Line, lay: Layout, defaults: object | None = None) -> list[Any]:
    """The values of ``lay``'s fields on the line (its nested ops are lines of their own);
    ``defaults``: the values of keys left out (the config line), else each Key's default."""
    try:
        args, used = _read_fields(ln, lay, defaults)
        _check_fixed(lay, args)
    except FieldError as exc:
        raise ln.fail(str(exc)) from None
    ln.done(used)
    return args


def _read_fields(ln: _Line, lay: Layout, defaults: object | None) -> tuple[list[Any], int]:
    """The fields' values as spelled, and how many words they took."""
    args: list[Any] = []
    i = 1  # the next positional word
    plus: str | None = None  # an address word's "+offset", for the field after it
    switch = ""  # the key that named a SwitchName field, for the SwitchValue after it
    for f in lay.fields:
        syntax, domain = f.syntax, f.domain
        # A fixed field's value is checked beside its dependency's afterwards.
        parse = domain.read if isinstance(domain, Table) and f.fix else domain.parse
        value: Any = _MISSING
        if isinstance(syntax, Name):
            value = parse(ln.words[0], domain.what)
        elif isinstance(syntax, Word):
            value, i = domain.parse_words(ln.words, i)
        elif isinstance(syntax, Address):
            if i >= len(ln.words):
                raise FieldError(f"missing {domain.what}")
            text, sep, off = ln.words[i].partition("+")
            value, plus, i = parse(text, domain.what), off if sep else None, i + 1
        elif isinstance(syntax, Plus):
            value = 0 if plus is None else parse(plus, f.name)
            plus = None
        elif isinstance(syntax, Key):
            key = _key(lay, len(args))
            if key in ln.keys:
                value = parse(ln.keys.pop(key), key)
            elif defaults is not None:
                value = getattr(defaults, f.name)
            elif not syntax.required:
                value = syntax.default
            elif f.fix is None:
                raise FieldError(f"missing {key}=")
        elif isinstance(syntax, FlagWord):
            value = i < len(ln.words) and ln.words[i] == syntax.word
            i += 1 if value else 0
        elif isinstance(syntax, SwitchName):
            if len(ln.keys) != 1:
                raise FieldError(f"{ln.words[0]} takes one {f.name}=0|1")
            switch = next(iter(ln.keys))
            value = parse(switch, domain.what)
        elif isinstance(syntax, SwitchValue):
            value = parse(ln.keys.pop(switch), switch)
        args.append(value)
    if plus is not None and to_int(plus, "offset") != 0:
        raise FieldError(f"{ln.words[0]} takes a page address")
    return args, i


def _check_fixed(lay: Layout, args: list[Any]) -> None:
    """A field that depends on another takes only the values decoding gives it beside that
    one; left out, it takes the one value it is forced to, if it is."""
    for i, _, j in lay.fixes:
        f = lay.fields[i]
        assert f.fix is not None and isinstance(f.domain, Table)
        choices = lay.fixed[i][args[j]]
        if args[i] is _MISSING:
            if len(choices) != 1:
                raise FieldError(f"missing {_key(lay, i)}=")
            args[i] = next(iter(choices))
        elif args[i] not in choices:
            # A value the field takes beside another value of its dependency: say why not
            # here; else it is no value of the field at all.
            takes = {v for c in lay.fixed[i].values() if len(c) > 1 for v in c}
            if args[i] not in takes:
                raise f.domain.outside(args[i], _key(lay, i))
            if f.fix.why is None:
                raise FieldError(f"{f.domain.what} {args[i]:#x} is not one of the world's")
            raise FieldError(f.fix.why.format(**{
                g.name: g.domain.format(a) for g, a in zip(lay.fields, args, strict=True)}))


def _parse_op(ln: _Line) -> Op:
    kind = _BY_NAME.get(ln.words[0])
    if kind is None:
        raise ln.fail(f"unknown operation {ln.words[0]!r}")
    lay = layout(kind)
    op: Op = lay.make(*_parse_fields(ln, lay))
    return op


def parse_program(text: str) -> Program:
    """Parse the text form; raises ProgramSyntaxError with the line number."""
    header = Header()
    ops: list[Op] = []
    lines = [(n, raw.split("#", 1)[0].rstrip()) for n, raw in enumerate(text.splitlines(), 1)]
    lines = [(n, t) for n, t in lines if t.strip()]
    i = 0
    records = 0
    while i < len(lines):
        n, t = lines[i]
        if t[0].isspace():
            raise ProgramSyntaxError(n, "an indented line must follow an interleave")
        ln = _Line(n, t)
        if ln.words[0] == "config":
            if ops:
                raise ln.fail("config must come before the operations")
            header = Header(*_parse_fields(ln, layout(Header), Header()))
            i += 1
            continue
        if ln.words[0] == "interleave":
            point = _parse_fields(ln, layout(Interleave))[0]
            parts = []
            j = i + 1
            while j < len(lines) and lines[j][1][0].isspace():
                inner = _Line(lines[j][0], lines[j][1])
                if inner.words[0] == "interleave":
                    raise inner.fail("an interleave cannot contain an interleave")
                parts.append(_parse_op(inner))
                j += 1
            if not 2 <= len(parts) <= 1 + MAX_SECOND:
                raise ln.fail(f"interleave needs its op and 1 to {MAX_SECOND} indented ops "
                              "to run at its point")
            ops.append(Interleave(point, parts[0], tuple(parts[1:])))
            records += 1 + len(parts)
            i = j
            continue
        ops.append(_parse_op(ln))
        records += 1
        i += 1
    if records > MAX_OPS:
        raise ProgramSyntaxError(lines[-1][0], f"more than {MAX_OPS} op records")
    return Program(header, tuple(ops))
