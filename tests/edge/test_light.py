"""The agent runs with the light ``edge`` extra: no cloud-side or optional protocol package is imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_SCRIPT = r"""
import sys, importlib.abc
BLOCKED = {"nats", "fastapi", "uvicorn", "httpx", "duckdb", "confluent_kafka", "psycopg", "psycopg2",
           "pyiceberg", "pyarrow", "prometheus_client", "onnxruntime", "pymodbus", "asyncua", "sklearn"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, Block())
from fieldmesh.edge.agent import EdgeAgent
from fieldmesh.edge.config import parse_config
from fieldmesh.core.errors import MissingDependency
cfg = parse_config({"sources": [{"simulator": {"devices": 2}}], "buffer": {"path": sys.argv[1]}})
EdgeAgent(cfg)
try:
    EdgeAgent(parse_config({"sources": [{"modbus": {"device_id": "m", "registers": {}}}],
                            "buffer": {"path": sys.argv[1]}}))
except MissingDependency as exc:
    print("hint:", exc)
from fieldmesh.edge.provision import build_csr, new_key, provision  # the device side of provisioning
from fieldmesh.edge.cli import app
assert "fieldmesh.control.ca" not in sys.modules and "fieldmesh.store.registry" not in sys.modules
print(build_csr(new_key(), "pump-7").splitlines()[0])
print("ok")
"""


def test_agent_imports_only_light_dependencies(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "pip install 'fieldmesh[edge-modbus]'" in out.stdout
    assert "-----BEGIN CERTIFICATE REQUEST-----" in out.stdout
    assert out.stdout.strip().endswith("ok")
