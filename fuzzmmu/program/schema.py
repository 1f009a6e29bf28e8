"""The op schema: what each field of an op (or of the header) is, declared once beside the
field in fuzzmmu.program.ops, so that the binary form, its mixed-radix digits, the text form
and the Hypothesis strategies are derived from it instead of spelled out per op.

A field is declared ``name: Annotated[type, domain, syntax]`` with an optional ``Fix``:

- the *domain* is the finite set of values the field takes in the world, indexed: a record
  spends one mixed-radix digit of ``domain.radix`` on it (``value`` and ``digits`` convert),
  and the text form spells each value (``format``, ``parse``);
- the *syntax* says where the value goes on a text line (a positional word, ``key=value``, ...);
- a ``Fix`` makes the field depend on another (an access's offset is clamped into the page
  by its width): decoding applies it, encoding picks the first digit that decodes to the
  value, and the text form accepts only values the fix can produce beside the other field and
  leaves out a field the fix forces to one value (a load's seed).

Nested ops (an interleave's operands) are records and lines of their own, so the codec and the
text form handle them explicitly; only the strategies derive them (``Nested``).

Everything here is computed once per class (``layout``); the codec's per-record loop only
reads the precomputed tables, because decoding is on the fuzzer's hot path.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

T = TypeVar("T")


class FieldError(ValueError):
    """Text that is no value of a field; the text form adds the line number."""


def to_int(text: str, name: str) -> int:
    """A number in hex or decimal (``name``: what it is, for the error)."""
    try:
        return int(text, 0)
    except ValueError:
        raise FieldError(f"{name} must be a number, not {text!r}") from None


def _spell(value: object, hexa: bool = False) -> str:
    if value is None:
        return "current"  # a map's root and table format: the vCPU's current one
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return f"{value:#x}" if hexa else str(value)
    return str(value)


def _alternatives(texts: Sequence[str]) -> str:
    return ", ".join(texts[:-1]) + f" or {texts[-1]}" if len(texts) > 1 else texts[0]


# ---------------------------------------------------------------------- domains


class Domain(abc.ABC, Generic[T]):
    """A field's values: ``radix`` of them, digit ``d`` standing for ``value(d)``."""

    what: str  # what the value is, for error messages
    radix: int
    # digit -> value: an attribute, so that a table's is its tuple's C-level __getitem__ (the
    # codec's per-record loop calls it once per field).
    value: Callable[[int], T]

    @abc.abstractmethod
    def digits(self, value: T) -> list[tuple[int, int]]:
        """The canonical (digit, radix) pairs of ``value``, first least significant: one pair
        but for values made of parts (an entry) or flags with a digit each, which keep their
        own digits so that the minimizer and the mutator can change one part. KeyError or
        ValueError for a value outside the domain."""

    @abc.abstractmethod
    def format(self, value: T) -> str:
        """The value's spelling in the text form."""

    @abc.abstractmethod
    def parse(self, text: str, name: str) -> T:
        """The value ``text`` spells (``name``: the key or word it came from, for errors)."""

    def parse_words(self, words: Sequence[str], i: int) -> tuple[T, int]:
        """The value spelled from word ``i`` on, and the index of the next word."""
        if i >= len(words):
            raise FieldError(f"missing {self.what}")
        return self.parse(words[i], self.what), i + 1


