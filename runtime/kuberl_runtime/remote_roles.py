"""The trainer's side of reference, reward and critic pods: clients the recipes use like the local engines.

    roles = connect_roles(groups)                         # every trainer rank: {"reference": RemoteReference, ...}
    ref = roles["reference"].forward(prompts, responses)  # ForwardOut(logprobs=...), like TorchTrainEngine
    scores = roles["reward"].score(prompts, completions, rows, answer_key="answer")   # [float]
    values = roles["critic"].forward(prompts, responses).values
    stats = roles["critic"].train_step(prompts, responses, {"old_values": .., "returns": ..}, loss_fn)
    stop_roles(groups)                                    # trainer rank 0, at the end: the servers exit 0

Reference and reward requests of one trainer rank are cut into one contiguous slice per replica,
posted concurrently, and the answers concatenated in order. The critic is one pod (its optimizer
state lives there): every trainer rank asks it for the values of its own sequences, and for an
update the ranks gather their mini-batch parts on trainer rank 0, which posts one step over the
whole mini-batch and shares the stats (the loss function is the critic's own, PPO's clipped value
loss, `recipes.ppo.value_loss_fn`: a `loss_fn` given here is not sent). `RemoteCritic` is also a
stateful checkpoint entry: saving the trainer's checkpoint saves the critic's state on its pod and
records the critic's optimizer step count; loading restores that state there.

A replica that stops answering, or never publishes its address within the rendezvous timeout,
fails the trainer with PeerLost naming the role and replica (exit 75: the operator restarts the
gang); a ConfigError/DataError the server raised (a reward function that raises, a missing critic
state) comes back as the same error and exit code. The critic's requests that trainer rank 0 makes
for all ranks (`train_step`, `state_dict`, `load_state_dict`) share their outcome: when the request
fails, every trainer rank raises rank 0's error (same class, message and field) at once, instead
of waiting in a collective for an answer that will not come.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .distributed import Groups
from .engines.torch_train import ForwardOut
from .errors import ConfigError, DataError, PeerLost, RuntimeFailure
from .http_service import post_json
from .role_servers import POLL_S, STOP_KEY, STOPPED_KEY, address_key, failed_key

STOP_ACK_S = 30.0  # how long trainer rank 0 waits for the servers to read the stop
T = TypeVar("T")


class RoleClient:
    """HTTP to every replica of one role: one keep-alive connection per replica and thread."""

    role = "role"

    def __init__(self, addresses: list[str], *, timeout_s: float = 600.0) -> None:
        self.addresses = addresses
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=len(addresses), thread_name_prefix=f"{self.role}-client")
        self._conns: dict[int, http.client.HTTPConnection] = {}

    @classmethod
    def connect(cls, groups: Groups, *, timeout_s: float | None = None, **kwargs):
        """Wait until every replica of the role published its address (its model is loaded), at most
        the rendezvous timeout; a request may then take up to the collective timeout, as long as the
        trainer ranks waiting for its answer tolerate (`timeout_s` sets both)."""
        request_s = groups.collective_timeout_s if timeout_s is None else timeout_s
        timeout_s = groups.timeout_s if timeout_s is None else timeout_s
        keys = [address_key(cls.role, i) for i in range(groups.topology.replicas_of(cls.role))]
        deadline = time.monotonic() + timeout_s
        while not all(groups.store.check([k]) for k in keys):
            _raise_start_failure(groups, cls.role, len(keys))
            if time.monotonic() > deadline:
                missing = [i for i, k in enumerate(keys) if not groups.store.check([k])]
                raise PeerLost(f"{cls.role} servers {missing} did not come up within {timeout_s:g} s "
                               "(model still loading?)", role=cls.role, rank=missing[0])
            time.sleep(POLL_S)
        return cls([groups.store.get(k).decode() for k in keys], timeout_s=request_s, **kwargs)

    def post(self, i: int, route: str, body: dict) -> dict:
        where = f"{self.role} server {self.addresses[i]}"
        try:
            conn = self._conns.get(i)
            if conn is None:
                host, port = self.addresses[i].rsplit(":", 1)
                conn = self._conns[i] = http.client.HTTPConnection(host, int(port), timeout=self.timeout_s)
            status, doc = post_json(conn, f"/{route}", body)
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
            if (broken := self._conns.pop(i, None)) is not None:
                broken.close()
            raise PeerLost(f"{where} stopped answering POST /{route}: {e}", role=self.role, rank=i) from e
        if status == 200:
            return doc
        doc = doc if isinstance(doc, dict) else {"error": doc}
        if status == 422:
            cls = DataError if doc.get("kind") == "DataError" else ConfigError
            raise cls(f"{where}: {doc.get('error')}", field=doc.get("field"))
        message = f"{where} answered POST /{route} with {status}: {doc.get('error', doc)}"
        if status in (502, 503, 504):
            raise PeerLost(message, role=self.role, rank=i)
        raise RuntimeFailure(message)

    def spread(self, route: str, n: int, body_of) -> list[dict]:
        """Post `body_of(lo, hi)` for one contiguous slice of range(n) per replica; answers in order."""
        r = len(self.addresses)
        bounds = [(i * n // r, (i + 1) * n // r) for i in range(r)]
        jobs = [self._pool.submit(self.post, i, route, body_of(lo, hi)) for i, (lo, hi) in enumerate(bounds) if hi > lo]
        return [job.result() for job in jobs]

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._pool.shutdown(wait=False)


def _raise_start_failure(groups: Groups, role: str, replicas: int) -> None:
    """Re-raise on the trainer what stopped a replica's model from loading (role_servers.serve_role)."""
    for i in range(replicas):
        if groups.store.check([failed_key(role, i)]):
            doc = json.loads(groups.store.get(failed_key(role, i)))
            message = f"{role} rank {i} could not start: {doc['message']}"
            error = {"ConfigError": ConfigError, "DataError": DataError}.get(doc["kind"])
            if error is not None:
                raise error(message, field=doc.get("field"))
            raise PeerLost(message, role=role, rank=i)


