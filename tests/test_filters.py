"""The metadata filter language (magiclens_core.search.filters) and its rendering for LanceDB (store.filter_sql),
checked against a real table: every value, quote and keyword stays data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from magiclens_core.search.filters import (
    And,
    Comparison,
    FilterError,
    InList,
    IsNull,
    Not,
    Or,
    column_kinds,
    parse_filter,
)
from magiclens_core.search.store import ImageTable, image_schema

COLUMNS = {"caption": "string", "n": "number", "ok": "bool", "select": "string", "x": "number"}


def test_parse_builds_the_tree():
    tree = parse_filter("caption = 'a' AND (n >= 2 OR NOT ok = true) and x in (1, 2.5)", COLUMNS)
    assert tree == And((Comparison("caption", "=", "a"),
                        Or((Comparison("n", ">=", 2), Not(Comparison("ok", "=", True)))),
                        InList("x", (1, 2.5))))
    assert parse_filter("caption IS NOT NULL", COLUMNS) == IsNull("caption", negated=True)
    assert parse_filter("n <> -3e0", COLUMNS) == Comparison("n", "!=", -3.0)
    assert parse_filter("caption = 'O''Brien'", COLUMNS) == Comparison("caption", "=", "O'Brien")


@pytest.mark.parametrize("text,code,message", [
    ("colour = 'red'", "unknown_filter_column", "unknown filter column 'colour'"),
    ("n = 'x'", "bad_filter", "holds number values"),
    ("caption = 3", "bad_filter", "holds string values"),
    ("ok < true", "bad_filter", "only = and != apply"),
    ("n >", "bad_filter", "end of the filter"),
    ("n = 1 n = 2", "bad_filter", "expected end"),
    ("n = 1; DROP TABLE t", "bad_filter", "unexpected character ';'"),
    ("caption = 'unterminated", "bad_filter", "unexpected character"),
    ("n = 1e999", "bad_filter", "out of range"),
    ("n = 99999999999999999999", "bad_filter", "out of range"),
    ("(" * 40 + "n = 1" + ")" * 40, "bad_filter", "nests deeper"),
    (" OR ".join(["n = 1"] * 100), "bad_filter", "more than"),
    ("   ", "bad_filter", "empty"),
])
def test_bad_filters_are_refused_with_a_reason(text, code, message):
    with pytest.raises(FilterError, match=message) as caught:
        parse_filter(text, COLUMNS)
    assert caught.value.code == code


def test_column_kinds_name_only_scalar_columns():
    schema = image_schema(4, clip_dim=4, metadata=pa.schema([pa.field("tags", pa.list_(pa.string())),
                                                              pa.field("ok", pa.bool_()),
                                                              pa.field("weird`name", pa.string())]))
    kinds = column_kinds(schema)
    assert kinds == {"id": "string", "uri": "string", "width": "number", "height": "number",
                     "model_id": "string", "ok": "bool"}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    metadata = pa.schema([pa.field("caption", pa.string()), pa.field("n", pa.int64()), pa.field("ok", pa.bool_()),
                          pa.field("select", pa.string()), pa.field("x", pa.float32())])
    table = ImageTable.create(str(tmp_path_factory.mktemp("filters")), "t", image_schema(4, metadata=metadata))
    vectors = np.random.default_rng(0).random((6, 4)).astype(np.float32)
    table.add(pa.table({
        "id": [f"i{n}" for n in range(6)],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 4),
        "caption": ["O'Brien", "back\\slash", "x", None, "DROP TABLE t; --", "ünïcode \"quoted\""],
        "n": [1, 2, 3, 4, 5, -6], "ok": [True, False, True, None, False, True],
        "select": ["a", "b", "c", "d", "e", "f"], "x": [0.5, 1.5, 2.5, 3.5, 4.5, 1e-5],
    }))
    return table


@pytest.mark.parametrize("text,expected", [
    ("caption = 'O''Brien'", {"i0"}),
    ("caption = 'back\\slash'", {"i1"}),
    ("caption = 'DROP TABLE t; --'", {"i4"}),
    ("caption = 'ünïcode \"quoted\"'", {"i5"}),
    ("caption = 'x' OR caption = 'nothing'' OR ''1''=''1'", {"i2"}),
    ("n >= 3 AND ok = TRUE", {"i2"}),
    ("caption IS NULL OR select IN ('a', 'e')", {"i0", "i3", "i4"}),
    ("NOT (n < 2.5)", {"i2", "i3", "i4"}),
    ("x > .5 AND x <= 3.5", {"i1", "i2", "i3"}),
    ("x < 0.0001", {"i5"}),
    ("n = -6", {"i5"}),
    ('"select" = \'b\'', {"i1"}),
    ("ok != false", {"i0", "i2", "i5"}),
])
def test_rendered_filters_select_exactly_the_matching_rows(table, text, expected):
    tree = parse_filter(text, column_kinds(table.schema))
    found = table.search(np.ones(4, dtype=np.float32), k=10, filter=tree, exact=True).column("id").to_pylist()
    assert set(found) == expected
    assert table.count() == 6


def test_rows_by_id_and_in_storage_order(table):
    assert sorted(table.get(["i1", "x' OR '1'='1", "i3"], ["id"]).column("id").to_pylist()) == ["i1", "i3"]
    assert table.get([], ["id"]).num_rows == 0
    assert table.head(2, 1, ["id", "n"]).to_pylist() == [{"id": "i1", "n": 2}, {"id": "i2", "n": 3}]
