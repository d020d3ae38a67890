"""The trainer's rollout engine in disaggregated placement: HTTP to the rollout pods, NCCL/gloo for weights.

    rollout = RemoteRolloutEngine.connect(cfg, groups)          # every trainer rank
    gen = rollout.generate(prompts, params)                     # spread over the rollout replicas
    rollout.update_weights(policy.named_weights(), version)     # bucketed broadcast (sync/), all ranks
    rollout.close()                                             # trainer rank 0 tells the rollouts to stop

It implements the same `RolloutEngine` protocol as the colocated engines, so the recipes do not
know where generation runs. `generate` cuts this rank's prompts into one contiguous slice per
replica, posts the slices concurrently and concatenates the answers in order; each request names
the weights version the trainer holds, so a rollout that missed a sync answers 409 and the job
fails (exit 75, naming the rollout rank) instead of training on samples from stale weights. A
replica that stops answering is named the same way.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from .distributed import Groups
from .engines.base import Generation, SamplingParams
from .errors import PeerLost, RuntimeFailure
from .http_service import post_json
from .rollout_server import ADDRESS_KEY
from .sync import DEFAULT_BUCKET_BYTES, WeightSender, WeightsVersionError
from .sync.digest import digest_dir, tee_digests, write_digest


def int64_seed(seed: int) -> int:
    """`seed` wrapped into a signed 64-bit integer, what the rollout server accepts.

    Job.sampling's seeds pass 2**63 once training.seed is above about 9e9. torch's generators take a
    seed modulo 2**64 (a negative one as its two's complement), so the wrapped seed samples exactly
    what the engine did with the unwrapped one, where that was below 2**64.
    """
    return (seed + 2**63) % 2**64 - 2**63


class RemoteRolloutEngine:
    def __init__(self, addresses: list[str], sender: WeightSender | None = None, *, timeout_s: float = 600.0,
                 version: int = 0) -> None:
        if not addresses:
            raise ValueError("no rollout replicas to talk to")
        self.addresses = addresses
        self.sender = sender
        self.timeout_s = timeout_s
        self.weights_version = version
        self._pool = ThreadPoolExecutor(max_workers=len(addresses), thread_name_prefix="rollout-client")
        self._conns: dict[int, http.client.HTTPConnection] = {}

    @classmethod
    def connect(cls, groups: Groups, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                timeout_s: float | None = None) -> RemoteRolloutEngine:
        """Wait until every rollout replica published its address (its engine is built), at most the
        rendezvous timeout, then connect. A /generate may take up to the collective timeout: a long
        generation is work, not a lost peer, and the trainer ranks wait that long anyway
        (`timeout_s` sets both)."""
        request_s = groups.collective_timeout_s if timeout_s is None else timeout_s
        timeout_s = groups.timeout_s if timeout_s is None else timeout_s
        replicas = groups.topology.rollout_replicas
        deadline = time.monotonic() + timeout_s
        keys = [f"{ADDRESS_KEY}{i}" for i in range(replicas)]
        while not all(groups.store.check([k]) for k in keys):
            if time.monotonic() > deadline:
                missing = [i for i, k in enumerate(keys) if not groups.store.check([k])]
                raise PeerLost(
                    f"rollout servers {missing} did not come up within {timeout_s:g} s (engine still loading?)",
                    role="rollout", rank=missing[0],
                )  # fmt: skip
            time.sleep(0.05)
        addresses = [groups.store.get(k).decode() for k in keys]
        return cls(addresses, WeightSender(groups, bucket_bytes), timeout_s=request_s)

    # ---------------------------------------------------------------------------------- generate

    def generate(self, prompts: list[torch.Tensor], params: SamplingParams) -> Generation:
        t0 = time.perf_counter()
        n, r = len(prompts), len(self.addresses)
        bounds = [(i * n // r, (i + 1) * n // r) for i in range(r)]
        jobs = []
        for i, (lo, hi) in enumerate(bounds):
            if hi > lo:
                # Each replica gets its own seed stream, still a pure function of the caller's seed.
                seed = None if params.seed is None else int64_seed(params.seed + 7919 * i)  # replica 0: the caller's
                body = {
                    "prompts": [p.tolist() for p in prompts[lo:hi]],
                    "sampling": {**params.__dict__, "seed": seed},
                    "weights_version": self.weights_version,
                }
                jobs.append(self._pool.submit(self._post, i, body))
        responses, logprobs = [], []
        tokens_per_s = 0.0
        for job in jobs:
            doc = job.result()
            responses += [torch.tensor(x, dtype=torch.long) for x in doc["responses"]]
            logprobs += [torch.tensor(x, dtype=torch.float32) for x in doc["logprobs"]]
            tokens_per_s += doc.get("metrics", {}).get("rollout/tokens_per_s", 0.0)
        elapsed = time.perf_counter() - t0
        return Generation(
            prompt_ids=list(prompts), response_ids=responses, response_logprobs=logprobs,
            metrics={"time/generate_s": elapsed, "rollout/replica_tokens_per_s": tokens_per_s},
        )  # fmt: skip

    def _post(self, i: int, body: dict) -> dict:
        try:
            conn = self._conns.get(i)
            if conn is None:
                host, port = self.addresses[i].rsplit(":", 1)
                conn = self._conns[i] = http.client.HTTPConnection(host, int(port), timeout=self.timeout_s)
            status, doc = post_json(conn, "/generate", body)  # reopens a connection the server closed while idle
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
            if (broken := self._conns.pop(i, None)) is not None:
                broken.close()
            raise PeerLost(f"rollout server {self.addresses[i]} stopped answering: {e}", role="rollout", rank=i) from e
        if status == 200:
            return doc
        message = f"rollout server {self.addresses[i]} answered {status}: {doc.get('error', doc)}"
        if status == 409:
            raise WeightsVersionError(message, role="rollout", rank=i)
        if status in (502, 503, 504):
            raise PeerLost(message, role="rollout", rank=i)
        raise RuntimeFailure(message)

    # ----------------------------------------------------------------------------------- weights

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Bucketed broadcast to every rollout (collective over all trainer ranks); then `version`."""
        if self.sender is None:
            raise RuntimeError("this client has no sync group (built without WeightSender)")
        digests: dict[str, str] | None = {} if digest_dir() is not None and self.sender.is_src else None
        if digests is not None:
            named_tensors = tee_digests(named_tensors, digests)
        try:
            self.sender.send(named_tensors, version)
        except WeightsVersionError:
            raise
        except PeerLost as e:
            dead = self.unreachable()
            if dead:
                i = dead[0]
                raise PeerLost(f"weight sync of version {version} failed: rollout server {self.addresses[i]} "
                               f"is gone ({e.message})", role="rollout", rank=i) from e
            raise
        if digests is not None:
            write_digest("trainer", version, digests)
        self.weights_version = version

    def unreachable(self, timeout_s: float = 2.0) -> list[int]:
        """Replicas whose /healthz does not answer: who to blame when a collective fails."""
        dead = []
        for i, addr in enumerate(self.addresses):
            host, port = addr.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
            try:
                conn.request("GET", "/healthz")
                ok = conn.getresponse().status == 200
            except (OSError, http.client.HTTPException):
                ok = False
            finally:
                conn.close()
            if not ok:
                dead.append(i)
        return dead

    def sleep(self) -> None:
        """The rollout pods keep their own memory; nothing to release here."""

    def wake(self) -> None:
        """Nothing to re-acquire."""

    def close(self) -> None:
        """Tell the rollout processes the run is over (trainer rank 0), drop the connections."""
        if self.sender is not None:
            self.sender.stop()
        for conn in self._conns.values():
            conn.close()
        self._pool.shutdown(wait=False)