def _ids(seqs: list[torch.Tensor]) -> list[list[int]]:
    return [s.tolist() for s in seqs]


class RemoteReference(RoleClient):
    """The frozen reference on its pods, with TorchTrainEngine's forward() signature."""

    role = "reference"

    def forward(self, prompts: list[torch.Tensor], responses: list[torch.Tensor], *, entropy: bool = False) -> ForwardOut:
        if entropy:
            raise ValueError("the reference server computes log-probs only")
        docs = self.spread("logprobs", len(prompts),
                           lambda lo, hi: {"prompts": _ids(prompts[lo:hi]), "responses": _ids(responses[lo:hi])})
        return ForwardOut(logprobs=[torch.tensor(x, dtype=torch.float32) for d in docs for x in d["logprobs"]])

    def forward_logprobs(self, prompts: list[torch.Tensor], responses: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.forward(prompts, responses).logprobs


class RemoteReward(RoleClient):
    """The configured reward on its pods: one score per (prompt, completion, row)."""

    role = "reward"

    def score(self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]], *,
              answer_key: str = "answer") -> list[float]:
        docs = self.spread("score", len(prompts), lambda lo, hi: {
            "prompts": prompts[lo:hi], "completions": completions[lo:hi], "rows": rows[lo:hi], "answer_key": answer_key,
        })  # fmt: skip
        return [float(s) for d in docs for s in d["scores"]]


