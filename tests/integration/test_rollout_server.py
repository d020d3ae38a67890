"""The rollout server over real HTTP on 127.0.0.1: readiness, generation equal to in-process, clear errors."""

from __future__ import annotations

import dataclasses
import http.client
import json

import pytest
import torch

from kuberl_runtime.config import ModelConfig, ModelInit
from kuberl_runtime.engines import HFRolloutEngine, SamplingParams
from kuberl_runtime.errors import PeerLost
from kuberl_runtime.models import build_policy
from kuberl_runtime.remote_rollout import RemoteRolloutEngine
from kuberl_runtime.rollout_server import SAMPLING_RULES, RolloutServer, RolloutService
from kuberl_runtime.sync import WeightsVersionError

pytestmark = pytest.mark.integration
VOCAB = 32


def make_engine() -> HFRolloutEngine:
    cfg = ModelConfig(init=ModelInit(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                                     vocab_size=VOCAB, seed=3), tokenizer="builtin:arithmetic")
    model = build_policy(cfg, VOCAB, torch.device("cpu"), torch.float32).eval().requires_grad_(False)
    return HFRolloutEngine(model, pad_token_id=0, eos_token_id=2, shares_module=False)


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    conn.close()
    return resp.status, doc


@pytest.fixture
def served():
    servers = []

    def serve(engine, **kwargs) -> RolloutServer:
        server = RolloutServer(RolloutService(engine, vocab_size=VOCAB, **kwargs), host="127.0.0.1").start()
        servers.append(server)
        return server

    yield serve
    for s in servers:
        s.close()


PROMPTS = [torch.tensor(p) for p in ([5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16])]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)


def test_readiness_waits_for_the_trainers_weights_version(served):
    engine = make_engine()
    server = served(engine, target_version=3)
    status, doc = call(server.port, "GET", "/readyz")
    assert status == 503 and doc["ready"] is False and "version 0" in doc["reason"] and "at 3" in doc["reason"]
    new = [(n, p + 0.01) for n, p in engine.model.named_parameters()]
    server.service.load(new, version=3)
    status, doc = call(server.port, "GET", "/readyz")
    assert (status, doc["ready"], doc["weights_version"]) == (200, True, 3)
    assert call(server.port, "GET", "/healthz")[0] == 200

    loading = served(None)
    status, doc = call(loading.port, "GET", "/readyz")
    assert status == 503 and doc["reason"] == "engine loading"
    status, doc = call(loading.port, "POST", "/generate", json.dumps({"prompts": [[1]]}).encode())
    assert status == 503 and doc["error"] == "engine loading"


