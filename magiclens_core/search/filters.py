"""A small, safe filter language over an image table's metadata columns, parsed into a structured form.

    colour = 'red' AND count >= 2
    NOT (shape IN ('circle', 'square') OR caption IS NULL)

Comparisons (`=`, `!=`, `<>`, `<`, `<=`, `>`, `>=`), `IN (...)`, `IS [NOT] NULL`, combined with `AND`,
`OR`, `NOT` and parentheses; values are single-quoted strings (`''` inside for a quote), numbers, `TRUE`,
`FALSE`. Keywords are case-insensitive. Every column must be a known scalar column of the table and each
value must match its column's kind, so what reaches the store is a checked tree, never the user's text
(`magiclens_core.search.store` renders the tree for LanceDB). A number with a fraction or an exponent is a
64-bit float; compared with a float column it is read as that column's type, compared with an integer column
it is compared exactly (`count < 1.5` holds for counts up to 1).

The cost of a filter is bounded before it is parsed (`MAX_FILTER_CHARS`) and while it is (`MAX_DEPTH` levels
of parentheses and `NOT`s together, `MAX_CONDITIONS` conditions); `normalise` then gives the tree LanceDB
plans in time: no `NOT` above a condition, no nested `AND` in `AND` (or `OR` in `OR`), and only values an
integer column can hold compared with it.
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
MAX_DEPTH = 16  # parentheses and NOTs together
OPERATORS = ("=", "!=", "<>", "<=", ">=", "<", ">")
_ORDERED = ("<", "<=", ">", ">=")
_NEGATED = {"=": "!=", "!=": "=", "<": ">=", "<=": ">", ">": "<=", ">=": "<"}


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
    negated: bool = False  # NOT IN


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
NOTHING = Or(())  # the empty disjunction: no row matches


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


def _deeper(depth: int) -> int:
    if depth >= MAX_DEPTH:
        raise FilterError(f"filter nests parentheses and NOTs deeper than {MAX_DEPTH} levels")
    return depth + 1


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
            return Not(self.negation(_deeper(depth)))
        if self.accept("punct", "("):
            inner = self.expression(_deeper(depth))
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
            return int(token.text) if re.fullmatch(r"[-+]?\d+", token.text) else number
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


def integer_ranges(schema: pa.Schema) -> dict[str, tuple[int, int]]:
    """The integer columns of `schema` with the least and greatest value their type holds."""
    ranges = {}
    for field in schema:
        if pa.types.is_integer(field.type):
            bits = field.type.bit_width
            signed = pa.types.is_signed_integer(field.type)
            ranges[field.name] = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return ranges


def normalise(tree: Filter, integers: dict[str, tuple[int, int]] | None = None) -> Filter:
    """The same filter as LanceDB plans it quickly and can type: every `NOT` pushed into the conditions (De
    Morgan's laws and negated comparisons, which hold in SQL's three-valued logic), `AND`s in `AND`s and
    `OR`s in `OR`s flattened (each part once), and each condition on an integer column of `integers` (name →
    least and greatest value) compared only with values that column can hold; a part no row can match is
    `NOTHING`."""
    return _normalise(tree, False, integers or {})


def _normalise(tree: Filter, negate: bool, integers: dict[str, tuple[int, int]]) -> Filter:
    if isinstance(tree, Not):
        return _normalise(tree.item, not negate, integers)
    if isinstance(tree, (And, Or)):
        conjunction = isinstance(tree, And) != negate
        items = []
        for item in tree.items:
            item = _normalise(item, negate, integers)
            if item == NOTHING:
                if conjunction:
                    return NOTHING
                continue
            nested = isinstance(item, And) if conjunction else isinstance(item, Or)
            items.extend(item.items if nested else [item])
        items = list(dict.fromkeys(items))  # each part once
        if len(items) == 1:
            return items[0]
        return And(tuple(items)) if conjunction else Or(tuple(items))
    if isinstance(tree, IsNull):
        return IsNull(tree.column, tree.negated != negate)
    if isinstance(tree, InList):
        tree = InList(tree.column, tree.values, tree.negated != negate)
    elif negate:
        tree = Comparison(tree.column, _NEGATED[tree.op], tree.value)
    bounds = integers.get(tree.column)
    return tree if bounds is None else _on_integers(tree, *bounds)


def _on_integers(condition: Comparison | InList, low: int, high: int) -> Filter:
    """`condition` on an integer column holding `low` .. `high`, with integer values in that range only."""
    def holdable(value: Value) -> bool:
        return not isinstance(value, bool) and value == math.floor(value) and low <= value <= high

    every_row = IsNull(condition.column, negated=True)  # the condition holds for every value, not for NULL
    if isinstance(condition, InList):
        values = tuple(int(value) for value in condition.values if holdable(value))
        if not values:
            return every_row if condition.negated else NOTHING
        return InList(condition.column, values, condition.negated)
    op, value = condition.op, condition.value
    if op in ("=", "!="):
        if holdable(value):
            return Comparison(condition.column, op, int(value))
        return NOTHING if op == "=" else every_row
    # x < v ⇔ x <= ceil(v) - 1;  x > v ⇔ x >= floor(v) + 1 (for integer x)
    bound = {"<": math.ceil(value) - 1, "<=": math.floor(value), ">": math.floor(value) + 1,
             ">=": math.ceil(value)}[op]
    if op in ("<", "<="):
        return every_row if bound >= high else NOTHING if bound < low else Comparison(condition.column, "<=", bound)
    return every_row if bound <= low else NOTHING if bound > high else Comparison(condition.column, ">=", bound)
