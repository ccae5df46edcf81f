"""Sequence-gap arithmetic shared by the hot stores (pure functions).

A device numbers its readings with ``seq`` within one ``boot_id``. Loss upstream of fieldmesh (a
broker dropping queued messages, an edge buffer overflowing) shows as holes in that numbering.
For each ``(device_id, boot_id)`` a store keeps a range ``[min_seq, max_seq, n]``, where ``n`` is
the number of distinct seqs stored; its gaps are ``(max_seq - min_seq + 1) - n``.

``n`` grows by the seqs a batch adds. A reading without ``event_id`` has ``(device_id, boot_id,
seq)`` as its identity (:mod:`fieldmesh.core.identity`, which every ``Reading.key`` comes from), so
one that de-duplication found new brings a seq no such reading brought before: while a key has
only such readings, the count of its new readings is its count of new seqs, with no per-reading
bookkeeping. Readings with ``event_id`` break that: two identities may
carry one seq. From the first of them on, a key is *listed*: every seq it stores is kept in the
store's seq set (a plain key's seqs are copied in from its readings at that moment) and only the
triples the set did not hold add to ``n``. Either way a seq counts once, ``n`` never exceeds the
span and gaps are never negative; a late reading that fills a hole adds to ``n`` without widening
the span, so the gap is uncounted again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fieldmesh.core.batch import ReadingColumns

__all__ = ["SeqBatch", "SeqKey", "SeqRange", "listing", "merge_ranges", "range_gaps", "seq_batch", "seq_spans"]

SeqKey = tuple[str, str]
"""(device_id, boot_id); a reading without ``boot_id`` has boot ``""``, as in its identity."""
SeqRange = tuple[int, int, int]
"""(min_seq, max_seq, n distinct seqs)"""


@dataclass(frozen=True, slots=True)
class SeqBatch:
    """The seqs of a batch's new readings: ``(device_id, boot_id, seq)`` in order, the keys of those
    among them that carry an ``event_id``, and per key ``[lowest seq, highest seq, number of triples]``
    (what :func:`seq_spans` gives)."""

    triples: list[tuple[str, str, int]]
    with_event: set[SeqKey]
    spans: dict[SeqKey, list[int]] = field(default_factory=dict)


def seq_batch(new: ReadingColumns) -> SeqBatch:
    """The :class:`SeqBatch` of new readings (numpy selects the rows with a seq and reduces them per key)."""
    rows = np.flatnonzero(new.seq >= 0)
    if not len(rows):
        return SeqBatch([], set())
    dev_of = np.array(new.devices, dtype=object)
    boot_of = np.array((*new.boots, ""), dtype=object)  # code -1 (none) picks the trailing ""
    dcode, bcode, seq = new.device[rows], new.boot[rows], new.seq[rows]
    devs, boots = dev_of[dcode], boot_of[bcode]
    triples = list(zip(devs.tolist(), boots.tolist(), seq.tolist(), strict=True))
    with_event: set[SeqKey] = set()
    if new.event_id is not None:
        ev = np.flatnonzero(new.event_id[rows] != None)  # noqa: E711 (element-wise)
        with_event = set(zip(devs[ev].tolist(), boots[ev].tolist(), strict=True))
    code = dcode.astype(np.int64) * (len(new.boots) + 1) + (bcode.astype(np.int64) + 1)
    order = np.argsort(code, kind="stable")
    sc = code[order]
    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]])
    ss = seq[order]
    first = order[starts]  # a row of each key, for its names
    spans = dict(zip(
        zip(devs[first].tolist(), boots[first].tolist(), strict=True),
        map(list, zip(np.minimum.reduceat(ss, starts).tolist(), np.maximum.reduceat(ss, starts).tolist(),
                      np.diff(np.r_[starts, len(sc)]).tolist(), strict=True)),
        strict=True,
    ))  # fmt: skip
    return SeqBatch(triples, with_event, spans)


def listing(
    new: SeqBatch, listed: Mapping[SeqKey, bool]
) -> tuple[list[tuple[str, str, int]], dict[SeqKey, int], set[SeqKey], set[SeqKey]]:
    """Sort a batch's seqs by how a store must count them.

    Args:
        new: the seqs of the readings de-duplication found new.
        listed: per key with a stored range, whether its seqs are in the seq set.

    Returns:
        ``(to_list, plain, start, backfill)``: the triples to add to the seq set (each new one
        counts); per plain key, its number of new seqs; the keys listed from now on; and among
        them the keys with a range already, whose stored seqs must be copied into the set first.
    """
    with_event = new.with_event
    if new.spans and not with_event and not any(map(listed.get, new.spans)):  # no key listed: counts suffice
        return [], {k: v[2] for k, v in new.spans.items()}, set(), set()
    triples: dict[SeqKey, list[int]] = {}
    for d, b, s in new.triples:
        triples.setdefault((d, b), []).append(s)
    to_list: list[tuple[str, str, int]] = []
    plain: dict[SeqKey, int] = {}
    start: set[SeqKey] = set()
    for k, seqs in triples.items():
        was = listed.get(k)
        if was or k in with_event:
            to_list += [(k[0], k[1], s) for s in seqs]
            if not was:
                start.add(k)
        else:
            plain[k] = len(seqs)
    return to_list, plain, start, {k for k in start if k in listed}


def seq_spans(triples: Iterable[tuple[str, str, int]]) -> dict[SeqKey, list[int]]:
    """Per key, ``[lowest seq, highest seq, number of triples]`` of a batch."""
    spans: dict[SeqKey, list[int]] = {}
    for d, b, s in triples:
        a = spans.get((d, b))
        if a is None:
            spans[(d, b)] = [s, s, 1]
        else:
            if s < a[0]:
                a[0] = s
            elif s > a[1]:
                a[1] = s
            a[2] += 1
    return spans


def range_gaps(rng: SeqRange | None) -> int:
    """Missing seqs inside a range."""
    return 0 if rng is None else rng[1] - rng[0] + 1 - rng[2]


def merge_ranges(
    spans: Mapping[SeqKey, Sequence[int]], added: Mapping[SeqKey, int], old: Mapping[SeqKey, SeqRange]
) -> tuple[dict[SeqKey, SeqRange], int]:
    """Fold a batch's seqs into the ranges they touch.

    A seq the store held already lies inside its stored range, so widening a range by the whole
    batch's span and adding only the new seqs to ``n`` is exact.

    Args:
        spans: per key, the lowest and highest seq of the batch (:func:`seq_spans`).
        added: per key, how many of the batch's seqs the store's seq set did not hold yet.
        old: the stored ranges of (at least) the keys in ``added``.

    Returns:
        The new range of every key with seqs added, and the change in total gaps.
    """
    out: dict[SeqKey, SeqRange] = {}
    delta = 0
    for k, n in added.items():
        if n <= 0:
            continue
        lo, hi = spans[k][0], spans[k][1]
        o = old.get(k)
        new = (lo, hi, n) if o is None else (min(o[0], lo), max(o[1], hi), o[2] + n)
        out[k] = new
        delta += range_gaps(new) - range_gaps(o)
    return out, delta