class Table(Domain[T]):
    """One of a table of the world's values: numbers, or names (strings, enum members, booleans
    spelled 0 and 1), and None for "current"; a value that repeats in the table stands for its
    first digit (tables repeat values to weight them)."""

    def __init__(self, values: Sequence[T], what: str, *, hexa: bool = False) -> None:
        self.values = tuple(values)
        self.what = what
        self.radix = len(self.values)
        self.hexa = hexa
        self.value = self.values.__getitem__
        self.index = {v: self.values.index(v) for v in self.values}
        self.numeric = all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                           for v in self.values)
        self._by_text = {_spell(v): v for v in self.values}

    def digits(self, value: T) -> list[tuple[int, int]]:
        return [(self.index[value], self.radix)]

    def format(self, value: T) -> str:
        return _spell(value, self.hexa)

    def choices(self) -> list[str]:
        """The values' spellings: None first, enum members in their declaration order."""
        members = [v for v in self.index if not isinstance(v, enum.Enum)]
        for kind in dict.fromkeys(type(v) for v in self.values if isinstance(v, enum.Enum)):
            members += [m for m in kind if m in self.index]
        return [_spell(v) for v in sorted(members, key=lambda v: v is not None)]

    def _must_be(self, name: str) -> FieldError:
        return FieldError(f"{name} must be {_alternatives(self.choices())}")

    def read(self, text: str, name: str) -> Any:
        """The value ``text`` spells, whether or not the table holds it (a number; a name must
        be one of the table's)."""
        if (text == "current" and None in self.index) or (
                not self.numeric and text in self._by_text):
            return self._by_text[text]
        if not self.numeric:
            if len(self.index) <= 2:
                raise self._must_be(name)
            raise FieldError(f"unknown {self.what} {text!r} (one of: "
                             f"{', '.join(self.choices())})")
        return to_int(text, name)

    def outside(self, value: Any, name: str) -> FieldError:
        """The error for a value the field cannot take."""
        if len(self.index) <= 2:
            return self._must_be(name)
        if self.values == tuple(range(self.radix)):
            return FieldError(f"{name} must be 0..{self.radix - 1}")
        return FieldError(f"{self.what} {value:#x} is not one of the world's")

    def parse(self, text: str, name: str) -> T:
        value = self.read(text, name)
        if value not in self.index:
            raise self.outside(value, name)
        return typing.cast(T, value)


class Cpu(Table[int]):
    """A vCPU, spelled ``cpu0`` or ``cpu1``."""

    def __init__(self) -> None:
        super().__init__((0, 1), "cpu0 or cpu1")

    def format(self, value: int) -> str:
        return f"cpu{value}"

    def parse(self, text: str, name: str) -> int:
        if text not in ("cpu0", "cpu1"):
            raise FieldError(f"expected cpu0 or cpu1, not {text!r}")
        return int(text[3])


class Flags(Domain[int], abc.ABC):
    """A set of flag bits, spelled ``P|W|U`` (``0`` for none), among ``names``."""

    def __init__(self, bits: dict[str, int], names: Sequence[str], what: str,
                 why: str | None = None) -> None:
        """``bits``: every flag name and its bit, in spelling order; ``why``: the error for a
        known flag outside ``names`` ({name} is the flag)."""
        self.bits = bits
        self.names = tuple(names)
        self.what = what
        self.why = why
        self.mask = sum(bits[n] for n in names)

    def format(self, value: int) -> str:
        return "|".join(n for n, b in self.bits.items() if value & b) or "0"

    def parse(self, text: str, name: str) -> int:
        flags = 0
        for flag in [] if text == "0" else text.split("|"):
            if flag not in self.bits:
                raise FieldError(f"unknown flag {flag!r} (flags: {', '.join(self.bits)})")
            if flag not in self.names:
                why = self.why or f"{self.what} take {_alternatives(self.names)}, not {{name!r}}"
                raise FieldError(why.format(name=flag))
            flags |= self.bits[flag]
        return flags

    def _check(self, value: int) -> None:
        if value & ~self.mask:
            raise ValueError(f"{self.what} are among {', '.join(self.names)}")


class FlagMask(Flags):
    """Any subset of the flags, as one digit whose bit i is flag ``names[i]`` (so that the
    minimizer can drop one flag by clearing one bit of the digit)."""

    def __init__(self, bits: dict[str, int], names: Sequence[str], what: str,
                 why: str | None = None) -> None:
        super().__init__(bits, names, what, why)
        self.radix = 1 << len(self.names)
        self._bits = [bits[n] for n in self.names]
        flags = tuple(sum(b for i, b in enumerate(self._bits) if d >> i & 1)
                      for d in range(self.radix))
        self.value = flags.__getitem__

    def digits(self, value: int) -> list[tuple[int, int]]:
        self._check(value)
        return [(sum(1 << i for i, b in enumerate(self._bits) if value & b), self.radix)]


class BiasedFlags(Flags):
    """Flags each with its own digit, so that a random record sets each one as often as a
    kernel does: flag ``name`` of (name, radix, on) is set when its digit is non-zero if
    ``on``, when it is zero otherwise (radix 8: 7 in 8 set, or 1 in 8)."""

    def __init__(self, bits: dict[str, int], biases: Sequence[tuple[str, int, bool]],
                 what: str, why: str | None = None) -> None:
        super().__init__(bits, [n for n, _, _ in biases], what, why)
        self.biases = tuple((bits[n], radix, on) for n, radix, on in biases)
        self.radix = 1
        for _, radix, _ in self.biases:
            self.radix *= radix
        self.value = tuple(self._decode(d) for d in range(self.radix)).__getitem__

    def _decode(self, digit: int) -> int:
        flags = 0
        for bit, radix, on in self.biases:
            digit, d = divmod(digit, radix)
            flags |= bit if (d != 0) == on else 0
        return flags

    def digits(self, value: int) -> list[tuple[int, int]]:
        self._check(value)
        return [(int(bool(value & bit) == on), radix) for bit, radix, on in self.biases]


