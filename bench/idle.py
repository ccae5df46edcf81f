"""What ``fieldmesh up`` costs when little or nothing comes: CPU of each of its processes, idle and at a low rate.

An edge box runs the pipeline most of the time far below its maximum rate, so the CPU a stage spends asking
for work that is not there is CPU taken from everything else on the box. Each side starts ``fieldmesh up`` on
the embedded default (a fresh data directory), lets it settle (``--settle`` seconds), then measures the CPU of
each of its processes (psutil, user + system) over ``--seconds``: first idle, then while a publisher sends
``--rate`` one-reading messages a second (QoS 1 through the MQTT door, ``--devices`` devices round-robin). The
publisher's own CPU is not counted. Then it stops ``fieldmesh up`` (SIGTERM) and times its exit. Printed: percent of
one core per process kind and in all, the stop's seconds, and with
``--base DIR/src`` the same for another checkout (its ``src`` on ``PYTHONPATH``), the sides alternated
``--sides`` times each, with the ratio of the medians of the totals (this / base).

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/idle.py [--seconds 20] [--rate 20] [--base DIR/src [--sides 2]]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import UpProc, cpu_by_role, payloads, publish_proc


def _window(up: UpProc, seconds: float) -> dict[str, float]:
    """Percent of a core per process of ``fieldmesh up`` (by role) over ``seconds``."""
    a = cpu_by_role(up)
    time.sleep(seconds)
    return {role: (t - a.get(role, t)) / seconds * 100 for role, t in cpu_by_role(up).items()}


def side(src: str, args: argparse.Namespace) -> tuple[dict[str, dict[str, float]], float]:
    """One ``fieldmesh up`` of the checkout at ``src``: its CPU idle and at ``args.rate``; the seconds its stop
    took (SIGTERM to exit)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = src
    work = Path(tempfile.mkdtemp(prefix="fm-idle-"))
    try:
        up = UpProc(work / "data")
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    stopped = False
    try:
        time.sleep(args.settle)
        out = {"idle": _window(up, args.seconds)}
        if args.rate:
            n = int(args.rate * (args.seconds + args.settle + 5))
            msgs = payloads(devices=args.devices, readings=n, per_message=1, prefix=f"idle{os.getpid()}")
            pub = mp.get_context("spawn").Process(
                target=publish_proc, args=({"port": up.mqtt_port, "msgs": msgs, "rate": args.rate, "stamp": True},))
            pub.start()
            try:
                time.sleep(args.settle / 2)
                out[f"{args.rate:g} msg/s"] = _window(up, args.seconds)
            finally:
                pub.terminate()
                pub.join(10)
        took = up.stop()
        stopped = True
        return out, took
    finally:
        if not stopped:
            up.stop()


def show(name: str, got: dict[str, dict[str, float]], stop_s: float) -> None:
    for phase, kinds in got.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v >= 0.005)
        print(f"  {name:<5} {phase:<11} {sum(kinds.values()):6.2f}% of a core in all: {parts}", flush=True)
    print(f"  {name:<5} {'stop':<11} {stop_s:6.2f} s from SIGTERM to exit", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each measured window")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds after the start before measuring")
    ap.add_argument("--rate", type=float, default=20.0, help="one-reading messages a second of the second window "
                    "(0: idle only)")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--base", help="another checkout's src directory: a baseline side, alternated with this one")
    ap.add_argument("--sides", type=int, default=2, help="with --base: runs of each side")
    args = ap.parse_args()
    this = str(Path(__file__).resolve().parent.parent / "src")
    sides = {"this": this, **({"base": args.base} if args.base else {})}
    runs: dict[str, list[dict[str, dict[str, float]]]] = {k: [] for k in sides}
    stops: dict[str, list[float]] = {k: [] for k in sides}
    print(f"fieldmesh up, embedded default; CPU per process in % of one core over {args.seconds:g} s windows "
          f"(idle, then {args.rate:g} one-reading messages/s from {args.devices} devices)", flush=True)
    for r in range(args.sides if args.base else 1):
        order = list(sides.items()) if r % 2 == 0 else list(reversed(sides.items()))
        for name, src in order:
            got, took = side(src, args)
            runs[name].append(got)
            stops[name].append(took)
            show(name, got, took)
    if args.base:
        for phase in runs["this"][0]:
            t = statistics.median(sum(g[phase].values()) for g in runs["this"])
            b = statistics.median(sum(g[phase].values()) for g in runs["base"])
            print(f"{phase:<11}: this {t:.2f}%, base {b:.2f}% of a core (medians of {args.sides}): "
                  f"x{t / b:.2f} the base's CPU")
        t, b = statistics.median(stops["this"]), statistics.median(stops["base"])
        print(f"{'stop':<11}: this {t:.2f} s, base {b:.2f} s from SIGTERM to exit (medians): x{t / b:.2f}")


if __name__ == "__main__":
    main()
