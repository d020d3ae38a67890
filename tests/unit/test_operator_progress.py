"""The operator's progress reader against a real HTTP server on 127.0.0.1: what it reads, when it
does not ask (rate limit, driver not running, no IP), and that a bad endpoint is never an error."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kuberl_operator.progress import DEFAULT_PORT, ProgressReader, progress_url
from kuberl_runtime.contract import Progress

TEMPLATE = "http://127.0.0.1:{port}/progress"


class Server:
    """Serves `body` at /progress with `status`; counts requests."""

    def __init__(self, body: bytes, status: int = 200):
        self.body, self.status, self.requests = body, status, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests += 1
                self.send_response(outer.status)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served():
    servers = []

    def make(body, status=200):
        s = Server(body if isinstance(body, bytes) else json.dumps(body).encode(), status)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def job(port: int | None = None) -> dict:
    runtime = {"logging": {"port": port}} if port else {}
    return {"metadata": {"name": "j", "namespace": "ns", "uid": "uid-j"}, "spec": {"runtime": runtime}}


def driver(phase: str = "Running", ip: str | None = "10.0.0.7", name: str = "j-trainer-0",
           owner: str = "uid-j") -> dict:
    status = {"phase": phase, **({"podIP": ip} if ip else {})}
    refs = [{"kind": "RLJob", "name": "j", "uid": owner, "controller": True}]
    return {"metadata": {"name": name, "ownerReferences": refs}, "status": status}


def read(reader: ProgressReader, j: dict, pods: list[dict]):
    async def go():
        try:
            return await reader.read(j, pods)
        finally:
            await reader.close()
    return asyncio.run(go())


DOC = Progress(state="running", step=12, total_steps=50, reward_mean=0.5, weights_version=12).model_dump(
    mode="json", by_alias=True)


def test_url_defaults_to_the_runtime_port_on_the_pod_ip():
    assert DEFAULT_PORT == 8470
    assert progress_url("http://{pod_ip}:{port}/progress", job(), driver()) == "http://10.0.0.7:8470/progress"
    assert progress_url("{namespace}/{job}/{pod}:{port}", job(9000), driver()) == "ns/j/j-trainer-0:9000"
    assert progress_url("http://{pod_ip}:{port}/progress", job(), driver(ip=None)) is None


def test_reads_the_document(served):
    s = served(DOC)
    p = read(ProgressReader(interval=10, url_template=TEMPLATE), job(s.port), [driver()])
    assert (p.step, p.total_steps, p.reward_mean, p.weights_version) == (12, 50, 0.5, 12)


def test_one_request_per_interval_however_often_asked(served):
    s = served(DOC)
    reader = ProgressReader(interval=3600, url_template=TEMPLATE)

    async def twice():
        try:
            return [await reader.read(job(s.port), [driver()]) for _ in range(2)]
        finally:
            await reader.close()

    first, second = asyncio.run(twice())
    assert first is not None and second is None and s.requests == 1
    reader.forget(("ns", "j"))  # a deleted (or re-created) job starts afresh


@pytest.mark.parametrize("pods", [[], [driver(phase="Pending")], [driver(name="j-trainer-1")], [driver(ip=None)],
                                  [driver(owner="uid-of-the-previous-j")]])  # deleted, its pods not yet
def test_no_request_without_a_running_driver_with_an_ip(served, pods):
    s = served(DOC)
    assert read(ProgressReader(interval=1, url_template=TEMPLATE), job(s.port), pods) is None
    assert s.requests == 0


@pytest.mark.parametrize("body,status", [(b"not json", 200), (json.dumps({"step": "many"}).encode(), 200),
                                         (json.dumps(DOC).encode(), 503)])
def test_a_bad_answer_is_no_progress_not_an_error(served, body, status):
    s = served(body, status)
    assert read(ProgressReader(interval=1, url_template=TEMPLATE), job(s.port), [driver()]) is None
    assert s.requests == 1


def test_nothing_listening_is_no_progress():
    s = Server(b"")
    port = s.port
    s.close()
    assert read(ProgressReader(interval=1, url_template=TEMPLATE), job(port), [driver()]) is None


def test_interval_zero_turns_reading_off(served):
    s = served(DOC)
    assert read(ProgressReader(interval=0, url_template=TEMPLATE), job(s.port), [driver()]) is None
    assert s.requests == 0
