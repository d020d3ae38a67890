"""http_service: the JSON handler, its connection timeout and post_json, over real connections on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import select
import socket
import struct
import threading
from http import HTTPStatus

import pytest
from kuberl_runtime.http_service import JSONHandler, ThreadedServer, post_json


class _Echo(JSONHandler):
    def do_POST(self) -> None:
        if self.path != "/echo":  # answered without reading the body, as the role/rollout servers do
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}"})
            return
        self._answer(lambda body: {"echo": body})


@pytest.fixture
def server():
    s = ThreadedServer(_Echo, host="127.0.0.1", name="echo-http").start()
    yield s
    s.close()


def test_a_request_answered_without_reading_its_body_leaves_the_connection_usable(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", "/wrong", body=json.dumps({"prompts": [[1, 2]]}))
        resp = conn.getresponse()
        assert resp.status == 404 and json.loads(resp.read())["error"] == "no such path /wrong"
        # Same connection: before, the unread body was parsed as this request's line (400, HTML).
        conn.request("POST", "/echo", body=json.dumps({"a": 1}))
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"echo": {"a": 1}}
    finally:
        conn.close()


@pytest.fixture
def short_timeout_server():
    s = ThreadedServer(_Echo, host="127.0.0.1", name="echo-http", timeout_s=0.5).start()
    yield s
    s.close()


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (recv returns b"")."""
    sock.settimeout(30)  # far past the server's timeout: a server that never closes fails here
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def _echo(port: int) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        return post_json(conn, "/echo", {"a": 1})
    finally:
        conn.close()


def test_a_silent_client_is_disconnected_and_the_server_still_serves(short_timeout_server):
    port = short_timeout_server.port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
        assert _until_closed(silent) == b""  # connected, sent nothing: closed without an answer
    assert _echo(port) == (200, {"echo": {"a": 1}})


def test_a_body_that_stops_arriving_is_answered_408_and_closed(short_timeout_server):
    port = short_timeout_server.port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as partial:
        partial.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"a": 1')
        head, _, body = _until_closed(partial).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"Connection: close" in head
    assert json.loads(body)["error"] == "the body (100 bytes) did not arrive within 0.5 s"
    assert _echo(port) == (200, {"echo": {"a": 1}})


def test_a_bad_content_length_is_a_400_that_closes_the_connection(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n{}")
        head, _, body = _until_closed(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"] == "Content-Length: must be an integer >= 0, not 'many'"


def test_post_json_reopens_a_keep_alive_connection_the_server_closed(short_timeout_server):
    conn = http.client.HTTPConnection("127.0.0.1", short_timeout_server.port, timeout=30)
    try:
        assert post_json(conn, "/echo", {"n": 1}) == (200, {"echo": {"n": 1}})
        first = conn.sock
        # The server closes the idle connection after its timeout: the socket turns readable (EOF).
        assert select.select([first], [], [], 30)[0] == [first]
        assert post_json(conn, "/echo", {"n": 2}) == (200, {"echo": {"n": 2}})
        assert conn.sock is not first  # a new connection carried it
    finally:
        conn.close()


class _DropsSecond(JSONHandler):
    """Answers the first request of a connection; closes it at the second without reading its body
    or answering, as a server whose idle timeout fires just as the request arrives does."""

    seen: list  # the bodies of the requests it read; "unread" for the one it dropped

    def do_POST(self) -> None:
        if getattr(self, "_served", False):
            self.seen.append("unread")
            self.close_connection = True
            return
        body = self._read_json()
        self.seen.append(body)
        self._served = True
        self._reply(HTTPStatus.OK, {"echo": body})


def test_post_json_resends_once_when_a_reused_connection_closes_unanswered():
    handler = type("Handler", (_DropsSecond,), {"seen": []})
    s = ThreadedServer(handler, host="127.0.0.1").start()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    try:
        assert post_json(conn, "/x", {"n": 1}) == (200, {"echo": {"n": 1}})
        assert post_json(conn, "/x", {"n": 2}) == (200, {"echo": {"n": 2}})  # dropped, then resent
    finally:
        conn.close()
        s.close()
    assert handler.seen == [{"n": 1}, "unread", {"n": 2}]


def _answers_then_resets(listener: socket.socket, seen: list) -> None:
    """A server that reads each request whole; answers a connection's first, and at its second
    starts the answer (status line, headers, part of the body) and then resets the connection, as
    a server killed mid-answer or a proxy in between would."""
    while True:
        try:
            sock, _ = listener.accept()
        except OSError:  # the test closed the listener
            return
        with sock, sock.makefile("rb") as f:
            for n in range(2):
                if not f.readline():
                    break
                length = 0
                while (line := f.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    length = int(value) if name.strip().lower() == b"content-length" else length
                seen.append(json.loads(f.read(length)))
                if n == 0:
                    data = json.dumps({"echo": seen[-1]}).encode()
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
                else:
                    sock.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"echo"')
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close


def test_post_json_never_resends_a_request_the_server_began_to_answer():
    # The server read the request and ran it (a critic train_step: an optimizer step); sending it
    # again would run it twice. Before, a reset while reading the answer's body was resent.
    seen: list = []
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=_answers_then_resets, args=(listener, seen), daemon=True)
    thread.start()
    conn = http.client.HTTPConnection("127.0.0.1", listener.getsockname()[1], timeout=30)
    try:
        assert post_json(conn, "/x", {"n": 1}) == (200, {"echo": {"n": 1}})
        with pytest.raises(ConnectionResetError):
            post_json(conn, "/x", {"n": 2})
    finally:
        conn.close()
        listener.close()
    assert seen == [{"n": 1}, {"n": 2}]  # run once
