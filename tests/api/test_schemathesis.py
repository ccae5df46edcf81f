"""schemathesis, every check on, against the real API over a store with data (SQLite and PostgreSQL).

The API is served by uvicorn on a free port; schemathesis reads its OpenAPI document and generates
valid and invalid requests for every operation. It fails on any server error, any answer the
document does not describe (status, content type, body schema), any valid request refused and any
invalid request accepted. ``tests/api/schemathesis.toml`` holds its settings (answers a schema cannot
foresee: a refused rule, an alert acknowledged already). Requests carry an admin API key, so every
operation is reachable, and schemathesis's ``ignored_auth`` check sends them without it too: each
must then be refused.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from fieldmesh.api.app import create_app
from fieldmesh.api.auth import Access
from fieldmesh.control.ca import CertificateAuthority
from fieldmesh.core.codec import decode_telemetry
from fieldmesh.core.model import DeadLetter
from fieldmesh.store import load_store
from fieldmesh.store.access import AccessStore
from fieldmesh.store.alerts import AlertTables, apply_evaluation
from fieldmesh.stream.alerts import Evaluation, RuleState, Transition, parse_rule
from fmtest.drive import commit_readings
from fmtest.procs import free_port

NOW = 1_763_812_345_123
CONFIG = Path(__file__).with_name("schemathesis.toml")
#: Cases per operation and phase (well under a minute per store on 2 busy cores); a fixed seed keeps CI
#: repeatable. Raise both locally to search further (``--max-examples 500`` finds nothing either).
MAX_EXAMPLES = 40
SEED = 20261202


def _seed_store(url: str) -> None:
    """Two devices, 150 readings each (some with boot id, event id, meta, a boolean), two dead letters."""
    w = load_store(url)
    try:
        for dev in ("pump-7", "valve_2"):
            body = b"[" + b",".join(
                b'{"ts":%d,"seq":%d,"boot_id":"b1","event_id":"e%d","meta":{"fw":"1.2"},'
                b'"measurements":{"t":%d,"h.rel":1.5,"on":%s}}'
                % (NOW - 7_200_000 + i * 60_000, i, i, i, b"true" if i % 2 else b"false")
                for i in range(150)
            ) + b"]"
            rs = decode_telemetry(body, device_id=dev, topic=f"devices/{dev}/telemetry", received_ms=NOW).readings
            dls = [
                DeadLetter(reason="clock_skew", detail="ahead", topic=f"devices/{dev}/telemetry", received_ms=NOW,
                           payload=b'{"ts": 1}', device_id=dev),
                DeadLetter(reason="malformed_json", detail="not JSON", topic=f"devices/{dev}/telemetry",
                           received_ms=NOW, payload=b"\xff\x00binary", device_id=None),
            ]
            commit_readings(w, rs, dead_letters=dls)
        # an alert rule and its alert 1 (schemathesis.toml names it for /alerts/{alert_id})
        tables = AlertTables(url)
        rule = parse_rule({"name": "hot", "kind": "threshold", "metric": "t", "op": ">", "value": 100})
        tables.put_rule(rule, actor="test")
        tables.close()
        ev = Evaluation([Transition("hot", "pump-7", "open", NOW, 120.0)], {("hot", "pump-7"): RuleState(firing=True)})
        w.transact(lambda tx: apply_evaluation(tx, ev, {"hot": rule}))
    finally:
        w.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def api_base(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Base URL of the API served by uvicorn over a seeded store, and an admin key."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/store.db"
    else:
        url = f"{request.getfixturevalue('pg_url')}?schema=t_{secrets.token_hex(5)}"
    _seed_store(url)
    keys = AccessStore(url)
    _, admin = keys.create_key(role="admin", actor="test")
    keys.close()
    port = free_port()
    access = Access(url)
    CertificateAuthority.init(tmp_path / "ca")  # provisioning answers (not 503) with a CA
    api = create_app(url, access=access, ca_dir=tmp_path / "ca", online_url=f"sqlite:///{tmp_path / 'features.db'}")
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, name="api", daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert t.is_alive() and time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", admin
    finally:
        server.should_exit = True
        t.join(10)
        access.close()
        api.state.provision.close()


@pytest.mark.slow
def test_schemathesis_all_checks_pass(api_base: tuple[str, str], tmp_path: Path) -> None:
    base, admin = api_base
    args = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(CONFIG),
        "run", f"{base}/api/v1/openapi.json", "--header", f"Authorization: Bearer {admin}",
        "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED),
        "--workers", "1", "--no-color", "--generation-database", "none",
    ]
    # cwd: schemathesis may write a report folder; keep it out of the checkout
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    print(out[-3000:])
    assert r.returncode == 0, f"schemathesis found problems (exit {r.returncode}):\n{out[-12000:]}"
    m = re.search(r"Operations:\s+(\d+) selected / (\d+) total", out)
    assert m and m[1] == m[2] and int(m[1]) >= 9, "every operation must be tested"
    assert "No issues found" in out