class Composite(Domain[T]):
    """A value built from parts, each with its own domain and digits: ``make(*values)`` of
    the parts' values, which are read back as its attributes of the parts' names. Spelled as
    its parts' words after ``lead`` (``-> 0x5 P|W rsvd``); a last part equal to ``optional``
    is left out."""

    def __init__(self, make: Callable[..., T], parts: Sequence[tuple[str, Domain[Any]]],
                 what: str, lead: str, optional: object) -> None:
        self.make = make
        self.parts = tuple(parts)
        self.what = what
        self.lead = lead
        self.optional = optional
        self.radix = 1
        for _, domain in self.parts:
            self.radix *= domain.radix
        self.value = self._value

    def _value(self, digit: int) -> T:
        args = []
        for _, domain in self.parts:
            digit, d = divmod(digit, domain.radix)
            args.append(domain.value(d))
        return self.make(*args)

    def digits(self, value: T) -> list[tuple[int, int]]:
        return [pair for name, domain in self.parts
                for pair in domain.digits(getattr(value, name))]

    def format(self, value: T) -> str:
        words = [self.lead]
        for n, (name, domain) in enumerate(self.parts, 1):
            part = getattr(value, name)
            if not (n == len(self.parts) and part == self.optional):
                words.append(domain.format(part))
        return " ".join(words)

    def parse_words(self, words: Sequence[str], i: int) -> tuple[T, int]:
        if i >= len(words):
            raise FieldError(f"missing {self.lead}")
        if words[i] != self.lead:
            raise FieldError(f"expected {self.lead} before the {self.what}")
        i += 1
        args = []
        for n, (name, domain) in enumerate(self.parts, 1):
            if n == len(self.parts) and (i >= len(words) or not _spells(domain, words[i])):
                args.append(self.optional)
                continue
            if i >= len(words):
                raise FieldError(f"missing {domain.what}")
            args.append(domain.parse(words[i], name))
            i += 1
        return self.make(*args), i

    def parse(self, text: str, name: str) -> T:
        words = text.split()
        value, i = self.parse_words(words, 0)
        if i < len(words):
            raise FieldError(f"unexpected {words[i]!r} after the {self.what}")
        return value


def _spells(domain: Domain[Any], word: str) -> bool:
    try:
        domain.parse(word, "")
    except FieldError:
        return False
    return True


# ---------------------------------------------------------------------- syntax


@dataclass(frozen=True)
class Word:
    """A positional word (the words of a line come in field order)."""


@dataclass(frozen=True)
class Address:
    """A positional address word, which may carry ``+offset`` for a following Plus field;
    without one, only ``+0``."""


@dataclass(frozen=True)
class Plus:
    """The ``+offset`` of the address word before it; 0 when the word has none."""


_REQUIRED: Final[Any] = object()


@dataclass(frozen=True)
class Key:
    """``key=value``, anywhere on the line; ``name`` defaults to the field's, with ``-`` for
    ``_``; without ``default`` the key must be given."""

    name: str | None = None
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True)
class FlagWord:
    """A word that is there when the (boolean) field is true."""

    word: str


@dataclass(frozen=True)
class Name:
    """The field's value is the op's name on the line (``read``, ``write``, ``fetch``)."""


@dataclass(frozen=True)
class SwitchName:
    """The field's value is the key of the next field's ``key=0|1`` (``set cpu0 wp=1``)."""


@dataclass(frozen=True)
class SwitchValue:
    """The 0 or 1 after the key that names the previous field's value."""


Syntax = Word | Address | Plus | Key | FlagWord | Name | SwitchName | SwitchValue


@dataclass(frozen=True)
class Nested:
    """Operands of an interleave, declared after the op's other fields: another op, or with
    ``group`` (least, most) a tuple of that many ops. The binary and text forms hold them as
    records and lines of their own."""

    group: tuple[int, int] | None = None


