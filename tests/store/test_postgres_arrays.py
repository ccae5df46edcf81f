"""The PostgreSQL store's array parameters: any list of the element types the store binds reads back from the
server as the same list, element for element. Texts, booleans and lists with NULLs go as array literals joined in C
(``fieldmesh.store.postgres._arr``), int64 and float64 columns in PostgreSQL's binary array format made by numpy
(``_Ints``, ``_Doubles``), instead of psycopg's element-by-element dumping; what they must never do is change a
value."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.store.postgres import _arr, _Doubles, _dumpers, _Ints

# no NUL (a PostgreSQL text cannot hold one) and no lone surrogate (not UTF-8)
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
# the characters an array literal gives a meaning to, often
_TRICKY = st.lists(st.sampled_from(['"', "\\", ",", "{", "}", " ", "NULL", "null", "'", "\n", "a", ""]),
                   max_size=4).map("".join)
_INT64 = st.integers(-(2**63), 2**63 - 1)
_FLOAT = st.floats(allow_nan=False, allow_infinity=True)


@pytest.fixture(scope="module")
def con(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_url, autocommit=True) as c:
        for cls, dumper in _dumpers():  # as the store's connections have them
            c.adapters.register_dumper(cls, dumper)
        yield c


def _back(con: psycopg.Connection[Any], values: list[Any], pg_type: str) -> list[Any]:
    row = con.execute(f"SELECT %s::{pg_type}[]", (_arr(values),)).fetchone()
    assert row is not None
    return list(row[0])


_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(values=st.lists(st.one_of(_TEXT, _TRICKY, st.none()), max_size=20))
def test_texts_read_back_as_they_were(con: psycopg.Connection[Any], values: list[str | None]) -> None:
    assert _back(con, values, "text") == values


@_SETTINGS
@given(values=st.lists(st.one_of(_TEXT, _TRICKY), min_size=1, max_size=20))
def test_texts_without_a_null_read_back_as_they_were(con: psycopg.Connection[Any], values: list[str]) -> None:
    assert _back(con, values, "text") == values


@_SETTINGS
@given(values=st.lists(st.one_of(_INT64, st.none()), max_size=20))
def test_bigints_read_back_as_they_were(con: psycopg.Connection[Any], values: list[int | None]) -> None:
    assert _back(con, values, "bigint") == values


@_SETTINGS
@given(values=st.lists(st.one_of(_FLOAT, st.none()), max_size=20))
def test_doubles_read_back_to_the_same_bits(con: psycopg.Connection[Any], values: list[float | None]) -> None:
    got = _back(con, values, "float8")
    assert len(got) == len(values)
    for g, v in zip(got, values, strict=True):
        if v is None:
            assert g is None
        else:
            assert g == v and math.copysign(1.0, g) == math.copysign(1.0, v), (g, v)


@_SETTINGS
@given(values=st.lists(st.one_of(st.booleans(), st.none()), max_size=20))
def test_booleans_read_back_as_they_were(con: psycopg.Connection[Any], values: list[bool | None]) -> None:
    assert _back(con, values, "boolean") == values


def test_an_empty_list_and_a_list_of_nulls(con: psycopg.Connection[Any]) -> None:
    assert _back(con, [], "bigint") == []
    assert _back(con, [None, None], "text") == [None, None]
    assert _back(con, ["NULL", None, ""], "text") == ["NULL", None, ""]


def test_keys_found_through_any_of_an_array_literal(con: psycopg.Connection[Any]) -> None:
    """``id = ANY(%s::bigint[])`` over the literal finds the rows (the claims' read of keys another batch holds)."""
    rows = con.execute("SELECT x FROM generate_series(1, 10) AS x WHERE x = ANY(%s::bigint[]) ORDER BY x",
                       (_arr([3, 7, 11]),)).fetchall()
    assert [r[0] for r in rows] == [3, 7]


@_SETTINGS
@given(values=st.lists(_INT64, max_size=30))
def test_int64_columns_in_binary_read_back_as_they_were(con: psycopg.Connection[Any], values: list[int]) -> None:
    row = con.execute("SELECT %s::bigint[]", (_Ints(values),)).fetchone()
    assert row is not None and list(row[0]) == values


@_SETTINGS
@given(values=st.lists(st.floats(), max_size=30))
def test_float64_columns_in_binary_read_back_to_the_same_bits(
    con: psycopg.Connection[Any], values: list[float]
) -> None:
    row = con.execute("SELECT %s::float8[]", (_Doubles(values),)).fetchone()
    assert row is not None
    got = list(row[0])
    assert len(got) == len(values)
    for g, v in zip(got, values, strict=True):
        assert (math.isnan(g) and math.isnan(v)) or (g == v and math.copysign(1.0, g) == math.copysign(1.0, v)), (g, v)


def test_binary_columns_join_and_match_in_sql(con: psycopg.Connection[Any]) -> None:
    """The binary columns unnest side by side with literal ones, and ``= ANY`` finds rows by them."""
    rows = con.execute("SELECT * FROM unnest(%s::text[], %s::bigint[], %s::float8[]) AS j(d, w, v)",
                       (_arr(["a", "b"]), _Ints([1, -2]), _Doubles([0.1, 1e300]))).fetchall()
    assert rows == [("a", 1, 0.1), ("b", -2, 1e300)]
    found = con.execute("SELECT x FROM generate_series(1, 10) AS x WHERE x = ANY(%s::bigint[]) ORDER BY x",
                        (_Ints([3, 7, 11]),)).fetchall()
    assert [r[0] for r in found] == [3, 7]
    assert con.execute("SELECT cardinality(%s::bigint[])", (_Ints([]),)).fetchone() == (0,)
