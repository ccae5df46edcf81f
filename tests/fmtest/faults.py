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
