"""``fieldmesh up`` ports: a taken default gives way to a free port (and says so); a taken chosen port is an
error naming the flag."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fieldmesh.core.errors import ConfigError
from fieldmesh.runtime.natsserver import port_in_use
from fieldmesh.runtime.up import UpOptions, check_ports


@contextmanager
def taken_port() -> Iterator[int]:
    """A port something listens on for the duration."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_taken_default_port_is_replaced_by_a_free_one_and_said(tmp_path: Path):
    with taken_port() as mqtt, taken_port() as http:
        opts = UpOptions(data_dir=tmp_path, mqtt_port=mqtt, http_port=http, mqtt_port_chosen=False,
                         http_port_chosen=False)
        notes = check_ports(opts)
        assert opts.mqtt_port not in (0, mqtt, http) and not port_in_use(opts.mqtt_port)
        assert opts.http_port not in (0, mqtt, http, opts.mqtt_port) and not port_in_use(opts.http_port)
    assert notes == [
        f"MQTT port {mqtt} is taken, so MQTT is on {opts.mqtt_port} (choose with --mqtt-port)",
        f"HTTP port {http} is taken, so the API is on {opts.http_port} (choose with --http-port)",
    ]


def test_a_free_default_port_is_kept_without_a_note(tmp_path: Path):
    with taken_port() as mqtt, taken_port() as http:
        pass  # now free again
    opts = UpOptions(data_dir=tmp_path, mqtt_port=mqtt, http_port=http, mqtt_port_chosen=False,
                     http_port_chosen=False)
    assert check_ports(opts) == []
    assert (opts.mqtt_port, opts.http_port) == (mqtt, http)


@pytest.mark.parametrize("which", ["mqtt", "http"])
def test_a_taken_chosen_port_is_an_error_naming_the_flag(tmp_path: Path, which: str):
    with taken_port() as port:
        opts = UpOptions(data_dir=tmp_path, **{"mqtt_port": 0, "http_port": 0, f"{which}_port": port})
        with pytest.raises(ConfigError) as exc:
            check_ports(opts)
    assert f"port {port} is already in use" in str(exc.value)
    assert f"--{which}-port" in str(exc.value)
    assert exc.value.key == f"{which}_port"


def test_port_zero_is_a_free_port_without_a_note_and_an_external_broker_needs_none(tmp_path: Path):
    opts = UpOptions(data_dir=tmp_path, mqtt_port=0, http_port=0)
    assert check_ports(opts) == []
    assert 0 not in (opts.mqtt_port, opts.http_port) and opts.mqtt_port != opts.http_port
    with taken_port() as port:  # with --mqtt-url no MQTT listener is started: its port does not matter
        opts = UpOptions(data_dir=tmp_path, mqtt_port=port, http_port=0, mqtt_url=f"mqtt://127.0.0.1:{port}")
        assert check_ports(opts) == [] and opts.mqtt_port == port
