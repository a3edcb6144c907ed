"""A small, safe filter language over an image table's metadata columns, parsed into a structured form.

    colour = 'red' AND count >= 2
    NOT (shape IN ('circle', 'square') OR caption IS NULL)

Comparisons (`=`, `!=`, `<>`, `<`, `<=`, `>`, `>=`), `IN (...)`, `IS [NOT] NULL`, combined with `AND`,
`OR`, `NOT` and parentheses; values are single-quoted strings (`''` inside for a quote), numbers, `TRUE`,
`FALSE`. Keywords are case-insensitive. Every column must be a known scalar column of the table and each
value must match its column's kind, so what reaches the store is a checked tree, never the user's text
(`magiclens_core.search.store` renders the tree for LanceDB).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

ColumnKind = Literal["string", "number", "bool"]
Value = str | int | float | bool

MAX_FILTER_CHARS = 2000
MAX_CONDITIONS = 64
MAX_DEPTH = 16
OPERATORS = ("=", "!=", "<>", "<=", ">=", "<", ">")
_ORDERED = ("<", "<=", ">", ">=")


class FilterError(ValueError):
    """A filter that cannot be used; `code` is `bad_filter` or `unknown_filter_column`."""

    def __init__(self, message: str, code: str = "bad_filter") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Comparison:
    column: str
    op: str  # one of OPERATORS, with `<>` normalised to `!=`
    value: Value


@dataclass(frozen=True)
class InList:
    column: str
    values: tuple[Value, ...]


@dataclass(frozen=True)
class IsNull:
    column: str
    negated: bool = False


@dataclass(frozen=True)
class And:
    items: tuple[Filter, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Filter, ...]


@dataclass(frozen=True)
class Not:
    item: Filter


Filter = Comparison | InList | IsNull | And | Or | Not


def column_kinds(schema: pa.Schema) -> dict[str, ColumnKind]:
    """The columns of `schema` a filter may name, with their kind (strings, numbers, booleans)."""
    kinds: dict[str, ColumnKind] = {}
    for field in schema:
        if "`" in field.name:  # cannot be quoted safely as an identifier
            continue
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            kinds[field.name] = "string"
        elif pa.types.is_integer(field.type) or pa.types.is_floating(field.type):
            kinds[field.name] = "number"
        elif pa.types.is_boolean(field.type):
            kinds[field.name] = "bool"
    return kinds


_TOKEN = re.compile(r"""
    \s*(?:
      (?P<string>'(?:[^']|'')*')
    | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<op><=|>=|!=|<>|=|<|>)
    | (?P<punct>[(),])
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<quoted>"(?:[^"]|"")*")
    )""", re.VERBOSE)
_KEYWORDS = {"AND", "OR", "NOT", "IN", "IS", "NULL", "TRUE", "FALSE"}


@dataclass(frozen=True)
class _Token:
    kind: str  # string, number, op, punct, word, keyword, column, end
    text: str
    position: int


def _tokens(text: str) -> list[_Token]:
    tokens, position = [], 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None or match.lastgroup is None:
            start = len(text) - len(text[position:].lstrip())
            raise FilterError(f"unexpected character {text[start]!r} at position {start}")
        kind, value = match.lastgroup, match.group(match.lastgroup)
        start = match.start(kind)
        if kind == "word" and value.upper() in _KEYWORDS:
            tokens.append(_Token("keyword", value.upper(), start))
        elif kind in ("word", "quoted"):
            name = value[1:-1].replace('""', '"') if kind == "quoted" else value
            tokens.append(_Token("column", name, start))
        else:
            tokens.append(_Token(kind, value, start))
        position = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


class _Parser:
    def __init__(self, text: str, columns: dict[str, ColumnKind]) -> None:
        self.tokens = _tokens(text)
        self.index = 0
        self.columns = columns
        self.conditions = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def expect(self, kind: str, text: str | None = None) -> _Token:
        token = self.take()
        if token.kind != kind or (text is not None and token.text != text):
            wanted = text or kind
            found = token.text or "the end of the filter"
            raise FilterError(f"expected {wanted} at position {token.position}, found {found!r}")
        return token

    def accept(self, kind: str, text: str) -> bool:
        token = self.peek()
        if token.kind == kind and token.text == text:
            self.index += 1
            return True
        return False

    def expression(self, depth: int = 0) -> Filter:
        if depth > MAX_DEPTH:
            raise FilterError(f"filter nests deeper than {MAX_DEPTH} levels")
        items = [self.conjunction(depth)]
        while self.accept("keyword", "OR"):
            items.append(self.conjunction(depth))
        return items[0] if len(items) == 1 else Or(tuple(items))

    def conjunction(self, depth: int) -> Filter:
        items = [self.negation(depth)]
        while self.accept("keyword", "AND"):
            items.append(self.negation(depth))
        return items[0] if len(items) == 1 else And(tuple(items))

    def negation(self, depth: int) -> Filter:
        if self.accept("keyword", "NOT"):
            return Not(self.negation(depth + 1))
        if self.accept("punct", "("):
            inner = self.expression(depth + 1)
            self.expect("punct", ")")
            return inner
        return self.condition()

    def condition(self) -> Filter:
        self.conditions += 1
        if self.conditions > MAX_CONDITIONS:
            raise FilterError(f"filter has more than {MAX_CONDITIONS} conditions")
        token = self.expect("column")
        kind = self.columns.get(token.text)
        if kind is None:
            known = ", ".join(sorted(self.columns)) or "none"
            raise FilterError(f"unknown filter column {token.text!r}; known columns: {known}",
                              code="unknown_filter_column")
        column = token.text
        if self.accept("keyword", "IS"):
            negated = self.accept("keyword", "NOT")
            self.expect("keyword", "NULL")
            return IsNull(column, negated)
        if self.accept("keyword", "IN"):
            self.expect("punct", "(")
            values = [self.value(column, kind)]
            while self.accept("punct", ","):
                values.append(self.value(column, kind))
            self.expect("punct", ")")
            return InList(column, tuple(values))
        op = self.expect("op").text
        op = "!=" if op == "<>" else op
        if kind == "bool" and op in _ORDERED:
            raise FilterError(f"column {column!r} is true/false: only = and != apply")
        return Comparison(column, op, self.value(column, kind))

    def value(self, column: str, kind: ColumnKind) -> Value:
        token = self.take()
        if token.kind == "string" and kind == "string":
            return token.text[1:-1].replace("''", "'")
        if token.kind == "number" and kind == "number":
            number = float(token.text)
            if not math.isfinite(number):
                raise FilterError(f"number {token.text} at position {token.position} is out of range")
            if re.fullmatch(r"[-+]?\d+", token.text):
                if not -(2**63) <= int(token.text) < 2**63:
                    raise FilterError(f"integer {token.text} at position {token.position} is out of range")
                return int(token.text)
            return number
        if token.kind == "keyword" and token.text in ("TRUE", "FALSE") and kind == "bool":
            return token.text == "TRUE"
        found = token.text or "the end of the filter"
        raise FilterError(f"column {column!r} holds {kind} values; found {found!r} at position {token.position}")


def parse_filter(text: str, columns: dict[str, ColumnKind]) -> Filter:
    """Parse `text` into a checked `Filter` over `columns` (name → kind); raises `FilterError`."""
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter is longer than {MAX_FILTER_CHARS} characters")
    if not text.strip():
        raise FilterError("filter is empty")
    parser = _Parser(text, columns)
    tree = parser.expression()
    parser.expect("end")
    return tree
