"""The notifier over a real SQLite store: webhooks (plain JSON and Alertmanager's shape) to a real HTTP
server, MQTT to the local Mosquitto, and a target that never answers kept as failed, never dropped."""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fieldmesh.store.alerts import MAX_ATTEMPTS, AlertTables, apply_evaluation
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.alerting import AlertEngine
from fieldmesh.stream.alerts import Evaluation, RuleState, Transition, parse_rule
from fieldmesh.stream.notifier import Notifier

MQTT_URL = "mqtt://127.0.0.1:1883"


class Hook:
    def __init__(self) -> None:
        self.got: list[tuple[str, str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                hook.got.append((self.path, self.headers["X-Fieldmesh-Notification-Id"], body))
                self.send_response(204 if self.path != "/broken" else 503)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _wait(pred: Any, timeout_s: float = 30) -> None:
    end = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.integration
def test_webhooks_mqtt_and_failures(tmp_path: Path) -> None:
    hook = Hook()
    url = f"sqlite:///{tmp_path / 'hot.db'}"
    dev = f"pump-{secrets.token_hex(4)}"
    rule = parse_rule({"name": "hot", "kind": "threshold", "metric": "t", "op": ">", "value": 1, "severity": "critical",
                       "labels": {"site": "north"},
                       "notify": [{"webhook": f"{hook.base}/plain"},
                                  {"webhook": f"{hook.base}/am", "format": "alertmanager"},
                                  {"mqtt": True}, {"webhook": f"{hook.base}/broken"}]})
    tables = AlertTables(url)
    tables.put_rule(rule, actor="test")
    store = SqliteStore(url)
    engine = AlertEngine(store)
    got_mqtt: list[Any] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fm-test-{secrets.token_hex(4)}")
    sub.on_message = lambda c, u, m: got_mqtt.append((m.topic, json.loads(m.payload)))
    sub.connect("127.0.0.1", 1883)
    sub.subscribe(f"fieldmesh/alerts/{dev}", qos=1)
    sub.loop_start()
    time.sleep(0.5)
    notifier = Notifier(store, wake=engine.notify, mqtt_url=MQTT_URL, retry_base_s=0.01, retry_max_s=0.05,
                        poll_s=0.05)
    notifier.start()
    try:
        ev = Evaluation([Transition("hot", dev, "open", 1000, 5.0)], {("hot", dev): RuleState(firing=True)})
        applied = store.transact(lambda tx: apply_evaluation(tx, ev, {"hot": rule}))
        engine.committed(applied)
        assert applied.notifications == 4
        _wait(lambda: len([g for g in hook.got if g[0] != "/broken"]) >= 2 and got_mqtt
              and tables.stats()["notifications"]["failed"] == 1)
        plain = next(g for g in hook.got if g[0] == "/plain")
        assert plain[2]["notification_id"] == plain[1] and plain[2]["event"] == "open"
        assert plain[2]["alert"]["device_id"] == dev and plain[2]["alert"]["severity"] == "critical"
        [am] = next(g for g in hook.got if g[0] == "/am")[2]
        assert am["labels"] == {"alertname": "hot", "device_id": dev, "severity": "critical", "site": "north"}
        assert am["startsAt"].endswith("Z") and "endsAt" not in am
        assert got_mqtt[0][0] == f"fieldmesh/alerts/{dev}" and got_mqtt[0][1]["event"] == "open"
        broken = [g for g in hook.got if g[0] == "/broken"]
        assert len(broken) == MAX_ATTEMPTS and len({g[1] for g in broken}) == 1  # every try, one id
        [failed] = tables.notifications(status="failed")
        assert failed["attempts"] == MAX_ATTEMPTS and "503" in failed["last_error"]
        st = tables.stats()
        assert st["notifications"] == {"pending": 0, "delivered": 3, "failed": 1}
        assert st["failed_tries"] == MAX_ATTEMPTS and st["latency_ms"]["p50"] is not None
        assert notifier.stats.delivered == 3 and notifier.stats.failed == 1
        # a clear by hand is announced too; the cleared alert's Alertmanager body has endsAt
        aid = tables.alerts()[0]["id"]
        tables.clear(aid, actor="key:op", note="done")
        engine.notify.set()
        _wait(lambda: sum(1 for g in hook.got if g[0] == "/am") == 2)
        [am2] = [g for g in hook.got if g[0] == "/am"][1][2]
        assert "endsAt" in am2 and am2["annotations"]["event"] == "cleared"
    finally:
        notifier.stop()
        sub.loop_stop()
        sub.disconnect()
        hook.server.shutdown()
        store.close()
        tables.close()


@pytest.mark.integration
def test_a_dead_delivery_process_is_started_again(tmp_path: Path) -> None:
    """The tries run in a delivery process of their own: when it dies, the next notification starts another
    one, and each notification reaches its receiver with its stable id."""
    hook = Hook()
    url = f"sqlite:///{tmp_path / 'hot.db'}"
    rule = parse_rule({"name": "hot", "kind": "threshold", "metric": "t", "op": ">", "value": 1,
                       "notify": [{"webhook": f"{hook.base}/plain"}]})
    tables = AlertTables(url)
    tables.put_rule(rule, actor="test")
    store = SqliteStore(url)
    engine = AlertEngine(store)
    notifier = Notifier(store, wake=engine.notify, poll_s=0.05)
    notifier.start()
    try:
        def step(dev: str) -> None:
            ev = Evaluation([Transition("hot", dev, "open", 1000, 5.0)], {("hot", dev): RuleState(firing=True)})
            engine.committed(store.transact(lambda tx: apply_evaluation(tx, ev, {"hot": rule})))

        step("a")
        _wait(lambda: tables.stats()["notifications"]["delivered"] == 1)  # its outcome came back
        first = notifier._child
        assert first is not None
        first.proc.kill()
        _wait(lambda: not first.alive)
        step("b")
        _wait(lambda: len(hook.got) == 2)
        assert notifier._child is not first and notifier._child is not None and notifier._child.alive
        assert sorted(g[2]["alert"]["device_id"] for g in hook.got) == ["a", "b"]
        assert all(g[1] == g[2]["notification_id"] for g in hook.got)
        _wait(lambda: tables.stats()["notifications"] == {"pending": 0, "delivered": 2, "failed": 0})
    finally:
        notifier.stop()
        hook.server.shutdown()
        store.close()
        tables.close()
