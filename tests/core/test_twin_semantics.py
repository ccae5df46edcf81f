"""Shadow semantics of twins (fieldmesh.core.twins): merge patch, delta, metadata, limits.

The merge is checked against RFC 7396's own pseudo-code (an oracle written apart from the code under
test), and the properties a device's convergence rests on are checked over generated documents.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldmesh.core.topics import route_of_topic
from fieldmesh.core.twins import (
    Twin,
    TwinInvalid,
    TwinTooLarge,
    check_document,
    delta,
    device_of_twin_topic,
    leaf_pointers,
    merge_patch,
)

names = st.sampled_from(["a", "b", "c", "mode", "x/y", "t~1", ""])
scalars = st.one_of(st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False, width=16),
                    st.text(max_size=3))
values = st.recursive(scalars | st.lists(scalars, max_size=2),
                      lambda inner: st.dictionaries(names, inner, max_size=3), max_leaves=8)
docs = st.dictionaries(names, values, max_size=4)
# a patch may hold nulls (removals) at any depth of its objects
patch_values = st.recursive(st.none() | scalars | st.lists(scalars, max_size=2),
                            lambda inner: st.dictionaries(names, inner, max_size=3), max_leaves=8)
patches = st.dictionaries(names, patch_values, max_size=4)


def rfc7396(target: Any, patch: Any) -> Any:
    """RFC 7396 section 2, as written there."""
    if isinstance(patch, dict):
        if not isinstance(target, dict):
            target = {}
        target = dict(target)
        for name, value in patch.items():
            if value is None:
                target.pop(name, None)
            else:
                target[name] = rfc7396(target.get(name), value)
        return target
    return patch


def strip_nulls(v: Any) -> Any:
    return {k: strip_nulls(x) for k, x in v.items() if x is not None} if isinstance(v, dict) else v


@settings(max_examples=400, deadline=None)
@given(docs, patches)
def test_merge_is_rfc7396(doc: dict[str, Any], patch: dict[str, Any]) -> None:
    merged, _ = merge_patch(doc, patch, {}, 1)
    assert merged == rfc7396(doc, patch)


@settings(max_examples=400, deadline=None)
@given(docs, patches)
def test_metadata_covers_exactly_the_leaves(doc: dict[str, Any], patch: dict[str, Any]) -> None:
    _, meta0 = merge_patch({}, doc, {}, 1)
    merged, meta = merge_patch(doc, patch, meta0, 2)
    assert sorted(meta) == sorted(leaf_pointers(merged))
    assert set(meta.values()) <= {1, 2}


@settings(max_examples=400, deadline=None)
@given(docs, patches)
def test_merge_is_idempotent(doc: dict[str, Any], patch: dict[str, Any]) -> None:
    once, meta1 = merge_patch(doc, patch, {}, 1)
    twice, meta2 = merge_patch(once, patch, meta1, 2)
    assert twice == once
    assert meta2 == meta1  # rewriting a value it has keeps its timestamp


@settings(max_examples=400, deadline=None)
@given(docs, docs)
def test_applying_the_delta_converges(desired: dict[str, Any], reported: dict[str, Any]) -> None:
    """What a device does: merge the delta into what it has; then nothing is left to do."""
    desired = strip_nulls(desired)
    d = delta(desired, reported)
    after, _ = merge_patch(reported, d, {}, 1)
    assert delta(desired, after) == {}
    # the delta only ever names members of desired, with desired's values
    for name in d:
        assert name in desired


@settings(max_examples=300, deadline=None)
@given(docs)
def test_no_delta_when_reported_has_everything(desired: dict[str, Any]) -> None:
    assert delta(desired, desired) == {}
    assert delta({}, desired) == {}


def test_delta_examples() -> None:
    desired = {"mode": "window", "window_ms": 10_000, "metrics": {"t": {"deadband": 0.5, "unit": "C"}}, "x": {}}
    reported = {"mode": "window", "window_ms": 5_000, "metrics": {"t": {"deadband": 0.5}}, "extra": 1}
    assert delta(desired, reported) == {"window_ms": 10_000, "metrics": {"t": {"unit": "C"}}, "x": {}}
    # JSON equality: 1 and 1.0 are one number, a boolean is not a number
    assert delta({"a": 1, "b": True}, {"a": 1.0, "b": 1}) == {"b": True}


def test_null_removes_and_nested_objects_merge() -> None:
    doc, meta = merge_patch({}, {"a": {"b": 1, "c": 2}, "d": 3}, {}, 10)
    assert meta == {"/a/b": 10, "/a/c": 10, "/d": 10}
    doc, meta = merge_patch(doc, {"a": {"b": None, "e": [1, 2]}, "d": None}, meta, 20)
    assert doc == {"a": {"c": 2, "e": [1, 2]}}
    assert meta == {"/a/c": 10, "/a/e": 20}
    doc, meta = merge_patch(doc, {"a": 5}, meta, 30)  # an object replaced by a scalar: its members' times go
    assert doc == {"a": 5} and meta == {"/a": 30}


def test_pointers_escape_names() -> None:
    assert leaf_pointers({"a/b": 1, "c~d": {"e": 2}}) == ["/a~1b", "/c~0d/e"]


def test_limits() -> None:
    assert check_document({"a": 1}, key="desired") == len('{"a":1}')
    with pytest.raises(TwinTooLarge) as exc:
        check_document({"a": "x" * 9000}, key="desired")
    assert exc.value.size > exc.value.limit == 8192
    deep: dict[str, Any] = {}
    cur = deep
    for _ in range(9):
        cur["n"] = {}
        cur = cur["n"]
    with pytest.raises(TwinInvalid, match="levels deep"):
        check_document(deep, key="desired")
    with pytest.raises(TwinInvalid, match="JSON object"):
        check_document([1], key="desired")
    with pytest.raises(TwinInvalid, match="not JSON"):
        check_document({"a": float("nan")}, key="desired")


def test_delta_doc_has_the_metadata_of_its_members() -> None:
    desired, dmeta = merge_patch({}, {"a": 1, "b": {"c": 2, "d": 3}}, {}, 5)
    t = Twin("pump-1", 4, desired, {"a": 1, "b": {"c": 2}}, dmeta, {})
    assert t.delta_doc() == {"device_id": "pump-1", "version": 4, "delta": {"b": {"d": 3}},
                             "metadata": {"/b/d": 5}}


def test_topics() -> None:
    assert device_of_twin_topic("devices/p-1/twin/reported") == ("p-1", "reported")
    assert device_of_twin_topic("devices/p.1/twin/reported") is None
    assert device_of_twin_topic("devices/p-1/twin/other") is None
    for leaf in ("desired", "reported", "delta", "get"):
        assert route_of_topic(f"devices/p-1/twin/{leaf}").kind == "side"  # the gateway lets them be
    assert route_of_topic("devices/p-1/twin/x").kind == "unknown"


def _depth_oracle(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max((_depth_oracle(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((_depth_oracle(x) for x in v), default=0)
    return 0


@settings(max_examples=300, deadline=None)
@given(values)
def test_depth_matches_the_recursive_definition(v: Any) -> None:
    from fieldmesh.core.twins import depth

    assert depth(v) == _depth_oracle(v)


def test_depth_of_a_very_deep_document_is_measured() -> None:
    from fieldmesh.core.twins import depth

    deep: Any = 1
    for _ in range(100_000):  # far past the recursion limit
        deep = {"n": deep}
    assert depth(deep) == 100_000
