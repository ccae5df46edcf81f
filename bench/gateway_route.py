"""CPU cost of the gateway's ``route()``: messages per CPU-second for 1 and 100 readings per message.

The input is what devices send most: one JSON reading per message (``ts``, ``seq``, ``boot_id``, one
measurement), on ``devices/{id}/telemetry`` of 2,000 devices, routed in batches of 5,000 messages as the
gateway fetches them; and, for comparison, 100 readings per message. ``--checks`` adds the device checks
made before decoding (every device registered, a rate limit none reaches) to measure what they cost. Run:
``PYTHONPATH=src .venv/bin/python bench/gateway_route.py [--encoding 2] [--rounds 5] [--checks]``.
"""

from __future__ import annotations

import argparse
import random
import time

import msgspec

from fieldmesh.core.settings import GatewaySettings
from fieldmesh.gateway.admission import Admission, RateLimiter, RegisteredDevices
from fieldmesh.gateway.base import IngestMessage
from fieldmesh.gateway.gateway import route

BATCH = 5_000


def messages(n: int, per_message: int, now: int, seed: int = 1) -> list[IngestMessage]:
    """``n`` messages of ``per_message`` readings each, devices round-robin."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        dev = f"dev-{i % 2000:05d}"
        rs = [
            {"ts": now - 3_600_000 + i * 10 + j, "seq": i * per_message + j, "boot_id": "b1",
             "measurements": {"temperature": rnd.randint(-400, 1600) / 4}}
            for j in range(per_message)
        ]
        payload = msgspec.json.encode(rs[0] if per_message == 1 else {"readings": rs})
        out.append(IngestMessage(topic=f"devices/{dev}/telemetry", payload=payload, received_ms=now,
                                 source_id=f"kraw-0-{i}"))
    return out


def checks() -> Admission:
    """Registration (all 2,000 devices active) and rate limits no device reaches."""

    class Registry:  # what the registry answers, without the store: the bench measures the gateway
        def version(self) -> int:
            return 1

        def list(self, **kw: object) -> list[object]:
            if kw.get("after"):
                return []
            return [type("D", (), {"id": f"dev-{i:05d}", "status": "active"})() for i in range(2000)]

        def close(self) -> None:
            pass

    registered = RegisteredDevices(Registry)
    registered.refresh()
    return Admission(registered=registered, limiter=RateLimiter(messages_per_s=1e9, bytes_per_s=1e12))


def measure(
    msgs: list[IngestMessage], settings: GatewaySettings, now: int, rounds: int, admission: Admission | None = None
) -> tuple[float, int]:
    """Best messages per CPU-second over ``rounds`` passes, and the readings routed per pass."""
    best = 0.0
    n = 0
    for _ in range(rounds):
        t = time.process_time()
        n = 0
        for s in range(0, len(msgs), BATCH):
            _, k, dead = route(msgs[s : s + BATCH], settings=settings, partitions=4, now_ms=now, admission=admission)
            assert not dead
            n += k
        best = max(best, len(msgs) / (time.process_time() - t))
    return best, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoding", type=int, choices=(1, 2), default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--checks", action="store_true", help="with registration and rate limits")
    args = ap.parse_args()
    settings = GatewaySettings(bus_encoding=args.encoding)
    now = int(time.time() * 1000)
    for per in (1, 100):
        count = args.messages if per == 1 else args.messages // 100
        rate, n = measure(messages(count, per, now), settings, now, args.rounds, checks() if args.checks else None)
        print(f"{per:>3} reading(s)/message: {rate:>10,.0f} messages/CPU-s  {rate * per:>12,.0f} readings/CPU-s"
              f"  ({n:,} readings per pass, bus encoding {args.encoding}{', with checks' if args.checks else ''})")


if __name__ == "__main__":
    main()
