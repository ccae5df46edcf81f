"""CPU cost of the gateway's ``route()``: messages per CPU-second for 1 and 100 readings per message.

The input is what devices send most: one JSON reading per message (``ts``, ``seq``, ``boot_id``, one
measurement), on ``devices/{id}/telemetry`` of 2,000 devices, routed in batches of 5,000 messages (``--batch``);
and, for comparison, 100 readings per message. ``--checks`` adds the device checks
made before decoding (every device registered, a rate limit none reaches) to measure what they cost.
``--batch`` sets the messages a ``route`` call takes (the gateway's own fetch is ``batch_max_messages``, 512 by
default). ``--base SRC`` runs the same on another checkout's ``src`` as well (a subprocess a side, ``--sides``
times each, alternated, so both share the sitting) and prints the ratio of the medians. Run:
``PYTHONPATH=src .venv/bin/python bench/gateway_route.py [--encoding 2] [--rounds 5] [--checks] [--batch 5000]
[--base DIR/src [--sides 3]]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import msgspec

from fieldmesh.core.settings import GatewaySettings
from fieldmesh.gateway.admission import Admission, RateLimiter, RegisteredDevices
from fieldmesh.gateway.base import IngestMessage
from fieldmesh.gateway.gateway import route

BATCH = 5_000  # messages a route call takes, unless --batch says otherwise


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
    msgs: list[IngestMessage], settings: GatewaySettings, now: int, rounds: int, admission: Admission | None = None,
    batch: int = BATCH,
) -> tuple[float, int]:
    """Best messages per CPU-second over ``rounds`` passes, and the readings routed per pass."""
    best = 0.0
    n = 0
    for _ in range(rounds):
        t = time.process_time()
        n = 0
        for s in range(0, len(msgs), batch):
            _, k, dead = route(msgs[s : s + batch], settings=settings, partitions=4, now_ms=now, admission=admission)
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
    ap.add_argument("--batch", type=int, default=BATCH, help="messages a route call takes")
    ap.add_argument("--base", help="another checkout's src directory: a baseline side, alternated with this one")
    ap.add_argument("--sides", type=int, default=3, help="with --base: runs of each side")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # a side, in a subprocess
    args = ap.parse_args()
    if args.base:
        compare(args)
        return
    settings = GatewaySettings(bus_encoding=args.encoding)
    now = int(time.time() * 1000)
    rates = {}
    for per in (1, 100):
        count = args.messages if per == 1 else args.messages // 100
        rate, n = measure(messages(count, per, now), settings, now, args.rounds, checks() if args.checks else None,
                          args.batch)
        rates[per] = rate * per
        if not args.json:
            print(f"{per:>3} reading(s)/message: {rate:>10,.0f} messages/CPU-s  {rate * per:>12,.0f} readings/CPU-s"
                  f"  ({n:,} readings per pass, {args.batch:,} messages a call, bus encoding {args.encoding}"
                  f"{', with checks' if args.checks else ''})")
    if args.json:
        print(json.dumps(rates))


def compare(args: argparse.Namespace) -> None:
    """This checkout and ``args.base`` in subprocesses, alternated; readings per CPU-second, the medians' ratio."""
    sides = {"this": os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"),
             "base": args.base}
    cmd = [sys.executable, __file__, "--json", "--encoding", str(args.encoding), "--rounds", str(args.rounds),
           "--messages", str(args.messages), "--batch", str(args.batch), *(["--checks"] if args.checks else [])]
    got: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
    for r in range(args.sides):
        for name, src in (list(sides.items()) if r % 2 == 0 else list(reversed(sides.items()))):
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": src})
            got[name].append({int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()})
            rates = ", ".join(f"{per} a message {got[name][-1][per]:,.0f}" for per in (1, 100))
            print(f"  {name} run {r + 1}: {rates} readings/CPU-s", flush=True)
    for per in (1, 100):
        this = statistics.median(m[per] for m in got["this"])
        base = statistics.median(m[per] for m in got["base"])
        print(f"{per:>3} reading(s)/message, {args.batch:,} messages a call: this {this:,.0f}, base {base:,.0f} "
              f"readings/CPU-s (medians of {args.sides}): x{this / base:.2f}")


if __name__ == "__main__":
    main()
