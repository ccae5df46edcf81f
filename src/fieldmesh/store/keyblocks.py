"""The folded identity keys of SQLite's hot store: sorted blocks of packed keys in ``idents_blocks``.

Why blocks and not a row per key: a fold moves a generation of keys (from ``idents_recent``) into the table in
key order. As rows of a keyed B-tree (``idents``, until schema 6), each key was an insert through SQLite (about
1.3 µs a key: 1.33 of 10.3 CPU-s of ``bench/processor.py``, docs/benchmarks.md). As blocks, a fold slice reads
the blocks its keys fall in, merges them with numpy and writes them back: a few rows a commit, each a blob of up
to ``BLOCK_KEYS`` keys. The pages written are about the same (a generation adds keys all over the key space, so
each leaf of the B-tree was dirtied once per generation too); the per-key work is gone.

A block's row: ``lo`` (its smallest id, the primary key) and ``keys``, its keys in id order as int64
little-endian triples ``(id, chk, origin)`` (origin -1: none; key by key, so that the blocks a lookup reads, in
``lo`` order, join into one sorted array). Block ``i`` holds every folded id in ``[lo_i, lo_{i+1})``. The writer
keeps the ``lo`` column in memory (8 bytes a block), so a lookup reads only the blocks its keys can be in, by
primary key, and answers them all with one binary search.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable
from typing import Final

import msgspec
import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.errors import FieldmeshError

__all__ = ["BLOCK_KEYS", "KeyBlocks", "pack_block", "pack_keys", "unpack_block", "unpack_keys"]

_I64 = NDArray[np.int64]

#: Keys a block holds at most (24 bytes each). A lookup reads a whole block; a fold slice rewrites the blocks its
#: keys fall in, and the block on each edge of the slice once more (the next slice starts in it). 128 keys (3 KB)
#: fit a 4 KB page: a larger block is a chain of overflow pages. The lookups of ``bench/processor.py`` (about 850
#: keys, duplicates, in 700-900 blocks) took 10-17 ms with blocks of 512 keys, 3.5-6 ms with 128.
BLOCK_KEYS: Final = 128
#: A fold slice is merged into at most this many blocks at a time (about 64k keys).
_MERGE_BLOCKS: Final = 512
#: Blocks read by one statement at most (their ``lo``s go in as a JSON array).
_READ_MAX: Final = 2000
_COLUMNS: Final = 3  # id, chk, origin
_enc = msgspec.json.Encoder()


def pack_keys(ids: _I64, chks: _I64, origins: _I64) -> bytes:
    """Keys packed as a row of ``idents_recent``: the ids, then the chks, then the origins (-1: none)."""
    return np.concatenate((ids, chks, origins)).astype("<i8", copy=False).tobytes()


def unpack_keys(blob: bytes) -> tuple[_I64, _I64, _I64]:
    """(ids, chks, origins) of a packed row (see :func:`pack_keys`)."""
    if len(blob) % (8 * _COLUMNS):
        raise FieldmeshError(f"a row of {len(blob)} bytes of identity keys: not whole keys (the store is damaged)")
    a = np.frombuffer(blob, dtype="<i8").astype(np.int64).reshape(_COLUMNS, -1)
    return a[0], a[1], a[2]


def pack_block(ids: _I64, chks: _I64, origins: _I64) -> bytes:
    """A row of ``idents_blocks``: the keys (ids ascending) as int64 little-endian ``(id, chk, origin)`` triples."""
    return np.stack((ids, chks, origins), axis=1).astype("<i8", copy=False).tobytes()


def unpack_block(blob: bytes) -> NDArray[np.int64]:
    """The keys of one or more blocks' ``keys`` joined: an array of rows ``(id, chk, origin)``."""
    if len(blob) % (8 * _COLUMNS):
        raise FieldmeshError(f"identity blocks of {len(blob)} bytes: not whole keys (the store is damaged)")
    return np.frombuffer(blob, dtype="<i8").astype(np.int64).reshape(-1, _COLUMNS)


