"""The delivery process's webhook client against a real HTTP server: one kept-alive connection per sending
thread, a connection the receiver closed meanwhile opened again (same try, one delivery), credentials in the
URL sent as basic authentication, a non-2xx and a refused connection reported as failed tries."""

from __future__ import annotations

import base64
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fieldmesh.stream.sender import Deliverer


class _Receiver:
    def __init__(self, *, close_after: int = 0) -> None:
        self.silent_close = False  # close each connection after its answer, without "Connection: close"
        self.posts: list[tuple[str, str | None, int, bytes]] = []  # path, Authorization, client port, body
        rec = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                rec.posts.append((self.path, self.headers.get("Authorization"), self.client_address[1], body))
                self.send_response(503 if self.path == "/broken" else 204)
                if close_after and len(rec.posts) % close_after == 0:
                    self.send_header("Connection", "close")
                self.end_headers()
                if rec.silent_close:
                    self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_keep_alive_reconnect_auth_and_failures() -> None:
    rec = _Receiver()
    d = Deliverer(timeout_s=5, mqtt_url=None)
    try:
        for i in range(5):
            assert d.send("webhook", f"{rec.base}/hook?i={i}", b'{"n": %d}' % i, f"fm-{i}") is None
        assert [p[0] for p in rec.posts] == [f"/hook?i={i}" for i in range(5)]
        assert len({p[2] for p in rec.posts}) == 1, "one kept-alive connection for one thread"
        assert [p[3] for p in rec.posts] == [b'{"n": %d}' % i for i in range(5)]

        # a receiver that drops idle connections without saying so: each try goes out again on a new one
        rec.silent_close = True
        for i in range(3):
            assert d.send("webhook", f"{rec.base}/again", b"{}", f"fm-{20 + i}") is None
        assert [p[0] for p in rec.posts[5:]] == ["/again"] * 3, "each delivered once"

        # credentials in the URL: basic authentication (not in the request line)
        port = rec.server.server_address[1]
        assert d.send("webhook", f"http://ops:s%40cret@127.0.0.1:{port}/auth", b"{}", "fm-10") is None
        assert rec.posts[-1][:2] == ("/auth", "Basic " + base64.b64encode(b"ops:s@cret").decode())

        err = d.send("webhook", f"http://127.0.0.1:{port}/broken", b"{}", "fm-11")
        assert err is not None and "503" in err
        rec.close()
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        err = d.send("webhook", f"http://127.0.0.1:{free}/hook", b"{}", "fm-12")
        assert err is not None and "Connection" in err
        assert d.send("webhook", "ftp://127.0.0.1/x", b"{}", "fm-13") is not None
    finally:
        d.close()


def test_receiver_closing_each_connection() -> None:
    rec = _Receiver(close_after=1)  # "Connection: close" on every answer
    d = Deliverer(timeout_s=5, mqtt_url=None)
    try:
        for i in range(4):
            assert d.send("webhook", f"{rec.base}/h", b"{}", f"fm-{i}") is None
        assert len(rec.posts) == 4 and len({p[2] for p in rec.posts}) == 4
    finally:
        d.close()
        rec.close()


def test_pipe_backlog_keeps_every_request_in_order() -> None:
    """More than the pipe takes at once (about 20 MB of bodies in two calls): the rest goes from the writer
    thread, after what was written, so every request reaches the delivery process whole and is answered."""
    from fieldmesh.stream.notifier import _SenderProcess

    rec = _Receiver()
    answers: dict[int, str | None] = {}
    done = threading.Event()
    n = 200

    def on_result(seq: int, err: str | None) -> None:
        answers[seq] = err
        if len(answers) == n:
            done.set()

    child = _SenderProcess({"timeout_s": 10}, on_result=on_result, on_exit=lambda c, unanswered: None)
    try:
        body = b'{"pad": "' + b"x" * 100_000 + b'"}'
        reqs = [[i, "webhook", f"{rec.base}/h{i}", body, f"fm-{i}"] for i in range(n)]
        assert child.send(reqs[: n // 2])
        assert child._pending, "10 MB: the pipe took part, the writer thread has the rest"
        assert child.send(reqs[n // 2:])  # goes after what is pending
        assert done.wait(60), f"{len(answers)} of {n} answered"
        assert all(err is None for err in answers.values())
        assert sorted(p[0] for p in rec.posts) == sorted(f"/h{i}" for i in range(n))
        assert all(p[3] == body for p in rec.posts)
    finally:
        child.close(30)
        rec.close()
