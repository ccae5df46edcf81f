"""An in-memory claim store: what a hot store's ``claim_keys`` answers, over a dict.

Per key it keeps the check value and the origin of the reading that claimed it. A key not held is
taken (CLAIMED); a key held with another check value is a COLLISION; with the same check value it is a
DUPLICATE, unless the claimant's origin is the stored one (and not -1): then it is CLAIMED again, so
re-deciding committed records decides exactly as the first time (docs/design/processing-core.md §2).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.batch import CLAIMED, COLLISION, DUPLICATE

__all__ = ["ClaimStore"]


class ClaimStore:
    """Keys claimed so far: ``held[key] = (chk, origin)``; ``calls`` counts claim calls (probes included)."""

    def __init__(self) -> None:
        self.held: dict[int, tuple[int, int]] = {}
        self.calls = 0

    def __call__(
        self, keys: NDArray[np.int64], chks: NDArray[np.int64], origins: NDArray[np.int64]
    ) -> NDArray[np.int8]:
        self.calls += 1
        ks = keys.tolist()
        assert len(set(ks)) == len(ks), "keys of one claim call must be distinct"
        out = np.empty(len(ks), dtype=np.int8)
        held = self.held
        for i, (k, c, o) in enumerate(zip(ks, chks.tolist(), origins.tolist(), strict=True)):
            h = held.get(k)
            if h is None:
                held[k] = (c, o)
                out[i] = CLAIMED
            elif h[0] != c:
                out[i] = COLLISION
            else:
                out[i] = CLAIMED if o != -1 and h[1] == o else DUPLICATE
        return out

    def copy(self) -> ClaimStore:
        """An independent store holding the same keys."""
        c = ClaimStore()
        c.held = dict(self.held)
        return c
