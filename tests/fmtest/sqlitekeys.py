"""The identity keys of a SQLite hot store's ``idents_recent`` and ``idents_blocks`` as rows, read apart from
the store's code.

Since schema version 5 a row of ``idents_recent`` holds the keys one commit claimed, packed: int64
little-endian, the ids, then their chks, then their origins (-1: none). Since version 6 the folded keys are
rows of ``idents_blocks``, packed key by key as ``(id, chk, origin)`` triples (ids ascending, ``lo`` the first),
instead of ``idents`` (a row per key).
The tests read them here, and make the older shapes from them (``idents`` a row per key before version 6, and
one identity table before version 4; ``idents_recent`` a row per key in version 4).
"""

from __future__ import annotations

import itertools
import sqlite3

import numpy as np


def recent_keys(con: sqlite3.Connection) -> list[tuple[int, int, int, int | None]]:
    """(n, id, chk, origin) of every key in ``idents_recent``, in arrival order."""
    out: list[tuple[int, int, int, int | None]] = []
    for n, blob in con.execute("SELECT n, keys FROM idents_recent ORDER BY n"):
        assert len(blob) % 24 == 0, f"row {n}: {len(blob)} bytes, not whole keys"
        ids, chks, origins = np.frombuffer(blob, dtype="<i8").reshape(3, -1).tolist()
        out += [(n, i, c, None if o < 0 else o) for i, c, o in zip(ids, chks, origins, strict=True)]
    return out


def _unpack_block(blob: bytes, what: str) -> list[tuple[int, int, int | None]]:
    assert len(blob) % 24 == 0, f"{what}: {len(blob)} bytes, not whole keys"
    return [(i, c, None if o < 0 else o) for i, c, o in np.frombuffer(blob, dtype="<i8").reshape(-1, 3).tolist()]


def main_keys(con: sqlite3.Connection) -> dict[int, tuple[int, int | None]]:
    """id -> (chk, origin) of every folded key: of ``idents_blocks`` (``idents`` in a store made older by hand).
    Checks that each block starts at its ``lo`` and that blocks hold disjoint ranges in ``lo`` order."""
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "idents" in tables:
        return {i: (c, o) for i, c, o in con.execute("SELECT id, chk, origin FROM idents")}
    out: dict[int, tuple[int, int | None]] = {}
    last = -(2**63)
    for lo, blob in con.execute("SELECT lo, keys FROM idents_blocks ORDER BY lo"):
        keys = _unpack_block(blob, f"block {lo}")
        assert keys and keys[0][0] == lo and lo > last, f"block {lo} does not start at its lo, after {last}"
        assert all(a[0] < b[0] for a, b in itertools.pairwise(keys)), f"block {lo}: ids not ascending"
        last = keys[-1][0]
        out.update((i, (c, o)) for i, c, o in keys)
    return out


def blocks_to_rows(con: sqlite3.Connection) -> None:
    """``idents`` as before version 6, a row per folded key, made from ``idents_blocks`` (dropped; the caller
    commits and sets the version)."""
    keys = main_keys(con)
    con.execute("DROP TABLE idents_blocks")
    con.execute("CREATE TABLE idents (id INTEGER PRIMARY KEY, chk INTEGER NOT NULL, origin INTEGER)")
    con.executemany("INSERT INTO idents VALUES (?, ?, ?)", [(i, c, o) for i, (c, o) in sorted(keys.items())])


def fold_recent_by_hand(con: sqlite3.Connection) -> None:
    """One identity table, as before version 4: the keys of ``idents_blocks`` and ``idents_recent`` in ``idents``
    (a key of a generation being folded is in both), the other tables dropped (the caller commits)."""
    blocks_to_rows(con)
    con.executemany("INSERT OR IGNORE INTO idents VALUES (?, ?, ?)", [k[1:] for k in recent_keys(con)])
    con.execute("DROP TABLE idents_recent")


def unpack_recent(con: sqlite3.Connection, *, keyed: bool = False) -> dict[int, int]:
    """``idents_recent`` as version 4 had it: a row per key, in arrival order (``keyed``: by ``id``, as version
    4 was first made). Returns, for each packed row's n, the n of its last key now (to move the marks in ``meta``
    with the rows); ``idents`` a row per folded key, as then. The caller commits."""
    blocks_to_rows(con)
    keys = recent_keys(con)
    con.execute("DROP TABLE idents_recent")
    last: dict[int, int] = {}
    if keyed:
        con.execute("CREATE TABLE idents_recent (id INTEGER PRIMARY KEY, chk INTEGER NOT NULL, origin INTEGER)")
        con.executemany("INSERT INTO idents_recent VALUES (?, ?, ?)", [k[1:] for k in keys])
        return last
    con.execute("CREATE TABLE idents_recent (n INTEGER PRIMARY KEY, id INTEGER NOT NULL, chk INTEGER NOT NULL,"
                " origin INTEGER)")
    for i, (n, *key) in enumerate(keys, start=1):
        con.execute("INSERT INTO idents_recent VALUES (?, ?, ?, ?)", (i, *key))
        last[n] = i
    return last
