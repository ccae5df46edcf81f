"""``fieldmesh jobs`` over a real SQLite store: keys, signing, jobs and rollouts."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from typer.testing import CliRunner

from fieldmesh.cli.main import app
from fieldmesh.edge.ota import SlotStore, load_trusted_keys
from fieldmesh.store.jobs import JobStore

runner = CliRunner()


def fm(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_keygen_sign_and_a_device_verifies(tmp_path: Path) -> None:
    code, _, errs = fm("jobs", "keygen", str(tmp_path / "keys"))
    assert code == 0, errs
    assert stat.S_IMODE((tmp_path / "keys" / "signing.key").stat().st_mode) == 0o600
    assert fm("jobs", "keygen", str(tmp_path / "keys"))[0] == 2  # never overwritten
    blob = tmp_path / "model.onnx"
    blob.write_bytes(b"model bytes" * 100)
    code, out, errs = fm("jobs", "sign", str(blob), "--key", str(tmp_path / "keys" / "signing.key"), "--kind", "model",
                         "--name", "anomaly", "--version", "2.0", "--url", blob.as_uri())
    assert code == 0, errs
    m = json.loads(out)
    assert m["url"] == blob.as_uri() and m["size"] == 1100
    slots = SlotStore(tmp_path / "dev", trusted_keys=load_trusted_keys([tmp_path / "keys" / "signing.pub"]))
    assert slots.install(m, blob.read_bytes()).version == "2.0"
    code, _, errs = fm("jobs", "sign", str(blob), "--key", str(tmp_path / "keys" / "signing.pub"), "--kind", "model",
                       "--name", "x", "--version", "1", "--url", "file:///x")
    assert code == 2 and "error" in errs


def test_jobs_and_rollouts(tmp_path: Path) -> None:
    flags = ["--data-dir", str(tmp_path / "data")]
    code, out, errs = fm("jobs", "create", "--op", "report", "--devices", "a,b,c", "--id", "j1", "--timeout", "5",
                         "--attempts", "2", "--json", *flags)
    assert code == 0, errs
    assert json.loads(out)["max_attempts"] == 2
    code, out, _ = fm("jobs", "list", "--json", *flags)
    assert [(j["job_id"], j["counts"]["queued"]) for j in json.loads(out)] == [("j1", 3)]
    code, out, _ = fm("jobs", "show", "j1", "--json", *flags)
    assert [e["device_id"] for e in json.loads(out)["executions"]] == ["a", "b", "c"]
    code, _, errs = fm("jobs", "cancel", "j1", *flags)
    assert code == 0 and "canceling" in errs
    assert fm("jobs", "show", "nope", *flags)[0] == 2
    assert fm("jobs", "create", "--op", "report", *flags)[0] == 2  # no targets
    code, _, errs = fm("jobs", "create", "--op", "report", "--query", "{bad", *flags)
    assert code == 2 and "query" in errs

    fm("jobs", "keygen", str(tmp_path / "keys"))
    blob = tmp_path / "fw.bin"
    blob.write_bytes(b"\x7fELF firmware")
    _, out, _ = fm("jobs", "sign", str(blob), "--key", str(tmp_path / "keys" / "signing.key"), "--kind", "firmware",
                   "--name", "fw", "--version", "3.1", "--url", "https://fw.example/3.1.bin")
    spec = {"rollout_id": "r1", "artifact": json.loads(out), "targets": {"groups": ["plant-1"]}, "canary": 1}
    (tmp_path / "r1.json").write_text(json.dumps(spec))
    code, _, errs = fm("jobs", "rollout", "create", f"@{tmp_path / 'r1.json'}", *flags)
    assert code == 0, errs
    code, out, _ = fm("jobs", "rollout", "show", "r1", "--json", *flags)
    v = json.loads(out)
    assert v["status"] == "pending" and v["artifact"]["version"] == "3.1"
    code, _, errs = fm("jobs", "rollout", "cancel", "r1", *flags)
    assert code == 0 and "canceling" in errs
    js = JobStore(f"sqlite:///{(tmp_path / 'data' / 'store.db').resolve()}")
    assert js.get_rollout("r1").status == "canceling" and js.get_job("j1").status == "canceling"
    js.close()
    code, _, errs = fm("jobs", "rollout", "create", json.dumps({**spec, "stages": [10]}), *flags)
    assert code == 2 and "stages" in errs
