"""The identity keys of a SQLite hot store's ``idents_recent`` as rows, read apart from the store's code.

Since schema version 5 a row of ``idents_recent`` holds the keys one commit claimed, packed: int64
little-endian, the ids, then their chks, then their origins (-1: none). The tests read them here, and make
the older shapes from them (one identity table before version 4; a row per key in version 4).
"""

from __future__ import annotations

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


def fold_recent_by_hand(con: sqlite3.Connection) -> None:
    """One identity table, as before version 4: the keys of ``idents_recent`` not in ``idents`` moved there
    (a key of a generation being folded is in both), the table dropped (the caller commits)."""
    con.executemany("INSERT OR IGNORE INTO idents VALUES (?, ?, ?)", [k[1:] for k in recent_keys(con)])
    con.execute("DROP TABLE idents_recent")


def unpack_recent(con: sqlite3.Connection, *, keyed: bool = False) -> dict[int, int]:
    """``idents_recent`` as version 4 had it: a row per key, in arrival order (``keyed``: by ``id``, as version
    4 was first made). Returns, for each packed row's n, the n of its last key now (to move the marks in ``meta``
    with the rows). The caller commits."""
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
