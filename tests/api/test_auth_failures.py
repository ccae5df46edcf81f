"""Refused API requests are counted by reason, in ``/stats`` (``auth_failures``) and ``/metrics``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fieldmesh.api.app import create_app
from fieldmesh.api.auth import AUTH_FAILURES, Access
from fieldmesh.core.settings import AccessSettings
from fieldmesh.store import load_store
from fieldmesh.store.access import AccessStore


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    url = f"sqlite:///{tmp_path}/s.db"
    load_store(url).close()
    keys = AccessStore(url)
    made = {role: keys.create_key(role=role, actor="test")[1] for role in ("viewer", "admin")}
    made["plant1"] = keys.create_key(role="viewer", groups=["plant1"], actor="test")[1]
    made["plant1-op"] = keys.create_key(role="operator", groups=["plant1"], actor="test")[1]
    access = Access(url, AccessSettings(groups={"plant1": ["p1-*"]}))
    store = load_store(url, readonly=True)
    try:
        yield TestClient(create_app(url, access=access, store=store)), made
    finally:
        store.close()
        access.close()
        keys.close()


def _get(c: TestClient, path: str, token: str | None = None) -> Any:
    if path.startswith("POST "):  # register a device
        body = dict(item.split("=") for item in path.split()[2:])
        return c.post(f"/api/v1{path.split()[1]}", headers={"Authorization": f"Bearer {token}"},
                      json={"device_id": body["device_id"], "groups": [body["group"]]})
    return c.get(f"/api/v1{path}" if path != "/metrics" else path,
                 headers={"Authorization": f"Bearer {token}"} if token else {})


def test_each_refusal_is_counted_by_its_reason(client: tuple[TestClient, dict[str, str]]) -> None:
    c, made = client
    admin = made["admin"]
    before = _get(c, "/stats", admin).json()["auth_failures"]
    assert before == {"total": 0, **dict.fromkeys(AUTH_FAILURES, 0)}
    refusals = [
        ("/stats", None, 401, "missing_credentials"),
        ("/devices", None, 401, "missing_credentials"),
        ("/stats", "fmk_0123456789ab_" + "x" * 43, 401, "bad_key"),
        ("/stats", "not-a-key-and-no-issuer", 401, "bad_token"),
        ("/keys", made["viewer"], 403, "wrong_role"),
        ("/audit", made["viewer"], 403, "wrong_role"),
        ("/stats", made["plant1"], 403, "wrong_group"),  # spans every device
        ("/telemetry/raw", made["plant1"], 403, "wrong_group"),  # names no device of its groups
        ("POST /devices device_id=p2-x group=plant2", made["plant1-op"], 403, "wrong_group"),  # beyond its groups
    ]
    for path, token, status, _ in refusals:
        assert _get(c, path, token).status_code == status, (path, token)
    assert _get(c, "/health").status_code == 200  # open: probes without a credential are no failure
    assert _get(c, "/devices", made["viewer"]).status_code == 200
    want = {r: sum(1 for *_, reason in refusals if reason == r) for r in AUTH_FAILURES}
    assert _get(c, "/stats", admin).json()["auth_failures"] == {"total": len(refusals), **want}
    metrics = _get(c, "/metrics", admin).text
    for reason, n in want.items():
        assert f'fieldmesh_auth_failures_total{{reason="{reason}"}} {float(n)}' in metrics
