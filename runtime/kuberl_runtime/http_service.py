"""The HTTP plumbing the runtime's small servers share: JSON handlers and a server in a daemon thread.

    class _Handler(JSONHandler):
        def do_POST(self) -> None:
            self._answer(lambda body: {"echo": body})   # 200 with the result, or the error's status

    server = ThreadedServer(_Handler, port=0, name="echo-http").start()   # server.port: the bound port
    server.close()

Used by the rollout pod (`rollout_server`), the reference/reward/critic pods (`role_servers`) and
the progress endpoint (`progress`, which serves text too and so uses only ThreadedServer). Each
server keeps its own routes; what an error becomes is `JSONHandler.error_reply`, which a server may
extend (the role servers map ConfigError/DataError to 422).
"""

from __future__ import annotations

import json
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Self


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
        self._body_unread = False
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: HTTPStatus, doc: dict[str, Any]) -> None:
        if getattr(self, "_body_unread", False):
            # A reply without reading the body (404, 405): drain it, or its bytes would be parsed
            # as the next request on this keep-alive connection.
            try:
                self._read_body()
            except ValueError:  # a Content-Length that is not a number: no telling where it ends
                self.close_connection = True
        data = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
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
    daemon thread after `start()`; `close()` stops it and frees the port."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str = "0.0.0.0", port: int = 0,
                 *, name: str = "http") -> None:
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
