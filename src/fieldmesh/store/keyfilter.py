"""A Bloom filter over stored identity keys: a key it has never seen is certainly not stored.

De-duplication then asks the store only about keys the filter may have seen (duplicates and a
small share of false positives) instead of about every key of a batch. Keys are already uniform
63-bit hashes; the filter's k positions come from multiply-shift hashing of the key, in numpy,
for a whole batch at once. It has no false negatives as long as every stored key is added, so the
store rebuilds it whenever another writer may have changed the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["KeyFilter"]

# Odd 64-bit multipliers (from splitmix64 and the golden ratio), one per probe.
_MULTIPLIERS = np.array([0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB], dtype=np.uint64)
_BITS_PER_KEY = 16  # ~0.2% false positives with three probes
#: The filter stops growing at 64 MiB (full room for ~33M keys): past that its false positives climb
#: slowly (more keys are looked up in the store, none is missed) rather than a processor's memory.
_MAX_BITS = 1 << 29


class KeyFilter:
    """Bloom filter of 63-bit keys; grows (by rebuilding from the caller's keys) as it fills."""

    def __init__(self, expected: int = 0) -> None:
        self.count = 0
        self._resize(expected)

    def _resize(self, expected: int) -> None:
        bits = min(_MAX_BITS, max(1 << 24, 1 << int(max(expected, 1) * _BITS_PER_KEY * 2 - 1).bit_length()))
        self.log2 = bits.bit_length() - 1
        self.bits = np.zeros(bits >> 3, dtype=np.uint8)
        self.capacity = bits // _BITS_PER_KEY if bits < _MAX_BITS else 1 << 62  # at the cap: never rebuilt
        self.count = 0

    def _positions(self, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        with np.errstate(over="ignore"):
            prod = keys[:, None] * _MULTIPLIERS[None, :]
        return prod >> np.uint64(64 - self.log2)  # type: ignore[no-any-return]

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
        pos = self._positions(arr).ravel()
        np.bitwise_or.at(self.bits, pos >> np.uint64(3), (1 << (pos & np.uint64(7))).astype(np.uint8))
        self.count += len(arr)

    def may_contain(self, keys: Sequence[int] | npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """For each key: False when it was certainly never added."""
        arr = self._array(keys)
        if not len(arr):
            return np.zeros(0, dtype=bool)
        pos = self._positions(arr)
        hit = (self.bits[pos >> np.uint64(3)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
        return hit.all(axis=1)  # type: ignore[no-any-return]

    @property
    def full(self) -> bool:
        """True when the false-positive rate would climb: rebuild with more room."""
        return self.count > self.capacity

    def rebuild(self, keys: Iterable[int], expected: int) -> None:
        """Start over with room for ``expected`` keys and add ``keys``."""
        self._resize(expected)
        self.add(keys)
