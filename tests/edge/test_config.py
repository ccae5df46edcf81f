"""Config errors name the key to fix; the example config is valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fieldmesh.core.errors import ConfigError
from fieldmesh.edge.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        (
            {"sources": [{"modbus": {"device_id": "m", "port": "x", "registers": {}}}]},
            "sources[0].modbus.port",
        ),
        ({"sources": [{"simulator": {}}], "buffer": {"full_policy": "keep"}}, "buffer.full_policy"),
        ({"sources": [{"simulator": {}, "mqtt": {}}]}, "sources[0]"),
        ({"sources": []}, "sources"),
        ({"sources": [{"simulator": {"devices": 0}}]}, "sources[0].simulator.devices"),
        ({"sources": [{"simulator": {}}], "uplink": {"prot": 1}}, "uplink.prot"),
    ],
)
def test_errors_name_the_key(doc: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(doc)
    assert ei.value.key == key
    assert f"{key}:" in str(ei.value)


def test_unknown_unit_names_the_key(tmp_path: Path) -> None:
    from fieldmesh.edge.frame import DeviceIndex
    from fieldmesh.edge.preprocess import Preprocessor

    cfg = parse_config({"sources": [{"simulator": {}}], "preprocess": {"metrics": {"t": {"unit": "F->X"}}}})
    with pytest.raises(ConfigError, match=r"preprocess\.metrics\.t\.unit"):
        Preprocessor(cfg.preprocess, DeviceIndex())


def test_malformed_file_cli_exit_code(tmp_path: Path) -> None:
    p = tmp_path / "edge.yaml"
    p.write_text("sources:\n  - modbus: {device_id: m, port: 99999, registers: {}}\n")
    out = subprocess.run(
        [sys.executable, "-m", "fieldmesh.edge", "run", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "sources[0].modbus.port" in out.stderr
    p.write_text("sources: [ {simulator: ")
    out = subprocess.run(
        [sys.executable, "-m", "fieldmesh.edge", "--config", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "not valid YAML" in out.stderr


def test_example_config_is_valid() -> None:
    cfg = load_config(ROOT / "examples" / "edge.yaml")
    assert {s.kind for s in cfg.sources} >= {"simulator", "modbus", "opcua", "mqtt"}
