"""Reference, reward and critic pods: the model of each role behind a small HTTP API.

    KUBERL_ROLE=reference kuberl-runtime     # what a pod of spec.roles.reference runs (critic, reward alike)

    reference  POST /logprobs    {"prompts": [[ids]], "responses": [[ids]]} -> {"logprobs": [[floats]]}
    reward     POST /score       {"prompts": [text], "completions": [text], "rows": [{..}], "answer_key": "answer"}
                                 -> {"scores": [floats]}
    critic     POST /values      {"prompts": [[ids]], "responses": [[ids]]} -> {"values": [[floats]]}
               POST /train_step  {"prompts", "responses", "old_values": [[floats]], "returns": [[floats]]}
                                 -> {"stats": {"value_loss": .., "grad_norm": .., "lr": ..}, "optimizer_steps": n}
               POST /save        {} -> {"optimizer_steps": n}   (its state, under checkpoint.dir/critic/)
               POST /load        {"optimizer_steps": n} -> {"optimizer_steps": n}
    every role GET /readyz       200 once the model is loaded (the critic: and its state restored)
               GET /healthz      200 while the process lives

The models are the same as the colocated ones, built from the same runtime config and run by the
same engine a single trainer rank would pick (`engines.use_fast_train`: the fast engine on a GPU,
plain torch on CPU): the reference is the frozen initial model with the engine's chunked log-probs, the reward role runs the
configured reward (`runtime.reward`: a reward-model checkpoint, a rule or a user function) next to
its GPU, the critic is `models.Critic` with its own AdamW and schedule (`training.criticLr`) and
takes PPO's clipped value step (`recipes.ppo.value_loss_fn`). Floats travel as JSON numbers, which
carry float32 exactly, so a remote role computes bit for bit what the colocated one would.

A server (`serve_role`) joins the job's rendezvous, loads its model, publishes `host:port` in the
job's store (`kuberl/<role>_address/<rank>`, which the trainer's clients in `remote_roles` wait
for), and serves until trainer rank 0 sets `kuberl/roles/stop` (it acknowledges, then exits 0).
The trainer's store vanishing first means the trainer died: PeerLost (exit 75, the gang restarts).
A server whose model cannot be loaded leaves the error in the store (`kuberl/<role>_failed/<rank>`),
so the trainer fails at once with the same cause and exit code instead of waiting for an address.

The critic's service, with its checkpoints, is in `critic_server.py`.

Errors are JSON `{"error": message}`: 400 for a malformed request (naming the field), 404/405 for a
wrong path or method, 422 for a ConfigError/DataError raised by the model or the reward (its
`field` travels along, so the trainer fails with the same exit code), 503 while loading.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import torch

from .errors import ConfigError, DataError, PeerLost
from .http_service import CONNECTION_TIMEOUT_S, JSONHandler, RequestError, ThreadedServer

ENV_HTTP_PORT = "KUBERL_HTTP_PORT"
STOP_KEY = "kuberl/roles/stop"  # set by trainer rank 0 when the run is over
STOPPED_KEY = "kuberl/roles/stopped/"  # + "<role>/<rank>": that server read the stop
POLL_S = 0.05
ROLE_ROUTES = {"reference": ("logprobs",), "reward": ("score",), "critic": ("values", "train_step", "save", "load")}


def address_key(role: str, rank: int) -> str:
    return f"kuberl/{role}_address/{rank}"


def failed_key(role: str, rank: int) -> str:
    """Where a server that could not start leaves why, so the trainer fails at once with that cause."""
    return f"kuberl/{role}_failed/{rank}"


# ------------------------------------------------------------------------------ request parsing


def parse_token_ids(body: dict, name: str, vocab: int | None = None) -> list[torch.Tensor]:
    raw = body.get(name)
    if not isinstance(raw, list) or not raw:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}: must be a non-empty list of token-id lists")
    out = []
    for i, seq in enumerate(raw):
        if not isinstance(seq, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in seq):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}[{i}]: must be a list of integers")
        bad = [t for t in seq if t < 0 or (vocab is not None and t >= vocab)]
        if bad:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}[{i}]: token id {bad[0]} outside the vocabulary [0, {vocab})")
        out.append(torch.tensor(seq, dtype=torch.long))
    return out


def parse_floats(body: dict, name: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
    raw = body.get(name)
    if not isinstance(raw, list) or len(raw) != len(like):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}: must be {len(like)} lists of numbers, one per response")
    out = []
    for i, (seq, ref) in enumerate(zip(raw, like)):
        if not isinstance(seq, list) or len(seq) != ref.numel():
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}[{i}]: must hold {ref.numel()} numbers (the response's length)")
        for j, x in enumerate(seq):
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}[{i}][{j}]: must be a number, not {type(x).__name__}")
        try:
            out.append(torch.tensor(seq, dtype=torch.float32))
        except OverflowError:  # an integer with hundreds of digits: no float holds it
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}[{i}]: holds an integer too large for a float") from None
    return out


def parse_sequences(body: Any, vocab: int | None, extra: set[str] = frozenset()) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
    unknown = set(body) - {"prompts", "responses"} - extra
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown fields: {', '.join(sorted(unknown))}")
    prompts, responses = parse_token_ids(body, "prompts", vocab), parse_token_ids(body, "responses", vocab)
    if len(prompts) != len(responses):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"responses: {len(responses)} given for {len(prompts)} prompts")
    if any(p.numel() == 0 for p in prompts):
        raise RequestError(HTTPStatus.BAD_REQUEST, "prompts: every prompt needs at least one token")
    return prompts, responses


def json_floats(seqs: list[torch.Tensor]) -> list[list[float]]:
    return [s.float().tolist() for s in seqs]


# ------------------------------------------------------------------------------------ services


class RoleService:
    """A role's model as the HTTP handlers see it: routes, readiness, one lock around the model."""

    role = "role"

    def __init__(self, cfg, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.lock = threading.Lock()
        self.loaded = False
        self.reason = "model loading"
        self.requests = 0

    def readiness(self) -> tuple[bool, str]:
        return (True, "ready") if self.loaded else (False, self.reason)

    def routes(self) -> dict[str, Callable[[Any], dict[str, Any]]]:
        return {name: getattr(self, name) for name in ROLE_ROUTES[self.role]}

    def call(self, route: str, body: Any) -> dict[str, Any]:
        with self.lock:
            if not self.loaded:
                raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, self.reason)
            self.requests += 1
            return self.routes()[route](body)


