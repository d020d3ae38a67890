"""The rollout pod: a generation engine behind a small HTTP API, fed new weights by the trainer.

    KUBERL_ROLE=rollout kuberl-runtime          # what a rollout pod of a disaggregated job runs

    POST /generate   {"prompts": [[token ids]], "sampling": {"temperature": 1.0, "max_new_tokens": 64,
                      "seed": 7, ...}, "weights_version": 3}
                  -> {"responses": [[ids]], "logprobs": [[floats]], "weights_version": 3, "metrics": {...}}
    GET  /readyz     200 once the engine is loaded and holds the trainer's current weights version
                     (and, on local rank 0 of a pod of several engines, so does every engine of the
                     pod); 503 with the reason before (the pod's readiness probe)
    GET  /healthz    200 while the process lives

Errors are JSON `{"error": message}` with a 4xx status the client can act on: 400 for a malformed
request (naming the field), 404/405 for a wrong path or method, 409 when the request expects a
weights version this rollout does not hold (it missed a sync: the trainer fails the job so the
operator restarts the gang), 503 while the engine is still loading. Log-probs travel as JSON
floats, which round-trip float32 exactly.

The process (`serve_rollout`) joins the job's rendezvous, builds its engine from the same runtime
config as the trainer (so version 0, the configured initial model, needs no transfer), serves on
logging.port (KUBERL_HTTP_PORT overrides it for local multi-process runs; 0 picks a free port),
publishes its address in the job's store, then loads every weight sync the trainer broadcasts
until the trainer says stop. Generation and loading take the same lock: a request that arrives
during a sync waits for it instead of seeing half-loaded weights.

A rollout pod with G GPUs runs G / tensorParallelSize such processes (`kuberl-runtime` starts them,
LOCAL_RANK 0..N-1, each seeing its own tensor-parallel GPUs): engine replicas with rollout ranks
pod index x N + LOCAL_RANK. Engine i serves on the pod's port + i; local rank 0's /readyz, on the
pod's port, answers for the whole pod (it asks its siblings, found through their published
addresses).
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import os
import threading
import time
from http import HTTPStatus
from typing import Any, Callable

import torch

from .engines.base import RolloutEngine, SamplingParams
from .http_service import JSONHandler, RequestError, ThreadedServer

ENV_HTTP_PORT = "KUBERL_HTTP_PORT"
ADDRESS_KEY = "kuberl/rollout_address/"  # + rollout rank -> "host:port"
SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


class RolloutService:
    """The engine and its state as the HTTP handlers see it; thread-safe."""

    def __init__(self, engine: RolloutEngine | None = None, *, vocab_size: int | None = None, target_version: int = 0,
                 siblings: Callable[[], list[tuple[str, str | None]]] | None = None):
        self.engine = engine
        self.vocab_size = vocab_size
        self.target_version = target_version  # the trainer's current version, as last announced
        self.lock = threading.Lock()  # generate() and weight loading never overlap
        self.requests = 0
        # The other engine replicas of this pod, (name, "host:port" or None before it published):
        # /readyz on local rank 0 is the pod's readiness, so it is ready only when they all are.
        self.siblings = siblings

    def set_engine(self, engine: RolloutEngine, vocab_size: int | None = None) -> None:
        with self.lock:
            self.engine, self.vocab_size = engine, vocab_size

    @property
    def weights_version(self) -> int | None:
        return None if self.engine is None else self.engine.weights_version

    def readiness(self) -> tuple[bool, str]:
        if self.engine is None:
            return False, "engine loading"
        if self.engine.weights_version != self.target_version:
            return False, f"holds weights version {self.engine.weights_version}, trainer is at {self.target_version}"
        for name, address in self.siblings() if self.siblings else []:
            ready, reason = sibling_readiness(address)
            if not ready:
                return False, f"{name}: {reason}"
        return True, "ready"

    def load(self, named_tensors, version: int) -> None:
        """engine.update_weights under the lock (a sync streams in while generation waits)."""
        with self.lock:
            self.engine.update_weights(named_tensors, version)

    def generate(self, body: Any) -> dict[str, Any]:
        prompts, params, expected = self._parse(body)
        with self.lock:
            if self.engine is None:
                raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "engine loading")
            held = self.engine.weights_version
            if expected is not None and expected != held:
                raise RequestError(
                    HTTPStatus.CONFLICT,
                    f"rollout holds weights version {held}, the request expects {expected} (a missed weight sync)",
                    held=held, expected=expected,
                )  # fmt: skip
            self.requests += 1
            gen = self.engine.generate(prompts, params)
        return {
            "responses": [r.tolist() for r in gen.response_ids],
            "logprobs": [lp.float().tolist() for lp in gen.response_logprobs],
            "weights_version": held,
            "metrics": gen.metrics,
        }

    def _parse(self, body: Any) -> tuple[list[torch.Tensor], SamplingParams, int | None]:
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        unknown = set(body) - {"prompts", "sampling", "weights_version"}
        if unknown:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown fields: {', '.join(sorted(unknown))}")
        raw = body.get("prompts")
        if not isinstance(raw, list) or not raw:
            raise RequestError(HTTPStatus.BAD_REQUEST, "prompts: must be a non-empty list of token-id lists")
        prompts = []
        for i, p in enumerate(raw):
            if not isinstance(p, list) or not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"prompts[{i}]: must be a non-empty list of integers")
            bad = [t for t in p if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
            if bad:
                raise RequestError(
                    HTTPStatus.BAD_REQUEST, f"prompts[{i}]: token id {bad[0]} outside the vocabulary [0, {self.vocab_size})"
                )
            prompts.append(torch.tensor(p, dtype=torch.long))
        params = parse_sampling(body.get("sampling"))
        expected = body.get("weights_version")
        if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool)):
            raise RequestError(HTTPStatus.BAD_REQUEST, "weights_version: must be an integer")
        return prompts, params, expected


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a number


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)  # json.loads reads NaN and Infinity


# field -> (is the value valid, what it must be); checked in this order, the first invalid field is named
SAMPLING_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: no top-k)"),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "ignore_eos": (lambda v: isinstance(v, bool), "true or false"),
    "seed": (lambda v: v is None or (_is_int(v) and -(2**63) <= v < 2**63), "a 64-bit integer or null"),
}


def _shown(value: Any) -> str:
    """A request's value as JSON, cut to 40 characters for the error message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_sampling(raw: Any) -> SamplingParams:
    """The request's "sampling" object as SamplingParams (absent fields keep their defaults); a
    RequestError 400 naming the first unknown or invalid field and what it must be."""
    if raw is None:
        return SamplingParams()
    if not isinstance(raw, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"sampling: must be an object, not {_shown(raw)}")
    unknown = sorted(set(raw) - SAMPLING_FIELDS)
    if unknown:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"sampling: unknown fields {', '.join(unknown)}; known: {', '.join(sorted(SAMPLING_FIELDS))}",
        )
    for name, (valid, what) in SAMPLING_RULES.items():
        if name in raw and not valid(raw[name]):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"sampling.{name}: must be {what}, not {_shown(raw[name])}")
    return SamplingParams(**raw)


