"""NATS bus URLs with credentials: in the URL, or in a file the URL names (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fieldmesh.bus.nats import NatsBus
from fieldmesh.core.errors import ConfigError


def test_auth_file_gives_user_and_password(tmp_path: Path) -> None:
    f = tmp_path / "internal.json"
    f.write_text(json.dumps({"user": "fm-internal", "password": "pw"}))
    bus = NatsBus(f"nats://127.0.0.1:4222,127.0.0.1:4223?auth_file={f}")
    assert bus._servers == "nats://127.0.0.1:4222,127.0.0.1:4223"
    assert bus._auth == {"user": "fm-internal", "password": "pw"}


def test_creds_file_is_passed_to_nats_py() -> None:
    bus = NatsBus("tls://nats.example:4222?creds=/etc/fm/user.creds")
    assert bus._servers == "tls://nats.example:4222" and bus._auth == {"user_credentials": "/etc/fm/user.creds"}


def test_plain_url_is_unchanged() -> None:
    bus = NatsBus("nats://u:p@127.0.0.1:4222")
    assert bus._servers == "nats://u:p@127.0.0.1:4222" and bus._auth == {}


@pytest.mark.parametrize("query", ["auth_file=/nonexistent/x.json", "tokn=abc"])
def test_bad_parameters_name_the_setting(query: str) -> None:
    with pytest.raises(ConfigError) as ei:
        NatsBus(f"nats://127.0.0.1:4222?{query}")
    assert ei.value.key == "bus_url"
