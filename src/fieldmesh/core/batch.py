"""Pure value types of the hot path: a batch of readings as columns (no I/O).

:class:`ReadingColumns` holds a batch of validated readings as numpy arrays, one row per reading in
arrival order, so later stages de-duplicate, window and aggregate with array operations instead of a
Python object per reading. It is what the version-2 bus encoding carries
(:func:`fieldmesh.core.codec.decode_bus_columns`); :meth:`ReadingColumns.from_readings` and
:meth:`ReadingColumns.to_readings` convert to and from :class:`~fieldmesh.core.model.Reading` for the
version-1 wire and for code that still works per reading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Any, Final

import msgspec
import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.model import DeadLetter, Reading

__all__ = [
    "CLAIMED", "COLLISION", "DUPLICATE", "BatchResult", "DeviceDeltas", "Position", "ReadingColumns", "WindowDeltas",
    "origin_of", "reading_fields",
]

Position = tuple[str, int]
"""(topic, partition)"""

#: Answers of a key claim (:class:`fieldmesh.store.base.HotTxn`): stored now, stored before with the
#: same check value, or held by another reading (a 63-bit key collision: probe the next key).
CLAIMED: Final = 0
DUPLICATE: Final = 1
COLLISION: Final = 2


def origin_of(offset: int, partition: int) -> int:
    """The origin of a reading: the bus record it came in (``(offset << 12) | partition``).

    A key whose stored origin equals the claimant's answers CLAIMED again, so re-deciding records that
    were committed (a lagging sink catching up, a replay) decides exactly as the first time.
    """
    return (offset << 12) | partition

_json = msgspec.json.Encoder()
_measurements_list = msgspec.json.Decoder(list[dict[str, float | bool]])
_NONE: Final = -1


def _objects(values: Sequence[Any]) -> NDArray[np.object_]:
    """A 1-d object array of ``values`` (``np.array`` would try to nest lists and dicts)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _optional(values: Sequence[Any]) -> NDArray[np.object_] | None:
    return None if values.count(None) == len(values) else _objects(values)  # type: ignore[attr-defined]


def _json_texts(objects: list[dict[str, Any]]) -> list[str]:
    """The JSON text of each of ``objects`` (dicts), as the encoder gives each: from one encode of the whole list.

    The list encodes as ``[`` then the objects' texts joined by ``,`` then ``]``, so two consecutive objects meet at
    ``},{``. Those are replaced by ``}`` RS ``{`` (RS, U+001E, is a control character: JSON escapes it inside
    strings, so the encoder's output holds none) and the text is split at RS. ``},{`` inside a string or a nested
    value makes more pieces than objects; then each object is encoded on its own. One encode and three string
    calls cost about 120 ns an object of one metric against 170, and 254 an object of three against 334.
    """
    n = len(objects)
    texts = _json.encode(objects).decode()[1:-1].replace("},{", "}\x1e{").split("\x1e")
    if len(texts) == n:
        return texts
    return list(map(bytes.decode, map(_json.encode, objects)))


#: A getter of each field of :class:`Reading`, in order (the arguments of :meth:`ReadingColumns.from_fields`).
_FIELDS: Final = tuple(map(attrgetter, Reading.__struct_fields__))


def reading_fields(readings: Sequence[Reading]) -> list[list[Any]]:
    """``readings`` field by field (a list per field of :class:`Reading`, in order: the arguments of
    :meth:`ReadingColumns.from_fields`). Each field is read over all readings by a C iterator (``map`` of an
    attribute getter): no Python frame and no tuple per reading."""
    return [list(map(get, readings)) for get in _FIELDS]


def _codes(values: Sequence[str | None], dictionary: tuple[str, ...]) -> NDArray[np.int32]:
    """Codes of ``values`` in ``dictionary`` (None: -1)."""
    index: dict[str | None, int] = {s: i for i, s in enumerate(dictionary)}
    index[None] = _NONE
    return np.fromiter(map(index.__getitem__, values), np.int32, len(values))


