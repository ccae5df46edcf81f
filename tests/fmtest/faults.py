"""What every fault test prints: sent / acknowledged / stored / duplicates / counted losses."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FaultReport:
    """The figures of one fault case; :meth:`show` prints them on one line (run pytest with ``-s`` to see)."""

    case: str
    sent: int = 0
    acknowledged: int = 0
    stored: int = 0
    duplicates: int = 0
    counted_losses: dict[str, int] = field(default_factory=dict)

    def show(self) -> str:
        losses = ", ".join(f"{k}={v}" for k, v in sorted(self.counted_losses.items())) or "none"
        line = (f"[fault] {self.case}: sent={self.sent} acknowledged={self.acknowledged} stored={self.stored} "
                f"duplicates={self.duplicates} counted losses: {losses}")
        print(line)
        return line


def bus_batches(n_batches: int, per_batch: int, devices: int, prefix: str, now_ms: int) -> list[bytes]:
    """Version-1 bus records of ``per_batch`` one-metric readings each, spread over ``devices`` devices
    (``<prefix>-0``...), an hour before ``now_ms``, one a second, ``seq`` counting up."""
    from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_reading_json
    from fieldmesh.core.model import BusBatch

    out = []
    for b in range(n_batches):
        readings = []
        for i in range(per_batch):
            seq = b * per_batch + i
            dev = f"{prefix}-{seq % devices}"
            p = encode_reading_json(dev, now_ms - 3_600_000 + seq * 1000, {"t": float(seq)}, seq)
            readings.extend(decode_telemetry(p, device_id=dev, topic=f"devices/{dev}/telemetry",
                                             received_ms=now_ms).readings)
        out.append(encode_bus_batch(BusBatch(readings)))
    return out