@dataclass(frozen=True)
class Fix:
    """The field's value depends on field ``on``: a decoded value ``v`` becomes
    ``fn(v, on's value)``. ``why``: the text form's error for a value the field takes, but not
    beside this value of ``on``, formatted with the spelled fields of the line."""

    fn: Callable[[Any, Any], Any]
    on: str
    why: str | None = None


# ---------------------------------------------------------------------- fields


@dataclass(frozen=True)
class Field:
    name: str
    domain: Domain[Any]
    syntax: Syntax
    fix: Fix | None = None
    fixed_by: int = -1  # the index of ``fix.on`` among the fields


class Layout:
    """A class's fields in order, and what decoding and encoding need of them, precomputed."""

    def __init__(self, cls: type) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        names = [f.name for f in dataclasses.fields(cls)]
        fields: list[Field] = []
        nested: list[tuple[str, Nested]] = []
        for name in names:
            meta = getattr(hints[name], "__metadata__", ())
            domain = next((m for m in meta if isinstance(m, Domain)), None)
            syntax = next((m for m in meta if isinstance(m, Syntax)), None)
            fix = next((m for m in meta if isinstance(m, Fix)), None)
            operands = next((m for m in meta if isinstance(m, Nested)), None)
            if operands is not None:
                nested.append((name, operands))
                continue
            if domain is None or syntax is None or nested:
                raise TypeError(f"{cls.__name__}.{name} needs a domain and a syntax, and to "
                                "come before nested ops")
            fields.append(Field(name, domain, syntax, fix,
                                names.index(fix.on) if fix is not None else -1))
        for f in fields:
            if f.fix is None:
                continue
            if fields[f.fixed_by].fix is not None:
                # Fixes apply in one pass, so a field must depend on a final value.
                raise TypeError(f"{cls.__name__}.{f.name} depends on a fixed field")
            if not isinstance(f.domain, Table):
                # The text form reads a fixed field's value before checking it (Table.read).
                raise TypeError(f"{cls.__name__}.{f.name}: only a table field has a fix")
        self.fields = tuple(fields)
        self.nested = tuple(nested)
        self.make: Callable[..., Any] = cls
        # What the codec's per-record loop reads: (radix, digit -> value) per field, then
        # (index, fn, index of the dependency) per fix.
        self.steps = tuple((f.domain.radix, f.domain.value) for f in self.fields)
        self.fixes = tuple((i, f.fix.fn, f.fixed_by) for i, f in enumerate(self.fields)
                           if f.fix is not None)
        # Per fixed field and value of its dependency: each value the field can take, with
        # its first digit (what encoding writes, and what the text form accepts).
        self.fixed: dict[int, dict[object, dict[object, int]]] = {}
        for i, fn, j in self.fixes:
            domain, on = self.fields[i].domain, self.fields[j].domain
            self.fixed[i] = {}
            for dep in dict.fromkeys(on.value(d) for d in range(on.radix)):
                choices: dict[object, int] = {}
                for d in range(domain.radix):
                    choices.setdefault(fn(domain.value(d), dep), d)
                self.fixed[i][dep] = choices

    def build(self, args: list[Any]) -> Any:
        """The op (or header) of decoded field values (then any nested ops), fixes applied."""
        for i, fn, j in self.fixes:
            args[i] = fn(args[i], args[j])
        return self.make(*args)

    def choices(self, i: int, obj: object) -> dict[object, int]:
        """The values fixed field ``i`` can take beside ``obj``'s other fields (none beside a
        value outside the world: the text form still writes such an op)."""
        return self.fixed[i].get(getattr(obj, self.fields[self.fields[i].fixed_by].name), {})

    def digits(self, obj: object) -> list[tuple[int, int]]:
        """The canonical digits of ``obj``'s fields (KeyError or ValueError outside the world)."""
        out: list[tuple[int, int]] = []
        for i, f in enumerate(self.fields):
            value = getattr(obj, f.name)
            if f.fix is None:
                out += f.domain.digits(value)
            else:
                out.append((self.choices(i, obj)[value], f.domain.radix))
        return out


_LAYOUTS: Final[dict[type, Layout]] = {}


def layout(cls: type) -> Layout:
    """The layout of an op class (or Header), built once: the codec, the text form and the
    strategies read it."""
    lay = _LAYOUTS.get(cls)
    if lay is None:
        lay = _LAYOUTS[cls] = Layout(cls)
    return lay