@dataclass(frozen=True, slots=True, eq=False)
class ReadingColumns:
    """Readings as columns: row ``i`` of every per-row array is reading ``i``, in arrival order.

    Strings that repeat (device ids, boot ids, metric names) are dictionaries plus int32 codes.
    Measurements are kept twice: ``measurements_json`` is each reading's measurements exactly as the
    stores write them (insertion order, bools as ``true``/``false``), and the long format
    (``m_row``, ``m_metric``, ``m_value``: one entry per reading and metric, grouped by row in row
    order, bools as 0.0/1.0) is what windows aggregate.
    """

    devices: tuple[str, ...]
    device: NDArray[np.int32]
    ts_ms: NDArray[np.int64]
    received_ms: NDArray[np.int64]
    key: NDArray[np.int64]  # identity digest halves (key < 2**63)
    chk: NDArray[np.int64]
    seq: NDArray[np.int64]  # -1: none (seq >= 0 by contract)
    boots: tuple[str, ...]
    boot: NDArray[np.int32]  # -1: none
    event_id: NDArray[np.object_] | None  # None: no reading has one
    meta: NDArray[np.object_] | None
    enrichment: NDArray[np.object_] | None
    measurements_json: NDArray[np.object_]  # str per row
    metrics: tuple[str, ...]
    m_row: NDArray[np.int32]
    m_metric: NDArray[np.int32]
    m_value: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.ts_ms)

    @classmethod
    def from_readings(cls, readings: Sequence[Reading]) -> ReadingColumns:
        """Columns of ``readings`` (for the version-1 wire, the gateway and tests).

        Each field is read over all readings by a C iterator (``map`` of an attribute getter): no Python
        frame and no tuple per reading. A tuple per reading (``astuple``) is a container the garbage
        collector tracks; tens of thousands of them per batch made collections about a quarter of the cost.
        """
        if not readings:
            return _EMPTY
        return cls.from_fields(*reading_fields(readings))

    @classmethod
    def from_fields(
        cls, device_ids: list[str], ts_ms: list[int], measurements: list[dict[str, float | bool]], key: list[int],
        chk: list[int], seq: list[int | None], boot_ids: list[str | None], event_ids: list[str | None],
        metas: list[dict[str, Any] | None], received_ms: list[int], enrichments: list[dict[str, Any] | None],
    ) -> ReadingColumns:
        """Columns of readings given field by field (the fields of :class:`Reading`, one list each).

        For a producer that has its readings as lists already (the gateway's bulk decoding), which then
        need not make a :class:`Reading` per reading.
        """
        n = len(ts_ms)
        if not n:
            return _EMPTY
        names = list(chain.from_iterable(measurements))
        return cls(
            devices=(dev_dict := tuple(dict.fromkeys(device_ids))),
            device=_codes(device_ids, dev_dict),
            ts_ms=np.array(ts_ms, dtype=np.int64),
            received_ms=np.array(received_ms, dtype=np.int64),
            key=np.array(key, dtype=np.int64),
            chk=np.array(chk, dtype=np.int64),
            seq=np.array([_NONE if s is None else s for s in seq] if None in seq else seq, dtype=np.int64),
            boots=(boot_dict := tuple(b for b in dict.fromkeys(boot_ids) if b is not None)),
            boot=_codes(boot_ids, boot_dict),
            event_id=_optional(event_ids),
            meta=_optional(metas),
            enrichment=_optional(enrichments),
            measurements_json=_objects(_json_texts(measurements)),
            metrics=(metric_dict := tuple(dict.fromkeys(names))),
            m_row=np.repeat(np.arange(n, dtype=np.int32), np.fromiter(map(len, measurements), np.intp, n)),
            m_metric=_codes(names, metric_dict),
            m_value=np.fromiter(chain.from_iterable(map(dict.values, measurements)), np.float64, len(names)),
        )

    def to_readings(self) -> list[Reading]:
        """The readings of these columns (equal, field by field, to those they were made from)."""
        n = len(self)
        if not n:
            return []
        measurements = _measurements_list.decode(("[" + ",".join(self.measurements_json.tolist()) + "]").encode())
        devices = _objects(self.devices)[self.device].tolist()
        boot_of = _objects((*self.boots, None))  # code -1 picks the trailing None
        boot_ids = boot_of[self.boot].tolist()
        seqs = self.seq.tolist()
        if self.seq.min() < 0:
            seqs = [None if s < 0 else s for s in seqs]
        nones = [None] * n
        event_ids = nones if self.event_id is None else self.event_id.tolist()
        metas = nones if self.meta is None else self.meta.tolist()
        enrichments = nones if self.enrichment is None else self.enrichment.tolist()
        # map() calls the struct's constructor from C: no Python frame per reading
        return list(map(
            Reading, devices, self.ts_ms.tolist(), measurements, self.key.tolist(), self.chk.tolist(), seqs,
            boot_ids, event_ids, metas, self.received_ms.tolist(), enrichments,
        ))

    def take(self, rows: NDArray[np.intp]) -> ReadingColumns:
        """The readings at ``rows`` (distinct row numbers), in that order; dictionaries are kept."""
        rows = np.asarray(rows, dtype=np.intp)
        new_of = np.full(len(self), -1, dtype=np.intp)
        new_of[rows] = np.arange(len(rows))
        m_new = new_of[self.m_row]
        keep = np.flatnonzero(m_new >= 0)
        # long entries grouped by their new row: already so when ``rows`` ascend (de-duplication's case)
        ascending = len(rows) < 2 or bool((rows[1:] > rows[:-1]).all())
        order = keep if ascending else keep[np.argsort(m_new[keep], kind="stable")]

        def pick(a: NDArray[np.object_] | None) -> NDArray[np.object_] | None:
            return None if a is None else a[rows]

        return ReadingColumns(
            self.devices, self.device[rows], self.ts_ms[rows], self.received_ms[rows], self.key[rows],
            self.chk[rows], self.seq[rows], self.boots, self.boot[rows], pick(self.event_id), pick(self.meta),
            pick(self.enrichment), self.measurements_json[rows], self.metrics,
            m_new[order].astype(np.int32), self.m_metric[order], self.m_value[order],
        )

    @classmethod
    def concat(cls, parts: Sequence[ReadingColumns]) -> ReadingColumns:
        """One batch of ``parts`` in order; dictionaries are merged and codes remapped."""
        if len(parts) <= 1:
            return parts[0] if parts else cls.from_readings([])
        devs: dict[str, int] = {}
        boots: dict[str, int] = {}
        metrics: dict[str, int] = {}

        def remap(names: tuple[str, ...], into: dict[str, int], codes: NDArray[np.int32]) -> NDArray[np.int32]:
            table = np.array([into.setdefault(s, len(into)) for s in names] + [_NONE], dtype=np.int32)
            return table[codes]  # -1 indexes the trailing -1: none stays none

        device = [remap(p.devices, devs, p.device) for p in parts]
        boot = [remap(p.boots, boots, p.boot) for p in parts]
        m_metric = [remap(p.metrics, metrics, p.m_metric) for p in parts]
        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])

        def objects(name: str) -> NDArray[np.object_] | None:
            cols = [getattr(p, name) for p in parts]
            if all(c is None for c in cols):
                return None
            return np.concatenate([np.full(len(p), None, dtype=object) if c is None else c
                                   for p, c in zip(parts, cols, strict=True)])

        return cls(
            tuple(devs), np.concatenate(device),
            np.concatenate([p.ts_ms for p in parts]), np.concatenate([p.received_ms for p in parts]),
            np.concatenate([p.key for p in parts]), np.concatenate([p.chk for p in parts]),
            np.concatenate([p.seq for p in parts]), tuple(boots), np.concatenate(boot),
            objects("event_id"), objects("meta"), objects("enrichment"),
            np.concatenate([p.measurements_json for p in parts]), tuple(metrics),
            np.concatenate([(p.m_row + o).astype(np.int32) for p, o in zip(parts, offsets, strict=True)]),
            np.concatenate(m_metric), np.concatenate([p.m_value for p in parts]),
        )