def sibling_readiness(address: str | None, timeout_s: float = 2.0) -> tuple[bool, str]:
    """(ready, reason) of another engine replica of this pod, from its own /readyz."""
    if address is None:
        return False, "engine loading"
    host, port = address.rsplit(":", 1)
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
        try:
            conn.request("GET", "/readyz")
            resp = conn.getresponse()
            doc = json.loads(resp.read() or b"{}")
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
        return False, f"not answering at {address}: {e}"
    return resp.status == HTTPStatus.OK, doc.get("reason", f"HTTP {resp.status}")


class _Handler(JSONHandler):
    service: RolloutService  # set on the subclass made per server

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(HTTPStatus.OK, {"alive": True})
        elif self.path == "/readyz":
            ready, reason = self.service.readiness()
            doc = {"ready": ready, "reason": reason, "weights_version": self.service.weights_version,
                   "target_version": self.service.target_version}
            self._reply(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, doc)
        elif self.path == "/generate":
            self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST /generate"})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}; try POST /generate, GET /readyz"})

    def do_POST(self) -> None:
        if self.path != "/generate":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}; try POST /generate"})
            return
        self._answer(self.service.generate)  # an engine failure is a 500, the server lives on


class RolloutServer(ThreadedServer):
    """The HTTP server around a RolloutService, served from a daemon thread."""

    def __init__(self, service: RolloutService, host: str = "0.0.0.0", port: int = 0) -> None:
        super().__init__(type("Handler", (_Handler,), {"service": service}), host, port, name="rollout-http")
        self.service = service


