"""The PostgreSQL store's array parameters (``fieldmesh.store.postgres._arr``): any list of the element types the
store binds reads back from the server as the same list, element for element. The literal is joined in C
instead of psycopg's element-by-element dumping; what it must never do is change a value."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.store.postgres import _arr

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