def role_engine(cfg, model, device: torch.device, *, lr: float | None = None, total_optimizer_steps: int = 1):
    """The engine around `model` chosen as `Job.train_engine`/`reference_engine` choose it for one
    unsharded rank: the fast engine on a GPU where it supports the model, else plain torch."""
    from .engines import FastTrainEngine, TorchTrainEngine, use_fast_train
    from .tokenizer import load_tokenizer

    kwargs = dict(pad_token_id=load_tokenizer(cfg.model).pad_token_id, temperature=cfg.rollout.temperature)
    if lr is not None:  # a trained model (the critic); the reference is forward-only
        kwargs.update(lr=lr, total_optimizer_steps=total_optimizer_steps)
    if use_fast_train(cfg, device, model, 1):
        return FastTrainEngine(model, cfg.training, compile_layers=device.type == "cuda", **kwargs)
    return TorchTrainEngine(model, cfg.training, **kwargs)


class ReferenceService(RoleService):
    """The frozen reference model: per-token log-probs of given responses."""

    role = "reference"

    def __init__(self, cfg, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.engine = None
        self.vocab: int | None = None

    def start(self) -> None:
        from .models import build_reference, resolve_dtype
        from .tokenizer import load_tokenizer

        vocab = load_tokenizer(self.cfg.model).vocab_size
        model = build_reference(self.cfg.model, vocab, self.device, resolve_dtype(self.cfg.model.dtype, self.device))
        self.engine = role_engine(self.cfg, model, self.device)
        # Ids the model embeds (the rollout samples over them), which may exceed the tokenizer's.
        self.vocab = model.config.vocab_size
        self.loaded = True

    def logprobs(self, body: Any) -> dict[str, Any]:
        prompts, responses = parse_sequences(body, self.vocab)
        return {"logprobs": json_floats(self.engine.forward(prompts, responses).logprobs)}


class RewardService(RoleService):
    """The configured reward (runtime.reward) on this pod: a reward model on its GPU, or a rule/function."""

    role = "reward"

    def __init__(self, cfg, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.fns: dict[str, Callable] = {}

    def start(self) -> None:
        self._fn("answer" if self.cfg.data.synthetic is not None else self.cfg.data.answer_key)
        self.loaded = True

    def _fn(self, answer_key: str) -> Callable:
        from .rewards import build_reward

        if answer_key not in self.fns:  # a reward model is loaded once: only rules read the key
            same = next(iter(self.fns.values()), None) if self.cfg.reward.kind == "model" else None
            self.fns[answer_key] = same or build_reward(self.cfg.reward, answer_key=answer_key, device=str(self.device))
        return self.fns[answer_key]

    def score(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
        unknown = set(body) - {"prompts", "completions", "rows", "answer_key"}
        if unknown:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown fields: {', '.join(sorted(unknown))}")
        prompts, completions, rows = body.get("prompts"), body.get("completions"), body.get("rows")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(HTTPStatus.BAD_REQUEST, "prompts: must be a non-empty list of strings")
        if not isinstance(completions, list) or len(completions) != len(prompts) or not all(isinstance(c, str) for c in completions):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"completions: must be {len(prompts)} strings, one per prompt")
        if not isinstance(rows, list) or len(rows) != len(prompts) or not all(isinstance(r, dict) for r in rows):
            raise RequestError(HTTPStatus.BAD_REQUEST, f"rows: must be {len(prompts)} objects, one per prompt")
        answer_key = "answer" if body.get("answer_key") is None else body["answer_key"]
        if not isinstance(answer_key, str) or not answer_key:
            raise RequestError(HTTPStatus.BAD_REQUEST, "answer_key: must be a non-empty string (the data rows' answer column)")
        fn = self._fn(answer_key)
        return {"scores": [float(fn(p, c, r)) for p, c, r in zip(prompts, completions, rows)]}


def service_for(role: str, cfg, device: torch.device) -> RoleService:
    if role == "critic":
        from .critic_server import CriticService  # it builds on this module

        return CriticService(cfg, device)
    return {"reference": ReferenceService, "reward": RewardService}[role](cfg, device)


# ---------------------------------------------------------------------------------------- HTTP


class _Handler(JSONHandler):
    service: RoleService  # set on the subclass made per server

    def _routes(self) -> str:
        return ", ".join(f"POST /{r}" for r in ROLE_ROUTES[self.service.role])

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(HTTPStatus.OK, {"alive": True})
        elif self.path == "/readyz":
            ready, reason = self.service.readiness()
            self._reply(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                        {"ready": ready, "reason": reason, "role": self.service.role})
        elif self.path.lstrip("/") in ROLE_ROUTES[self.service.role]:
            self._reply(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"use POST {self.path}"})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}; try {self._routes()}, GET /readyz"})

    def do_POST(self) -> None:
        route = self.path.lstrip("/")
        if route not in ROLE_ROUTES[self.service.role]:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}; try {self._routes()}"})
            return
        self._answer(lambda body: self.service.call(route, body))

    def error_reply(self, e: Exception) -> tuple[HTTPStatus, dict[str, Any]]:
        if isinstance(e, (ConfigError, DataError)):  # the user's reward or checkpoint: the trainer fails with it
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"error": e.message, "field": e.field, "kind": type(e).__name__}
        return super().error_reply(e)


