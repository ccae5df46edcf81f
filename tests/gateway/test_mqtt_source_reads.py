"""The gateway's MQTT socket reads: many packets per system call, served exactly as paho asks for them."""

from __future__ import annotations

import socket

import pytest

from fieldmesh.gateway.sources import _BufferedSocket


def test_reads_are_served_from_one_recv_in_the_sizes_asked() -> None:
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        buf = _BufferedSocket(b)
        packets = [bytes([0x32, 5]) + b"hello", bytes([0x30, 2]) + b"ok"]
        a.sendall(b"".join(packets))
        got = []
        for p in packets:  # paho: the type byte, one length byte, then the rest
            got.append(buf.recv(1) + buf.recv(1) + buf.recv(p[1]))
        assert got == packets
        assert buf.pending() == 0
        with pytest.raises(BlockingIOError):  # nothing left, as the socket says
            buf.recv(1)
    finally:
        a.close()
        b.close()


def test_pending_counts_what_is_read_and_not_taken_and_eof_is_empty() -> None:
    a, b = socket.socketpair()
    try:
        buf = _BufferedSocket(b)
        a.sendall(b"x" * 10_000)
        assert buf.recv(3) == b"xxx"
        assert 0 < buf.pending() <= 9_997  # what its one recv got, less the 3 taken
        rest = b""
        while len(rest) < 9_997:
            rest += buf.recv(100_000)
        assert rest == b"x" * 9_997 and buf.pending() == 0
        a.close()
        assert buf.recv(1) == b""  # closed by the peer
        assert buf.fileno() == b.fileno()  # everything else is the socket's
    finally:
        b.close()
