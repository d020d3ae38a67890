"""http_service: the JSON handler over a real keep-alive connection on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
from http import HTTPStatus

import pytest
from kuberl_runtime.http_service import JSONHandler, ThreadedServer


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