def build_engine(cfg, device: torch.device) -> tuple[RolloutEngine, int]:
    """The configured engine on its own copy of the initial model; (engine, vocabulary size)."""
    from .models import build_policy, resolve_dtype
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.model)
    if cfg.rollout.engine == "vllm":
        from .engines.vllm_rollout import VLLMRolloutEngine

        return VLLMRolloutEngine.from_config(cfg, tok), tok.vocab_size
    model = build_policy(cfg.model, tok.vocab_size, device, resolve_dtype(cfg.model.dtype, device))
    model.eval().requires_grad_(False)
    kwargs = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  max_batch_size=cfg.rollout.max_batch_size, shares_module=False)
    from .engines.fast_path import use_fast_rollout

    if use_fast_rollout(cfg, device, model):  # rollout.engine builtin: fast on a GPU; fast / hf force one
        from .engines.fast_rollout import FastRolloutEngine

        graphs = cfg.rollout.cuda_graphs and device.type == "cuda"
        return FastRolloutEngine(model, use_cuda_graph=graphs, **kwargs), model.config.vocab_size
    from .engines.hf_rollout import HFRolloutEngine

    return HFRolloutEngine(model, **kwargs), model.config.vocab_size


def _sibling_addresses(store, topology, rank: int) -> Callable[[], list[tuple[str, str | None]]]:
    """The other engine replicas of this pod as (name, address or None), read from the job's store
    (each publishes its address once its engine is built); addresses are cached once seen."""
    base = topology.rollout_rank_base
    ranks = [r for r in range(base, base + topology.local_world_size) if r != rank]
    known: dict[int, str] = {}

    def siblings() -> list[tuple[str, str | None]]:
        for r in ranks:
            if r not in known and store.check([f"{ADDRESS_KEY}{r}"]):
                known[r] = store.get(f"{ADDRESS_KEY}{r}").decode()
        return [(f"rollout rank {r} (local rank {r - base})", known.get(r)) for r in ranks]

    return siblings


def serve_rollout(cfg, topology) -> None:
    """A rollout process from start to stop: rendezvous, engine, HTTP server, weight syncs.

    One of the pod's KUBERL_LOCAL_WORLD_SIZE engine replicas (LOCAL_RANK); its rollout rank is
    pod index x engines per pod + LOCAL_RANK."""
    import torch.distributed as dist

    from .distributed import rendezvous
    from .errors import PeerLost
    from .sync import VERSION_KEY, StaleWeights, WeightReceiver
    from .sync.digest import digest_dir, tensor_digest, write_digest

    local = int(os.environ.get("LOCAL_RANK") or 0)
    rank = topology.rollout_rank_base + local  # this engine replica's rollout rank
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    groups = rendezvous(topology, local_rank=local)
    try:
        receiver = WeightReceiver(groups)
        aggregate = local == 0 and topology.local_world_size > 1
        service = RolloutService(siblings=_sibling_addresses(groups.store, topology, rank) if aggregate else None)
        if groups.store.check([VERSION_KEY]):
            service.target_version = int(groups.store.get(VERSION_KEY))
        # Local rank 0 answers the pod's readiness probe on the pod's port, engine i on port + i (fixed
        # ports a NetworkPolicy can name); a base of 0 (local runs) gives every engine a free port.
        base = int(os.environ.get(ENV_HTTP_PORT, cfg.logging.port))
        port = base + local if base else 0
        server = RolloutServer(service, port=port).start()
        try:
            engine, vocab = build_engine(cfg, device)
            service.set_engine(engine, vocab)
            groups.store.set(f"{ADDRESS_KEY}{rank}", f"{topology.pod_ip}:{server.port}")
            held: int | None = None  # nothing received yet: version 0 is the configured model
            try:
                while (header := receiver.wait()) is not None:
                    service.target_version = header.version
                    t0 = time.perf_counter()
                    try:
                        service.load(receiver.tensors(header, held), header.version)
                        held = header.version
                        if digest_dir() is not None and hasattr(engine, "model"):
                            digests = {n: tensor_digest(t) for n, t in engine.model.named_parameters()}
                            write_digest(f"rollout-{rank}", held, digests)
                        print(f"kuberl rollout {rank}: weights version {held} loaded in "
                              f"{time.perf_counter() - t0:.3f} s", flush=True)
                    except StaleWeights as e:
                        print(f"kuberl rollout {rank}: {e}", flush=True)
                    receiver.finish(header, engine.weights_version)
            except (RuntimeError, dist.DistError) as e:  # a collective broke: the sender went away
                raise PeerLost(f"weight sync interrupted: {e}", role="trainer", rank=0) from e
        finally:
            server.close()
    finally:
        groups.close()
