"""``fieldmesh schemas check|register|list|show``: exit codes and answers, over a store and over HTTP.

Real processes (``python -m fieldmesh``), a real SQLite store, and for ``--url`` the real API served by
uvicorn with authentication required.
"""

from __future__ import annotations

import json
import os
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
from fieldmesh.store.access import AccessStore
from fmtest.procs import free_port


def fm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fieldmesh", "schemas", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def avsc(path: Path, *fields: dict[str, object]) -> Path:
    path.write_text(json.dumps({"type": "record", "name": "Reading", "fields": list(fields)}))
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "v1": avsc(tmp_path / "v1.avsc", {"name": "device", "type": "string"}),
        "ok": avsc(tmp_path / "ok.avsc", {"name": "device", "type": "string"},
                   {"name": "unit", "type": "string", "default": "C"}),
        "bad": avsc(tmp_path / "bad.avsc", {"name": "device", "type": "string"}, {"name": "unit", "type": "string"}),
        "invalid": (tmp_path / "invalid.avsc"),
    }


def test_check_over_the_store(tmp_path: Path, files: dict[str, Path]) -> None:
    files["invalid"].write_text('{"type": "record", "name": "R", "fields": [{"name": "a", "type": "nope"}]}')
    store = ["--store-url", f"sqlite:///{tmp_path}/store.db"]
    # no store there yet: a usage error, not an empty registry that finds everything compatible
    assert fm("check", str(files["bad"]), "--subject", "r-value", *store).returncode == 2
    reg = fm("register", str(files["v1"]), "--subject", "r-value", *store)
    assert reg.returncode == 0, reg.stderr
    assert json.loads(reg.stdout) == {"id": 1, "version": 1, "subject": "r-value"}
    ok = fm("check", str(files["ok"]), "--subject", "r-value", *store)
    assert ok.returncode == 0 and "compatible" in ok.stderr, ok.stderr
    bad = fm("check", str(files["bad"]), "--subject", "r-value", *store, "--json")
    assert bad.returncode == 1, bad.stderr
    doc = json.loads(bad.stdout)
    assert doc["compatible"] is False and any("READER_FIELD_MISSING_DEFAULT_VALUE" in r for r in doc["reasons"])
    inv = fm("check", str(files["invalid"]), "--subject", "r-value", *store)
    assert inv.returncode == 1 and "invalid schema" in inv.stderr
    # usage and configuration errors: 2
    assert fm("check", str(files["bad"]), "--subject", "other-value", *store).returncode == 0  # no version yet
    assert fm("check", str(tmp_path / "missing.avsc"), "--subject", "r-value", *store).returncode == 2
    assert fm("check", str(files["ok"]), "--subject", "r-value", "--type", "XML", *store).returncode == 2
    assert fm("check", str(files["ok"]), "--subject", "r-value", "--url", "http://x", *store).returncode == 2
    assert fm("check", str(files["ok"]), "--subject", "r-value", "--store-url", "mysql://x").returncode == 2
    assert fm("check", str(files["ok"])).returncode == 2  # no --subject
    # the helpers
    assert fm("register", str(files["bad"]), "--subject", "r-value", *store).returncode == 1
    assert fm("register", str(files["ok"]), "--subject", "r-value", *store).returncode == 0
    assert json.loads(fm("list", *store).stdout) == ["r-value"]
    assert json.loads(fm("list", "--subject", "r-value", *store).stdout) == [1, 2]
    shown = json.loads(fm("show", "--subject", "r-value", *store).stdout)
    assert shown["version"] == 2 and json.loads(shown["schema"])["fields"][1]["default"] == "C"
    assert json.loads(fm("show", "--id", "1", *store).stdout)["id"] == 1


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[str, str]]:
    url = f"sqlite:///{tmp_path}/api.db"
    keys = AccessStore(url)
    _, key = keys.create_key(role="operator", actor="test")
    keys.close()
    access = Access(url, local_only=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(url, access=access), host="127.0.0.1", port=port,
                                           log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert t.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/api/v1/registry", key
    server.should_exit = True
    t.join(15)
    access.close()


def test_check_over_http(api: tuple[str, str], files: dict[str, Path]) -> None:
    url, key = api
    env = {"FIELDMESH_API_KEY": key}
    assert fm("register", str(files["v1"]), "-s", "h-value", "--url", url, env=env).returncode == 0
    assert fm("check", str(files["ok"]), "-s", "h-value", "--url", url, env=env).returncode == 0
    bad = fm("check", str(files["bad"]), "-s", "h-value", "--url", url, env=env)
    assert bad.returncode == 1 and "READER_FIELD_MISSING_DEFAULT_VALUE" in bad.stderr, bad.stderr
    assert fm("check", str(files["ok"]), "-s", "new-value", "--url", url, env=env).returncode == 0
    key_id, secret = key.split("_", 2)[1:]
    basic = fm("check", str(files["bad"]), "-s", "h-value", "--url", url, "--basic", f"{key_id}:{secret}",
               env={"FIELDMESH_API_KEY": ""})
    assert basic.returncode == 1, basic.stderr
    refused = fm("check", str(files["ok"]), "-s", "h-value", "--url", url, env={"FIELDMESH_API_KEY": "fmk_nope"})
    assert refused.returncode == 2 and "credentials" in refused.stderr
    assert fm("check", str(files["ok"]), "-s", "h-value", "--url", "http://127.0.0.1:9/x", env=env).returncode == 2
