"""``fieldmesh devices`` (docs/registry.md) over real stores: SQLite in a data dir, a PostgreSQL schema."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fieldmesh.cli.main import app
from fieldmesh.store.registry import Certificate, DeviceRegistry

runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[list[str], str]:
    """The CLI flags naming a store, and its URL."""
    if request.param == "sqlite":
        return ["--data-dir", str(tmp_path / "data")], f"sqlite:///{(tmp_path / 'data' / 'store.db').resolve()}"
    url = f"{request.getfixturevalue('pg_url')}?schema=t_{secrets.token_hex(5)}"
    return ["--store-url", url], url


def fm(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_add_list_show_update_status_delete(where: tuple[list[str], str]) -> None:
    flags, url = where
    code, out, errs = fm("devices", "add", "pump-7", "--groups", "plant1,lab", "--tags", "fw:1.2",
                         "--attr", "site=north", "--attr-json", "floor=2", "--attr", "serial=007", *flags)
    assert code == 0, errs
    assert "device pump-7 registered (active, groups lab,plant1)" in flat(errs)
    code, out, _ = fm("devices", "add", "valve-2", "--status", "suspended", "--json", *flags)
    assert code == 0 and json.loads(out)["status"] == "suspended"
    listed = json.loads(fm("devices", "list", "--json", *flags)[1])
    assert [(d["device_id"], d["status"], d["groups"]) for d in listed] == [
        ("pump-7", "active", ["lab", "plant1"]), ("valve-2", "suspended", [])]
    assert listed[0]["attributes"] == {"floor": 2, "serial": "007", "site": "north"}
    assert [d["device_id"] for d in json.loads(fm("devices", "list", "--group", "lab", "--json", *flags)[1])] == [
        "pump-7"]
    assert [d["device_id"] for d in json.loads(fm("devices", "list", "--status", "suspended", "--json",
                                                  *flags)[1])] == ["valve-2"]
    table = fm("devices", "list", *flags)[1]
    assert "pump-7" in table and "lab,plant1" in table and "suspended" in table

    code, out, _ = fm("devices", "update", "pump-7", "--groups", "plant2", "--unset-attr", "floor",
                      "--attr", "rack=r1", "--json", *flags)
    assert code == 0
    assert (json.loads(out)["groups"], json.loads(out)["attributes"]) == (
        ["plant2"], {"rack": "r1", "serial": "007", "site": "north"})
    assert fm("devices", "suspend", "pump-7", *flags)[0] == 0
    assert json.loads(fm("devices", "show", "pump-7", "--json", *flags)[1])["status"] == "suspended"
    assert fm("devices", "activate", "pump-7", *flags)[0] == 0
    assert fm("devices", "retire", "valve-2", *flags)[0] == 0

    reg = DeviceRegistry(url)
    try:
        reg.add_certificate(Certificate(serial="1f", device_id="pump-7", subject="CN=pump-7", fingerprint="ab" * 32,
                                        not_before_ms=0, not_after_ms=4_102_444_800_000, revoked_ms=None,
                                        pem="-----BEGIN CERTIFICATE-----\n"), actor="test")
    finally:
        reg.close()
    shown = json.loads(fm("devices", "show", "pump-7", "--json", *flags)[1])
    assert shown["status"] == "active" and [c["serial"] for c in shown["certificates"]] == ["1f"]
    text = fm("devices", "show", "pump-7", *flags)[1]
    assert "attr.rack" in text and "1f" in text and "CN=pump-7" in text

    assert fm("devices", "delete", "pump-7", *flags)[0] == 1  # asks; no answer: nothing removed
    code, _, errs = fm("devices", "delete", "pump-7", "--yes", *flags)
    assert code == 0 and "removed" in errs
    reg = DeviceRegistry(url)
    try:
        assert reg.get("pump-7") is None and reg.certificates("pump-7")[0].revoked_ms is not None
        log = [(e.action, e.target) for e in reversed(reg.audit_log(limit=100))]
        assert log == [("device.add", "pump-7"), ("device.add", "valve-2"), ("device.update", "pump-7"),
                       ("device.update", "pump-7"), ("device.update", "pump-7"), ("device.update", "valve-2"),
                       ("cert.add", "1f"), ("device.delete", "pump-7")]
        assert all(e.actor.startswith("cli:") for e in reg.audit_log(limit=100) if e.action.startswith("device."))
    finally:
        reg.close()


def test_clear_errors(where: tuple[list[str], str]) -> None:
    flags, _ = where
    assert fm("devices", "add", "d1", *flags)[0] == 0
    for args, fragment in [
        (("add", "d1"), "registered already"),
        (("add", "bad/id"), "bad device id"),
        (("add", "d2", "--status", "sleeping"), "unknown status 'sleeping'"),
        (("add", "d2", "--groups", "a b"), "bad group name 'a b'"),
        (("add", "d2", "--attr", "novalue"), "use NAME=VALUE"),
        (("add", "d2", "--attr-json", "x=nope"), "not JSON"),
        (("add", "d2", "--attr", "bad name=1"), "bad attribute name 'bad name'"),
        (("update", "ghost", "--status", "retired"), "no registered device 'ghost'"),
        (("suspend", "ghost"), "no registered device 'ghost'"),
        (("delete", "ghost", "--yes"), "no registered device 'ghost'"),
        (("show", "ghost"), "no registered device 'ghost'"),
    ]:
        code, _, errs = fm("devices", *args, *flags)
        assert code == 2 and fragment in flat(errs), (args, errs)
        assert "Traceback" not in errs
    assert fm("devices", "list", "--store-url", "mysql://x/y")[0] == 2


def test_import_and_export(where: tuple[list[str], str], tmp_path: Path) -> None:
    flags, url = where
    fm("devices", "add", "old-1", "--groups", "g0", "--attr", "keep=1", *flags)
    good = tmp_path / "fleet.csv"
    good.write_text("device_id,groups,tags,status,attr.site\n"
                    "old-1,g1;g2,,,north\n"
                    "new-1,g1,t1;t2,suspended,south\n"
                    "new-2,,,,\n")
    code, _, errs = fm("devices", "import", str(good), *flags)
    assert code == 0, errs
    assert "2 added, 1 updated, 0 unchanged" in flat(errs)
    assert json.loads(fm("devices", "import", str(good), "--json", *flags)[1]) == {
        "imported": True, "added": 0, "updated": 0, "unchanged": 3}
    # round trip: the export is an import file that changes nothing
    exported = tmp_path / "export.csv"
    exported.write_text(fm("devices", "list", "--csv", *flags)[1])
    assert exported.read_text().splitlines()[0] == "device_id,groups,tags,status,attr.keep,attr.site"
    assert exported.read_text().splitlines()[1] == "new-1,g1,t1;t2,suspended,,south"
    assert json.loads(fm("devices", "import", str(exported), "--json", *flags)[1])["unchanged"] == 3
    typed = fm("devices", "update", "new-2", "--attr-json", "floor=2", "--json", *flags)[1]
    assert json.loads(typed)["attributes"] == {"floor": 2}
    assert "new-2,,,active,2,," in fm("devices", "list", "--csv", *flags)[1]  # as its JSON text
    reg = DeviceRegistry(url)
    try:
        old = reg.get("old-1")
        assert old is not None and old.groups == ("g1", "g2") and old.attributes == {"keep": "1", "site": "north"}
        v = reg.version()
    finally:
        reg.close()

    bad = tmp_path / "bad.csv"
    bad.write_text("device_id,groups,status\n"
                   "ok-1,g1,\n"
                   "bad id,g1,\n"
                   "ok-2,g 1,\n"
                   "ok-3,g1,dormant\n")
    code, _, errs = fm("devices", "import", str(bad), *flags)
    assert code == 2
    lines = [ln for ln in errs.splitlines() if ln.startswith(str(bad))]
    assert [ln.split(":")[1] for ln in lines] == ["3", "4", "5"], errs
    assert "3 bad row(s): nothing imported" in flat(errs)
    report = json.loads(fm("devices", "import", str(bad), "--json", *flags)[1])
    assert report["imported"] is False and [e["line"] for e in report["errors"]] == [3, 4, 5]
    reg = DeviceRegistry(url)
    try:
        assert reg.get("ok-1") is None and reg.version() == v  # all or nothing
    finally:
        reg.close()
    code, _, errs = fm("devices", "import", str(tmp_path / "missing.csv"), *flags)
    assert code == 2 and "cannot read" in errs


def test_the_installed_command_has_devices(tmp_path: Path) -> None:
    """The sub-command is wired into ``python -m fieldmesh`` (a real process, stdin as the file)."""
    env = {**os.environ, "FIELDMESH_DATA_DIR": str(tmp_path / "data")}
    r = subprocess.run([sys.executable, "-m", "fieldmesh", "devices", "import", "-", "--json"],
                       input="device_id,groups\nstdin-1,g\n", capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"imported": True, "added": 1, "updated": 0, "unchanged": 0}
    r = subprocess.run([sys.executable, "-m", "fieldmesh", "devices", "list", "--json"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert [d["device_id"] for d in json.loads(r.stdout)] == ["stdin-1"]
