"""The HTTP plumbing the runtime's small servers share: JSON handlers, a server in a daemon thread,
and the clients' keep-alive POST.

    class _Handler(JSONHandler):
        def do_POST(self) -> None:
            self._answer(lambda body: {"echo": body})   # 200 with the result, or the error's status

    server = ThreadedServer(_Handler, port=0, name="echo-http").start()   # server.port: the bound port
    status, doc = post_json(http.client.HTTPConnection("127.0.0.1", server.port), "/echo", {"a": 1})
    server.close()

Used by the rollout pod (`rollout_server`), the reference/reward/critic pods (`role_servers`) and
the progress endpoint (`progress`, which serves text too and so uses only ThreadedServer). Each
server keeps its own routes; what an error becomes is `JSONHandler.error_reply`, which a server may
extend (the role servers map ConfigError/DataError to 422).

Every connection has a socket timeout (`timeout_s`, 60 s by default): a client that connects and
sends nothing, or stops in the middle of a request, is disconnected instead of holding a handler
thread forever (a body that stops arriving is answered 408 first). The same timeout closes
keep-alive connections idle that long, so `post_json` reconnects when it finds its connection
closed by the server.
"""

from __future__ import annotations

import http.client
import json
import selectors
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Self

CONNECTION_TIMEOUT_S = 60.0  # per socket read/write on the server: long enough for any client that is sending


class RequestError(Exception):
    """A request the server refuses: `status`, and `{"error": message, **extra}` as the body."""

    def __init__(self, status: HTTPStatus, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class JSONHandler(BaseHTTPRequestHandler):
    """JSON in, JSON out, over keep-alive connections; no access log."""

    protocol_version = "HTTP/1.1"  # keep-alive: each trainer rank keeps one connection per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass  # one line per request would drown the job's log

    def parse_request(self) -> bool:
        self._body_unread = True  # per request: a keep-alive connection reuses this handler
        return super().parse_request()

    def _read_body(self) -> bytes:
        """The request's body: RequestError 400 for a bad Content-Length, 408 when the body does not
        arrive within the connection's timeout. Either closes the connection after the reply: where
        the next request would start is unknown."""
        self._body_unread = False
        header = self.headers.get("Content-Length") or "0"
        try:
            length = int(header)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length: must be an integer >= 0, not {header!r}")
        try:
            return self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise RequestError(HTTPStatus.REQUEST_TIMEOUT,
                               f"the body ({length} bytes) did not arrive within {self.timeout:g} s") from None

    def _reply(self, status: HTTPStatus, doc: dict[str, Any]) -> None:
        if getattr(self, "_body_unread", False):
            # A reply without reading the body (404, 405): drain it, or its bytes would be parsed
            # as the next request on this keep-alive connection.
            try:
                self._read_body()
            except RequestError:  # it closes the connection: the reply stays the one asked for
                pass
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _read_json(self) -> Any:
        """The request's body as JSON (None when empty); RequestError 400 when it is not JSON."""
        try:
            return json.loads(self._read_body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON: {e}") from None

    def _answer(self, call: Callable[[Any], dict[str, Any]]) -> None:
        """Reply 200 with `call(body)`, or with what its error becomes (`error_reply`)."""
        try:
            self._reply(HTTPStatus.OK, call(self._read_json()))
        except Exception as e:  # noqa: BLE001 - a failure is reported, the server lives on
            self._reply(*self.error_reply(e))

    def error_reply(self, e: Exception) -> tuple[HTTPStatus, dict[str, Any]]:
        """A RequestError's own status and fields; anything else is a 500 naming the exception."""
        if isinstance(e, RequestError):
            return e.status, {"error": e.message, **e.extra}
        return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"}


class ThreadedServer:
    """A ThreadingHTTPServer bound at construction (port 0: a free one, read `.port`), served from a
    daemon thread after `start()`; `close()` stops it and frees the port. `timeout_s` bounds every
    socket read and write of a connection (an idle keep-alive connection is closed after it)."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str = "0.0.0.0", port: int = 0,
                 *, name: str = "http", timeout_s: float = CONNECTION_TIMEOUT_S) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, not {timeout_s}")
        # StreamRequestHandler.setup() applies `timeout` to the connection's socket.
        handler = type(handler.__name__, (handler,), {"timeout": timeout_s})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        # A short poll interval: close() waits up to one interval for the serving loop to notice.
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       name=name, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> Self:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def post_json(conn: http.client.HTTPConnection, path: str, body: Any) -> tuple[int, Any]:
    """POST `body` as JSON over a keep-alive connection: (status, the answer's JSON; {} when empty).

    A server closes a connection left idle for its timeout. Such a connection is reopened before
    use, and a request on a reused connection that closes before the first byte of an answer (the
    server's timeout fired just as it was sent) is sent once more on a new connection: our servers
    close a connection without answering only before they read a whole request, so the resend
    cannot run one twice. Once the answer has begun the server has run the request: a connection
    lost then is an error, never a resend (a second `train_step` would be a second optimizer step).
    Errors propagate (OSError, http.client.HTTPException, json.JSONDecodeError).
    """
    data = json.dumps(body, default=str).encode()
    if conn.sock is not None and _closed_by_peer(conn.sock):
        conn.close()
    reused = conn.sock is not None
    try:
        _send(conn, path, data)
    except (ConnectionResetError, BrokenPipeError):  # closed unanswered (http.client.RemoteDisconnected too)
        if not reused:
            raise
        conn.close()
        _send(conn, path, data)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")


def _send(conn: http.client.HTTPConnection, path: str, data: bytes) -> None:
    """Send the request and wait for the first byte of the answer (left unread for getresponse);
    RemoteDisconnected or ConnectionResetError when the connection closes before it."""
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    if not conn.sock.recv(1, socket.MSG_PEEK):  # the socket's timeout applies, as to getresponse
        conn.close()
        raise http.client.RemoteDisconnected("Remote end closed connection without response")


def _closed_by_peer(sock) -> bool:
    """Whether an idle keep-alive socket is readable: the server closed it (nothing else is sent
    unasked), so it cannot carry a request."""
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(timeout=0))