class RoleServer(ThreadedServer):
    """The HTTP server around a RoleService, served from a daemon thread."""

    def __init__(self, service: RoleService, host: str = "0.0.0.0", port: int = 0, *,
                 timeout_s: float = CONNECTION_TIMEOUT_S) -> None:
        super().__init__(type("Handler", (_Handler,), {"service": service}), host, port, name=f"{service.role}-http",
                         timeout_s=timeout_s)
        self.service = service


# -------------------------------------------------------------------------------- the process


def serve_role(cfg, topology) -> None:
    """A critic/reference/reward process from start to stop: rendezvous, model, HTTP, wait for stop."""
    from .distributed import rendezvous

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    groups = rendezvous(topology)
    try:
        service = service_for(topology.role, cfg, device)
        port = int(os.environ.get(ENV_HTTP_PORT, cfg.logging.port))
        server = RoleServer(service, port=port).start()  # /healthz and a 503 /readyz while loading
        try:
            t0 = time.perf_counter()
            try:
                service.start()
            except Exception as e:  # a bad model path, reward function or critic state: tell the trainer
                field = getattr(e, "field", None)
                doc = {"kind": type(e).__name__, "message": getattr(e, "message", str(e)), "field": field}
                groups.store.set(failed_key(topology.role, topology.role_rank), json.dumps(doc))
                raise
            groups.store.set(address_key(topology.role, topology.role_rank), f"{topology.pod_ip}:{server.port}")
            print(f"kuberl {topology.role} {topology.role_rank}: serving on port {server.port} "
                  f"(model ready in {time.perf_counter() - t0:.2f} s)", flush=True)
            wait_for_stop(groups.store)
            groups.store.set(f"{STOPPED_KEY}{topology.role}/{topology.role_rank}", "1")
            print(f"kuberl {topology.role} {topology.role_rank}: the trainer is done after "
                  f"{service.requests} requests", flush=True)
        finally:
            server.close()
    finally:
        groups.close()


def wait_for_stop(store) -> None:
    """Until trainer rank 0 sets the stop key; its store vanishing first means the trainer died."""
    while True:
        try:
            if store.check([STOP_KEY]):
                return
        except Exception as e:  # noqa: BLE001 - torch raises several types for a lost store
            raise PeerLost(f"lost the trainer's rendezvous store while serving: {e}", role="trainer", rank=0) from e
        time.sleep(POLL_S)