@dataclass(frozen=True, slots=True, eq=False)
class WindowDeltas:
    """Exact deltas of one interval: one entry per (device, metric, window_start_ms) touched by a batch.

    ``sum_m[i] * 2**sum_e[i]`` is the exact sum (:mod:`fieldmesh.core.exact`; ``sum_m`` holds Python
    ints, which may exceed 64 bits). Entries are sorted by (device, metric, window_start_ms).
    """

    interval: str
    width_ms: int
    device: NDArray[np.object_]  # str
    metric: NDArray[np.object_]  # str
    window_start_ms: NDArray[np.int64]
    count: NDArray[np.int64]
    sum_m: NDArray[np.object_]  # int
    sum_e: NDArray[np.int64]
    min: NDArray[np.float64]
    max: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.window_start_ms)


@dataclass(frozen=True, slots=True, eq=False)
class DeviceDeltas:
    """Per device of a batch's new readings: received and event-time ranges, count; the metrics seen."""

    device: NDArray[np.object_]  # str, sorted
    first_received_ms: NDArray[np.int64]
    last_received_ms: NDArray[np.int64]
    first_ts_ms: NDArray[np.int64]
    last_ts_ms: NDArray[np.int64]
    count: NDArray[np.int64]
    metric_pairs: tuple[tuple[str, str], ...]  # (device, metric), sorted

    def __len__(self) -> int:
        return len(self.device)


@dataclass(frozen=True, slots=True, eq=False)
class BatchResult:
    """What one committed batch decided. Every sink receives it and records ``positions`` with its data.

    ``counts`` are the durable counters the batch adds: ``stored``, ``duplicates``, ``late`` and
    ``dlq.<reason>`` (the hot store adds ``gaps``); ``corrupt`` is for in-process stats only.
    """

    positions: Mapping[Position, int]  # last offset per (topic, partition) covered (readings, DLQ, corrupt)
    watermarks: Mapping[Position, int]  # partition event-time watermarks after the batch
    device_watermarks: Mapping[str, int]  # devices whose watermark this batch advanced, and to what
    new: ReadingColumns  # readings stored for the first time, in arrival order
    store_key: NDArray[np.int64]  # the key each was claimed under (differs from new.key only after a collision)
    late: NDArray[np.bool_]  # per new reading: its 1m window had already been emitted for its device
    windows: Mapping[str, WindowDeltas]  # by interval name ("1m", "1h", ...)
    devices: DeviceDeltas
    dead_letters: tuple[DeadLetter, ...]
    counts: Mapping[str, int]
    corrupt: int = 0

    @property
    def batch_id(self) -> str:
        """``topic:partition:offset`` of every position, sorted: the same for every replay of the batch."""
        return ",".join(f"{t}:{p}:{o}" for (t, p), o in sorted(self.positions.items()))


_EMPTY: Final = ReadingColumns(
    (), np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64),
    np.empty(0, np.int64), np.empty(0, np.int64), (), np.empty(0, np.int32), None, None, None, _objects([]), (),
    np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.float64),
)
