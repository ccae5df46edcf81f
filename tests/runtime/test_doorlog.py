"""Counting the door's refusals from its log: the lines nats-server and Mosquitto write (as seen in
tests/runtime/test_door_tls.py's runs), read incrementally."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldmesh.runtime.doorlog import DoorRefusals

NATS = """\
[1] [ERR] 127.0.0.1:1 - mid:10 - TLS handshake error: EOF
[1] [ERR] 127.0.0.1:1 - mid:28 - TLS handshake error: tls: client didn't provide a certificate
[1] [ERR] 127.0.0.1:1 - mid:30 - TLS handshake error: tls: failed to verify certificate: x509: certificate has expired
[1] [ERR] 127.0.0.1:1 - mid:53 - "probe-69ee6322" - authentication error
[1] [ERR] 127.0.0.1:1 - mid:53 - "probe-69ee6322" - unable to connect: authentication error
[1] [ERR] 127.0.0.1:1 - cid:28 - authentication error
[1] [ERR] 127.0.0.1:1 - cid:29 - authentication error - User "fm-internal"
[1] [ERR] 127.0.0.1:1 - mid:33 - "probe-e2125809" - Subscription Violation - Subject ">", SID >
[1] [ERR] 127.0.0.1:1 - mid:58 - "probe-867846d3" - Publish Violation - Subject "fm.readings.0"
[1] [INF] Server is ready
"""
MOSQUITTO = """\
2026-12-03T01:03:47: OpenSSL Error[0]: error:0A0000C7:SSL routines::peer did not return a certificate
2026-12-03T01:03:47: Client <unknown> disconnected: Protocol error.
2026-12-03T01:03:48: Client connection from 127.0.0.1 failed: error:0A000086:SSL routines::certificate verify failed.
2026-12-03T01:03:48: Client connection from 127.0.0.1 failed: error:0A000102:SSL routines::unsupported protocol.
2026-12-03T01:03:48: New client connected from 127.0.0.1:60827 as fm-gw (p5, c0, k30, u'fm-internal').
"""


def test_nats_lines_by_reason(tmp_path: Path) -> None:
    log = tmp_path / "nats-server.log"
    log.write_text("[1] 2026/12/03 01:00:00.000000 [ERR] 1.2.3.4:5 - mid:1 - \"old\" - authentication error\n")
    r = DoorRefusals(log, "nats")  # what the log held before is not this run's
    with open(log, "a") as f:
        f.write(NATS)
    assert r.counts() == {"tls_handshake": 2, "unknown_device": 1, "publish_denied": 1, "subscribe_denied": 1,
                          "bus_authentication": 2}


def test_mosquitto_lines_by_reason(tmp_path: Path) -> None:
    log = tmp_path / "mosquitto.log"  # not there yet: the door starts after the counter
    r = DoorRefusals(log, "mosquitto")
    assert r.counts()["tls_handshake"] == 0
    log.write_text(MOSQUITTO)
    assert r.counts()["tls_handshake"] == 3


def test_a_line_being_written_counts_once_complete_and_a_new_file_is_read_from_its_start(tmp_path: Path) -> None:
    log = tmp_path / "nats-server.log"
    log.write_text("")
    r = DoorRefusals(log, "nats")
    line = '[1] 2026/12/03 01:03:34.239336 [ERR] 1.2.3.4:5 - mid:53 - "p" - authentication error\n'
    with open(log, "a") as f:
        f.write(line[:40])
    assert r.counts()["unknown_device"] == 0
    with open(log, "a") as f:
        f.write(line[40:])
    assert r.counts()["unknown_device"] == 1
    log.write_text("[1] - cid:1 - authentication error\n")  # replaced by a shorter file: read from its start
    assert r.counts()["bus_authentication"] == 1


def test_an_unknown_kind_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown door kind"):
        DoorRefusals(tmp_path / "x.log", "emqx")