def test_generate_over_http_equals_the_engine_in_process(served):
    engine = make_engine()
    server = served(engine)
    local = make_engine().generate(PROMPTS, GREEDY)
    body = {"prompts": [p.tolist() for p in PROMPTS], "sampling": GREEDY.__dict__, "weights_version": 0}
    status, doc = call(server.port, "POST", "/generate", json.dumps(body).encode())
    assert status == 200 and doc["weights_version"] == 0
    assert doc["responses"] == [r.tolist() for r in local.response_ids]
    # Log-probs travel as JSON floats and come back as the same float32 bits.
    for got, want in zip(doc["logprobs"], local.response_logprobs):
        assert torch.equal(torch.tensor(got, dtype=torch.float32), want)

    # The trainer's client spreads prompts over two replicas and returns them in order.
    client = RemoteRolloutEngine([f"127.0.0.1:{server.port}", f"127.0.0.1:{served(make_engine()).port}"])
    gen = client.generate(PROMPTS, GREEDY)
    assert [r.tolist() for r in gen.response_ids] == [r.tolist() for r in local.response_ids]
    # Other batch compositions pad differently: the same tokens, log-probs equal up to float32 rounding.
    for a, b in zip(gen.response_logprobs, local.response_logprobs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [p.tolist() for p in gen.prompt_ids] == [p.tolist() for p in PROMPTS]
    client.close()


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"prompts": []}).encode(), 400, "prompts: must be a non-empty list"),
        (json.dumps({"prompts": [[1, "a"]]}).encode(), 400, "prompts[0]: must be a non-empty list of integers"),
        (json.dumps({"prompts": [[1], [99]]}).encode(), 400, "prompts[1]: token id 99 outside the vocabulary [0, 32)"),
        (json.dumps({"prompts": [[1]], "sampling": {"temp": 1}}).encode(), 400, "sampling: unknown fields temp"),
        (json.dumps({"prompts": [[1]], "sampling": {"top_p": 0}}).encode(), 400,
         "sampling.top_p: must be a number in (0, 1], not 0"),
        (json.dumps({"prompts": [[1]], "extra": 1}).encode(), 400, "unknown fields: extra"),
        (json.dumps({"prompts": [[1]], "weights_version": 4}).encode(), 409, "holds weights version 0, the request expects 4"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_json_message(served, body, status, words):
    server = served(make_engine())
    got, doc = call(server.port, "POST", "/generate", body)
    assert got == status and words in doc["error"], doc


@pytest.mark.parametrize(
    ("sampling", "error"),
    [
        ({"temperature": "hot"}, 'sampling.temperature: must be a number >= 0, not "hot"'),
        ({"temperature": -0.5}, "sampling.temperature: must be a number >= 0, not -0.5"),
        ({"temperature": True}, "sampling.temperature: must be a number >= 0, not true"),
        ({"temperature": float("nan")}, "sampling.temperature: must be a number >= 0, not NaN"),  # json.loads reads NaN
        ({"temperature": float("inf")}, "sampling.temperature: must be a number >= 0, not Infinity"),
        ({"max_new_tokens": -3}, "sampling.max_new_tokens: must be an integer >= 1, not -3"),
        ({"max_new_tokens": 0}, "sampling.max_new_tokens: must be an integer >= 1, not 0"),
        ({"max_new_tokens": 4.5}, "sampling.max_new_tokens: must be an integer >= 1, not 4.5"),
        ({"max_new_tokens": "8"}, 'sampling.max_new_tokens: must be an integer >= 1, not "8"'),
        ({"top_p": 1.5}, "sampling.top_p: must be a number in (0, 1], not 1.5"),
        ({"top_p": -0.1}, "sampling.top_p: must be a number in (0, 1], not -0.1"),
        ({"top_p": None}, "sampling.top_p: must be a number in (0, 1], not null"),
        ({"top_k": 2.5}, "sampling.top_k: must be an integer >= 0 (0: no top-k), not 2.5"),
        ({"top_k": -1}, "sampling.top_k: must be an integer >= 0 (0: no top-k), not -1"),
        ({"ignore_eos": "yes"}, 'sampling.ignore_eos: must be true or false, not "yes"'),
        ({"seed": "7"}, 'sampling.seed: must be a 64-bit integer or null, not "7"'),
        ({"seed": 2**64}, "sampling.seed: must be a 64-bit integer or null, not 18446744073709551616"),
        ({"temperature": "x" * 100}, 'sampling.temperature: must be a number >= 0, not "' + "x" * 36 + "..."),
        ([1.0], "sampling: must be an object, not [1.0]"),
        ({"top_k": -1, "temperature": "hot"}, 'sampling.temperature: must be a number >= 0, not "hot"'),  # the first
    ],
)
def test_bad_sampling_values_are_400s_naming_the_field(served, sampling, error):
    server = served(make_engine())
    body = json.dumps({"prompts": [[5, 6]], "sampling": sampling}).encode()
    status, doc = call(server.port, "POST", "/generate", body)
    assert (status, doc) == (400, {"error": error})
    assert server.service.requests == 0  # refused before the engine ran


def test_every_sampling_field_has_a_rule():
    assert set(SAMPLING_RULES) == {f.name for f in dataclasses.fields(SamplingParams)}


def test_valid_sampling_values_at_their_limits_are_accepted(served):
    server = served(make_engine())
    sampling = {"temperature": 0, "top_p": 1, "top_k": 0, "max_new_tokens": 1, "ignore_eos": True, "seed": -(2**63)}
    body = json.dumps({"prompts": [[5, 6]], "sampling": sampling}).encode()
    status, doc = call(server.port, "POST", "/generate", body)
    assert status == 200 and [len(r) for r in doc["responses"]] == [1], doc
    body = json.dumps({"prompts": [[5, 6]], "sampling": None}).encode()  # null: every default
    assert call(server.port, "POST", "/generate", body)[0] == 200


def test_the_client_sends_seeds_past_64_bits_as_the_sampling_they_stand_for(served):
    # Job.sampling's seed, (training.seed * 1_000_003 + step) * 1024 + rank, passes 2**63 once training.seed
    # is above about 9e9: the client wraps it into the 64 bits the server accepts (a 400 before), and
    # torch's generator, which takes seeds modulo 2**64, samples what it did with the unwrapped seed.
    seed = (10**10 * 1_000_003 + 1) * 1024
    assert 2**63 <= seed < 2**64
    params = SamplingParams(temperature=1.0, max_new_tokens=6, ignore_eos=True, seed=seed)
    client = RemoteRolloutEngine([f"127.0.0.1:{served(make_engine()).port}"])
    gen = client.generate(PROMPTS, params)
    client.close()
    local = make_engine().generate(PROMPTS, params)
    assert [r.tolist() for r in gen.response_ids] == [r.tolist() for r in local.response_ids]
    other = make_engine().generate(PROMPTS, dataclasses.replace(params, seed=seed + 1))
    assert [r.tolist() for r in other.response_ids] != [r.tolist() for r in local.response_ids]  # the seed counts


def test_wrong_paths_and_methods(served):
    server = served(make_engine())
    assert call(server.port, "GET", "/nope")[0] == 404
    assert call(server.port, "POST", "/nope", b"{}")[0] == 404
    assert call(server.port, "GET", "/generate")[0] == 405


def test_the_client_names_a_stale_or_vanished_rollout(served):
    server = served(make_engine())
    client = RemoteRolloutEngine([f"127.0.0.1:{server.port}"], version=5)  # the trainer is at 5
    with pytest.raises(WeightsVersionError, match="expects 5") as e:
        client.generate(PROMPTS[:1], GREEDY)
    assert (e.value.role, e.value.rank, e.value.exit_code) == ("rollout", 0, 75)
    client.close()

    gone = served(make_engine())
    port = gone.port
    gone.close()
    client = RemoteRolloutEngine([f"127.0.0.1:{server.port}", f"127.0.0.1:{port}"])
    with pytest.raises(PeerLost, match="stopped answering") as e:
        client.generate(PROMPTS, GREEDY)
    assert (e.value.role, e.value.rank) == ("rollout", 1)
    assert client.unreachable() == [1]
    client.close()


def test_connect_waits_the_rendezvous_timeout_and_lets_a_generate_take_the_collective_one():
    """Discovery gives up after the rendezvous timeout, naming the missing replica; a /generate may then
    take as long as the trainer ranks wait in a collective (a long generation is work, not a lost peer)."""
    from datetime import timedelta

    import torch.distributed as dist

    from kuberl_runtime.distributed import Groups, Topology
    from kuberl_runtime.launch import free_port
    from kuberl_runtime.remote_rollout import ADDRESS_KEY

    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False)
    topo = Topology(trainer_world_size=1, rollout_replicas=2, world_size=3)
    sync = object()  # a stand-in: connect() only hands it to the weight sender, nothing is sent here
    groups = Groups(topology=topo, rank=0, store=store, trainer=None, sync=sync, backend="gloo", timeout_s=0.3,
                    collective_timeout_s=1800.0)
    store.set(f"{ADDRESS_KEY}0", "127.0.0.1:1")
    with pytest.raises(PeerLost) as e:
        RemoteRolloutEngine.connect(groups)
    assert (e.value.role, e.value.rank) == ("rollout", 1) and "did not come up within 0.3 s" in e.value.message
    store.set(f"{ADDRESS_KEY}1", "127.0.0.1:2")
    assert RemoteRolloutEngine.connect(groups).timeout_s == 1800.0