class RemoteCritic(RoleClient):
    """The critic pod: values, the value step over the trainer ranks' whole mini-batch, its state."""

    role = "critic"

    def __init__(self, addresses: list[str], *, timeout_s: float = 600.0, group: dist.ProcessGroup | None = None) -> None:
        if len(addresses) != 1:
            raise ConfigError(f"the critic runs in one pod, not {len(addresses)}", field="spec.roles.critic.replicas")
        super().__init__(addresses, timeout_s=timeout_s)
        self.group = group  # the trainer ranks
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1
        self.optimizer_steps = 0

    def forward(self, prompts: list[torch.Tensor], responses: list[torch.Tensor], **_: Any) -> ForwardOut:
        doc = self.post(0, "values", {"prompts": _ids(prompts), "responses": _ids(responses)})
        return ForwardOut(values=[torch.tensor(x, dtype=torch.float32) for x in doc["values"]])

    def train_step(self, prompts: list[torch.Tensor], responses: list[torch.Tensor],
                   extras: dict[str, list[torch.Tensor]], loss_fn=None, **_: Any) -> dict[str, float]:
        """One critic optimizer step over every trainer rank's part of the mini-batch (collective)."""
        part = {"prompts": _ids(prompts), "responses": _ids(responses),
                "old_values": [v.float().tolist() for v in extras["old_values"]],
                "returns": [v.float().tolist() for v in extras["returns"]]}
        parts = [part]
        if self.world > 1:
            parts = [None] * self.world if self.rank == 0 else None
            dist.gather_object(part, parts, dst=dist.get_global_rank(self.group, 0), group=self.group)
        answer = self.on_rank0(lambda: self.post(0, "train_step", {k: [x for p in parts for x in p[k]] for k in part}))
        self.optimizer_steps = answer["optimizer_steps"]
        return answer["stats"]

    # A stateful checkpoint entry (checkpoint.Checkpointer stores state_dict() in extra.pt).
    def state_dict(self) -> dict[str, int]:
        """Save the critic's state on its pod; the trainer's checkpoint records which one (collective)."""
        self.optimizer_steps = self.on_rank0(lambda: self.post(0, "save", {})["optimizer_steps"])
        return {"optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the critic pod hold the state this checkpoint recorded (collective over the trainer ranks:
        nobody asks for values before the state is there)."""
        steps = int(state.get("optimizer_steps", 0))
        self.on_rank0(lambda: self.post(0, "load", {"optimizer_steps": steps}))
        self.optimizer_steps = steps

    def on_rank0(self, call: Callable[[], T]) -> T:
        """`call()` on trainer rank 0, its result broadcast to every trainer rank (collective).

        A failure travels in the broadcast instead of the result: rank 0 raises its own exception,
        the other ranks the same class with the same message and field, so every rank stops at once
        with the cause (a lost critic: PeerLost, exit 75) rather than at the collective timeout.
        """
        if self.world == 1:
            return call()
        outcome: list[Any] = [None]
        failure: Exception | None = None
        if self.rank == 0:
            try:
                outcome = [("ok", call())]
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
                failure, outcome = e, [("error", _failure_doc(e, self.role))]
        dist.broadcast_object_list(outcome, src=dist.get_global_rank(self.group, 0), group=self.group)
        if failure is not None:
            raise failure
        kind, value = outcome[0]
        if kind == "error":
            raise _failure_from_doc(value)
        return value


def _failure_doc(e: Exception, role: str) -> dict[str, Any]:
    """What the other trainer ranks need to raise the same failure as trainer rank 0."""
    if not isinstance(e, RuntimeFailure):
        return {"kind": "RuntimeFailure", "message": f"trainer rank 0's {role} request failed: {type(e).__name__}: {e}"}
    kind = next(c for c in (PeerLost, ConfigError, DataError, RuntimeFailure) if isinstance(e, c)).__name__
    return {"kind": kind, "message": e.message, "field": e.field,
            "role": getattr(e, "role", None), "rank": getattr(e, "rank", None)}


def _failure_from_doc(doc: dict[str, Any]) -> RuntimeFailure:
    if doc["kind"] == "PeerLost":
        error = PeerLost(doc["message"])  # the message already names the peer
        error.role, error.rank = doc["role"], doc["rank"]
        return error
    cls = {"ConfigError": ConfigError, "DataError": DataError}.get(doc["kind"], RuntimeFailure)
    return cls(doc["message"], field=doc.get("field"))


CLIENTS = {"critic": RemoteCritic, "reference": RemoteReference, "reward": RemoteReward}


def connect_roles(groups: Groups) -> dict[str, RoleClient]:
    """A client for every role of this job that runs in its own pods (every trainer rank)."""
    out: dict[str, RoleClient] = {}
    for role, client in CLIENTS.items():
        if groups.topology.replicas_of(role):
            kwargs = {"group": groups.trainer} if role == "critic" else {}
            out[role] = client.connect(groups, **kwargs)
    return out


def stop_roles(groups: Groups, clients: dict[str, RoleClient]) -> None:
    """The run is over: trainer rank 0 tells the servers, and waits until they read it."""
    for c in clients.values():
        c.close()
    if groups.rank != 0 or not clients:
        return
    groups.store.set(STOP_KEY, "1")
    keys = [f"{STOPPED_KEY}{role}/{i}" for role in clients for i in range(groups.topology.replicas_of(role))]
    deadline = time.monotonic() + STOP_ACK_S
    while time.monotonic() < deadline and not all(groups.store.check([k]) for k in keys):
        time.sleep(POLL_S)
