"""A Bloom filter over stored identity keys: a key it has never seen is certainly not stored.

De-duplication then asks the store only about keys the filter may have seen (duplicates and a
small share of false positives) instead of about every key of a batch. Keys are already uniform
63-bit hashes; the filter's k positions come from multiply-shift hashing of the key, in numpy,
for a whole batch at once. It has no false negatives as long as every stored key is added, so the
store loads it again whenever another writer may have changed the table. It grows in layers as keys
come, without reading the stored keys again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["KeyFilter"]

# Odd 64-bit multipliers (from splitmix64 and the golden ratio), one per probe.
_MULTIPLIERS = np.array([0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB], dtype=np.uint64)
_BITS_PER_KEY = 16  # ~0.5% false positives with three probes at a layer's capacity
_MIN_BITS = 1 << 24  # 2 MiB: a layer's smallest size
#: The layers together stop growing at 64 MiB (layers of 2 to 32 MiB: 62 MiB, room for ~31M keys): past that
#: the newest layer, the largest, takes the keys that follow and its false positives climb slowly (more keys
#: are looked up in the store, none is missed) rather than a processor's memory. A smaller layer in what is
#: left under the cap would fill at once and then answer "maybe" for most keys (a model at 1/1024 the size:
#: 63% false positives at 1.6 times the capacity, against 9.5% without it).
_MAX_BITS = 1 << 29


class _Layer:
    """One Bloom filter of ``2**log2`` bits."""

    def __init__(self, bits: int) -> None:
        self.log2 = bits.bit_length() - 1
        self.bits = np.zeros(bits >> 3, dtype=np.uint8)
        self.capacity = bits // _BITS_PER_KEY
        self.count = 0

    def positions(self, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        with np.errstate(over="ignore"):
            prod = keys[:, None] * _MULTIPLIERS[None, :]
        return prod >> np.uint64(64 - self.log2)  # type: ignore[no-any-return]

    def add(self, keys: npt.NDArray[np.uint64]) -> None:
        pos = self.positions(keys).ravel()
        np.bitwise_or.at(self.bits, pos >> np.uint64(3), (1 << (pos & np.uint64(7))).astype(np.uint8))
        self.count += len(keys)

    def may_contain(self, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
        pos = self.positions(keys)
        hit = (self.bits[pos >> np.uint64(3)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
        return hit.all(axis=1)  # type: ignore[no-any-return]


def _pow2_at_most(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


class KeyFilter:
    """Bloom filter of 63-bit keys that grows in layers (a scalable Bloom filter).

    New keys go to the newest layer; once it holds its capacity a layer twice its size takes the keys that
    come after, and a key may be stored when any layer may contain it. Growing never reads the stored keys
    again: a single filter rebuilt twice as large stalled the commit that filled it (0.45 s at a million keys,
    seconds at tens of millions). The price: a lookup probes each layer, and false positives add up over
    the layers (each full layer ~0.5%).
    """

    def __init__(self, expected: int = 0) -> None:
        want = 1 << int(max(expected, 1) * _BITS_PER_KEY * 2 - 1).bit_length()
        self._layers = [_Layer(min(_MAX_BITS, max(_MIN_BITS, want)))]

    @property
    def count(self) -> int:
        """Keys added (each time it was added)."""
        return sum(layer.count for layer in self._layers)

    @property
    def nbytes(self) -> int:
        """Memory of the bit arrays."""
        return sum(layer.bits.nbytes for layer in self._layers)

    @property
    def layers(self) -> int:
        return len(self._layers)

    @staticmethod
    def _array(keys: Sequence[int] | Iterable[int] | npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
        if isinstance(keys, np.ndarray):  # keys are < 2**63: the cast keeps every value
            return keys.astype(np.uint64, copy=False)
        return np.fromiter(keys, dtype=np.uint64)

    def add(self, keys: Sequence[int] | Iterable[int] | npt.NDArray[np.int64]) -> None:
        """Add keys."""
        arr = self._array(keys)
        if not len(arr):
            return
        last = self._layers[-1]
        if last.count >= last.capacity:  # full: a layer twice its size, while the memory cap leaves room
            bits = min(2 * len(last.bits) * 8, _pow2_at_most(_MAX_BITS - self.nbytes * 8))
            if bits >= max(_MIN_BITS, len(last.bits) * 8):  # never smaller than the full one
                last = _Layer(bits)
                self._layers.append(last)
        last.add(arr)

    def may_contain(self, keys: Sequence[int] | npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """For each key: False when it was certainly never added."""
        arr = self._array(keys)
        if not len(arr):
            return np.zeros(0, dtype=bool)
        out = self._layers[-1].may_contain(arr)
        for layer in self._layers[-2::-1]:
            maybe_not = np.flatnonzero(~out)  # only keys no newer layer may contain
            if not len(maybe_not):
                break
            out[maybe_not] = layer.may_contain(arr[maybe_not])
        return out