class KeyBlocks:
    """The blocks' ``lo`` column in memory and the reads and writes of ``idents_blocks`` (in the caller's
    transaction). :meth:`merge` returns the ``lo`` column after it; the caller adopts it once its transaction
    commits (:attr:`los`), so a rolled-back fold leaves the memory as the table."""

    def __init__(self, los: _I64 | None = None) -> None:
        self.los: _I64 = np.zeros(0, dtype=np.int64) if los is None else los

    @classmethod
    def load(cls, w: sqlite3.Connection, each: Callable[[_I64], object] | None = None) -> tuple[KeyBlocks, int]:
        """The blocks of the table and how many keys they hold; ``each`` (if given) is called with the ids of the
        blocks, a few hundred blocks at a time (streamed: the keys are not all held in memory at once)."""
        los: list[int] = []
        n = 0
        cur = w.execute("SELECT lo, keys FROM idents_blocks ORDER BY lo")
        while rows := cur.fetchmany(256):
            keys = unpack_block(b"".join(r[1] for r in rows))
            sizes = [len(r[1]) // (8 * _COLUMNS) for r in rows]
            starts = np.cumsum([0, *sizes[:-1]])
            got = [r[0] for r in rows]
            if min(sizes) == 0 or keys[starts, 0].tolist() != got:
                raise FieldmeshError("an identity block does not start at its lo (the store is damaged)")
            los += got
            n += len(keys)
            if each is not None:
                each(np.ascontiguousarray(keys[:, 0]))
        return cls(np.array(los, dtype=np.int64)), n

    def find(self, w: sqlite3.Connection, keys: _I64) -> tuple[NDArray[np.bool_], _I64, _I64]:
        """Per key: whether a block holds it, and its chk and origin there (-1 where not held)."""
        hit = np.zeros(len(keys), dtype=bool)
        chk = np.full(len(keys), -1, dtype=np.int64)
        origin = np.full(len(keys), -1, dtype=np.int64)
        if not len(keys) or not len(self.los):
            return hit, chk, origin
        at = np.searchsorted(self.los, keys, side="right") - 1  # the one block each key can be in (-1: none)
        want = self.los[np.unique(at[at >= 0])].tolist()
        blobs: list[bytes] = []
        for s in range(0, len(want), _READ_MAX):
            blobs += [r[0] for r in w.execute(
                "SELECT keys FROM idents_blocks WHERE lo IN (SELECT value FROM json_each(?)) ORDER BY lo",
                (_enc.encode(want[s : s + _READ_MAX]).decode(),),
            )]
        held = unpack_block(b"".join(blobs))  # the blocks in lo order: one sorted array
        if not len(held):
            return hit, chk, origin
        pos = np.minimum(np.searchsorted(held[:, 0], keys), len(held) - 1)
        hit = held[pos, 0] == keys
        chk[hit] = held[pos[hit], 1]
        origin[hit] = held[pos[hit], 2]
        return hit, chk, origin

    def merge(self, w: sqlite3.Connection, ids: _I64, chks: _I64, origins: _I64) -> _I64:
        """Add keys (sorted by id, none held yet) to the blocks their ids fall in; return the ``lo`` column after.

        The blocks from the one the smallest id falls in to the one of the largest are read, merged with the
        keys and written again as blocks of at most :data:`BLOCK_KEYS` keys of about equal size, at most
        :data:`_MERGE_BLOCKS` blocks at a time: a fold slice of a large store spans hundreds of thousands of
        keys, and merged at once their copies (read, joined, unpacked, sorted, packed) held about 100 MB for a
        moment at 30 million keys.
        """
        if not len(ids):
            return self.los
        los = self.los
        if not len(los):
            return self._merge_range(w, 0, -1, ids, chks, origins)
        at = np.maximum(np.searchsorted(los, ids, side="right") - 1, 0)  # the block each key falls in
        first, last = int(at[0]), int(at[-1])
        parts = [los[:first]]
        for b in range(first, last + 1, _MERGE_BLOCKS):
            e = min(b + _MERGE_BLOCKS, last + 1)  # blocks b..e-1
            i, j = int(np.searchsorted(at, b)), int(np.searchsorted(at, e))
            parts.append(self._merge_range(w, b, e - 1, ids[i:j], chks[i:j], origins[i:j]) if i < j
                         else los[b:e])
        parts.append(los[last + 1 :])
        return np.concatenate(parts)

    def _merge_range(self, w: sqlite3.Connection, first: int, last: int, ids: _I64, chks: _I64,
                     origins: _I64) -> _I64:
        """Merge keys into blocks ``first..last`` (none: ``last < first``); return the new blocks' ``lo``."""
        old = self.los[first : last + 1].tolist()
        keys = np.stack((ids, chks, origins), axis=1).astype(np.int64, copy=False)
        if old:  # the blocks first..last: a range of lo
            blobs = [r[0] for r in w.execute(
                "SELECT keys FROM idents_blocks WHERE lo BETWEEN ? AND ? ORDER BY lo", (old[0], old[-1]))]
            if len(blobs) != len(old):
                raise FieldmeshError(f"identity blocks {old[0]}..{old[-1]}: {len(blobs)} of {len(old)} found"
                                     " (the store is damaged)")
            keys = np.concatenate((keys, unpack_block(b"".join(blobs))))
            del blobs
        keys = keys[np.argsort(keys[:, 0], kind="stable")]  # C-contiguous rows (id, chk, origin)
        if len(keys) > 1 and not np.all(np.diff(keys[:, 0])):
            raise FieldmeshError("a key folded into the identity blocks is held already")
        packed = keys.astype("<i8", copy=False)
        cuts = np.linspace(0, len(keys), -(-len(keys) // BLOCK_KEYS) + 1).astype(np.int64).tolist()
        new_los: _I64 = np.ascontiguousarray(keys[cuts[:-1], 0])
        rows = [(lo, packed[a:b].tobytes()) for lo, (a, b) in zip(new_los.tolist(), itertools.pairwise(cuts),
                                                                  strict=True)]
        if old:
            w.execute("DELETE FROM idents_blocks WHERE lo BETWEEN ? AND ?", (old[0], old[-1]))
        w.executemany("INSERT INTO idents_blocks (lo, keys) VALUES (?, ?)", rows)
        return new_los
