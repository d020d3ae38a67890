"""Reference, reward and critic servers (role_servers) and their trainer-side clients (remote_roles),
over real HTTP on 127.0.0.1, against the same models computed in this process."""

from __future__ import annotations

import http.client
import json
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from kuberl_runtime.config import RuntimeConfig
from kuberl_runtime.contract import Topology
from kuberl_runtime.distributed import Groups
from kuberl_runtime.engines import TorchTrainEngine
from kuberl_runtime.errors import ConfigError, PeerLost
from kuberl_runtime.models import build_critic, build_reference
from kuberl_runtime.remote_roles import RemoteCritic, RemoteReference, RemoteReward
from kuberl_runtime.critic_server import CriticService
from kuberl_runtime.role_servers import ReferenceService, RewardService, RoleServer
from kuberl_runtime.tokenizer import load_tokenizer

pytestmark = pytest.mark.integration
CPU = torch.device("cpu")


def make_cfg(tmp_path, **runtime) -> RuntimeConfig:
    doc = {
        "model": {"init": {"architecture": "qwen2", "hiddenSize": 32, "numLayers": 1, "numHeads": 4, "numKvHeads": 2,
                           "intermediateSize": 64}, "tokenizer": "builtin:arithmetic"},
        "data": {"synthetic": {"task": "arithmetic", "maxOperand": 9, "numExamples": 16}},
        "algorithm": {"name": "ppo", "samplesPerPrompt": 1, "klCoef": 0.1},
        "training": {"totalSteps": 4, "globalBatchSize": 4, "microBatchSize": 2, "lr": 1e-3, "criticLr": 1e-2},
        "checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 1, "resume": True},
    }
    for key, value in runtime.items():
        doc[key] = {**doc.get(key, {}), **value}
    return RuntimeConfig.model_validate(doc)


def sequences(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 20, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses = [torch.randint(3, 20, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g) for _ in range(n)]
    return prompts, responses


@pytest.fixture
def serve():
    servers = []

    def start(service) -> str:
        server = RoleServer(service, host="127.0.0.1").start()
        servers.append(server)
        return f"127.0.0.1:{server.port}"

    yield start
    for s in servers:
        s.close()


def request(address: str, method: str, path: str, body=None) -> tuple[int, dict]:
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=None if body is None else json.dumps(body))
    resp = conn.getresponse()
    doc = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, doc


def test_reference_replicas_give_the_colocated_reference_logprobs(tmp_path, serve):
    cfg = make_cfg(tmp_path)
    services = [ReferenceService(cfg, CPU) for _ in range(2)]
    addresses = [serve(s) for s in services]
    status, doc = request(addresses[0], "GET", "/readyz")
    assert status == 503 and doc["reason"] == "model loading"  # ready only once the model is loaded
    for s in services:
        s.start()
    assert request(addresses[0], "GET", "/readyz")[0] == 200

    prompts, responses = sequences()
    tok = load_tokenizer(cfg.model)
    local = TorchTrainEngine(build_reference(cfg.model, tok.vocab_size, CPU, torch.float32), cfg.training,
                             pad_token_id=tok.pad_token_id, temperature=cfg.rollout.temperature)
    want = local.forward(prompts, responses).logprobs
    got = RemoteReference(addresses).forward(prompts, responses).logprobs  # split 2 + 3 over the replicas
    assert [len(g) for g in got] == [r.numel() for r in responses]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert all(s.requests == 1 for s in services)  # both replicas served a slice


def test_bad_requests_name_the_field(tmp_path, serve):
    service = ReferenceService(make_cfg(tmp_path), CPU)
    address = serve(service)
    service.start()
    vocab = service.vocab
    cases = [
        ({"prompts": [[1, 2]]}, "responses: must be a non-empty list"),
        ({"prompts": [[1, 2]], "responses": [[1], [2]]}, "responses: 2 given for 1 prompts"),
        ({"prompts": [[1, vocab]], "responses": [[1]]}, f"prompts[0]: token id {vocab} outside the vocabulary"),
        ({"prompts": [[1]], "responses": [[1]], "sampling": {}}, "unknown fields: sampling"),
    ]
    for body, message in cases:
        status, doc = request(address, "POST", "/logprobs", body)
        assert status == 400 and message in doc["error"], doc
    assert request(address, "POST", "/values", {})[0] == 404  # a critic route on a reference server
    assert request(address, "GET", "/logprobs")[0] == 405


def test_malformed_critic_and_reward_fields_are_400_naming_the_field(tmp_path, serve):
    critic = CriticService(make_cfg(tmp_path), CPU)
    reward = RewardService(make_cfg(tmp_path, reward={"rule": "numeric"}), CPU)
    critic_at, reward_at = serve(critic), serve(reward)
    critic.start()
    reward.start()
    step = {"prompts": [[3, 4]], "responses": [[5, 6]], "old_values": [[0.1, 0.2]], "returns": [[1.0, 1.0]]}
    score = {"prompts": ["1+2="], "completions": ["3"], "rows": [{"answer": 3}]}
    cases = [
        (critic_at, "/train_step", {**step, "old_values": [[0.1, "0.2"]]}, "old_values[0][1]: must be a number, not str"),
        (critic_at, "/train_step", {**step, "returns": [[None, 1.0]]}, "returns[0][0]: must be a number, not NoneType"),
        (critic_at, "/train_step", {**step, "returns": [[1.0, [1.0]]]}, "returns[0][1]: must be a number, not list"),
        (critic_at, "/train_step", {**step, "returns": [[1.0, {"v": 1}]]}, "returns[0][1]: must be a number, not dict"),
        (critic_at, "/train_step", {**step, "old_values": [[0.1, True]]}, "old_values[0][1]: must be a number, not bool"),
        (critic_at, "/train_step", {**step, "returns": [[1.0, 10**400]]}, "returns[0]: holds an integer too large for a float"),
        (critic_at, "/train_step", {**step, "returns": [1.0, 1.0]}, "returns: must be 1 lists of numbers"),
        (critic_at, "/train_step", {**step, "responses": [[5, "6"]]}, "responses[0]: must be a list of integers"),
        (critic_at, "/values", {"prompts": [[3, 4.0]], "responses": [[5]]}, "prompts[0]: must be a list of integers"),
        (critic_at, "/values", {"prompts": [[3, [4]]], "responses": [[5]]}, "prompts[0]: must be a list of integers"),
        (critic_at, "/values", {"prompts": [3, 4], "responses": [[5]]}, "prompts[0]: must be a list of integers"),
        (critic_at, "/load", {"optimizer_steps": "2"}, "optimizer_steps: must be an integer >= 0"),
        (reward_at, "/score", {**score, "answer_key": ["answer"]}, "answer_key: must be a non-empty string"),
        (reward_at, "/score", {**score, "answer_key": 5}, "answer_key: must be a non-empty string"),
    ]
    for address, path, body, message in cases:
        status, doc = request(address, "POST", path, body)
        assert status == 400 and message in doc["error"], (path, body, status, doc)
    assert critic.optimizer_steps == 0  # nothing malformed reached the optimizer
    assert request(critic_at, "POST", "/train_step", step)[1]["optimizer_steps"] == 1
    assert request(reward_at, "POST", "/score", {**score, "answer_key": None}) == (200, {"scores": [1.0]})

    host, port = critic_at.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/values")
    conn.putheader("Content-Length", "ten")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 400 and "Content-Length: must be an integer >= 0" in json.loads(resp.read())["error"]
    conn.close()


def test_reward_server_scores_like_the_configured_rule_and_reports_a_raising_function(tmp_path, serve):
    service = RewardService(make_cfg(tmp_path, reward={"rule": "numeric"}), CPU)
    address = serve(service)
    service.start()
    rows = [{"prompt": "1+2=", "answer": 3}, {"prompt": "2+2=", "answer": 4}, {"prompt": "0+1=", "answer": 1}]
    scores = RemoteReward([address]).score([r["prompt"] for r in rows], ["3", "5", "x 1"], rows)
    assert scores == [1.0, 0.0, 1.0]

    (tmp_path / "badreward.py").write_text("def score(prompt, completion, row):\n    raise KeyError('label')\n")
    bad = RewardService(make_cfg(tmp_path, reward={"function": "badreward:score", "pythonPath": [str(tmp_path)]}), CPU)
    address = serve(bad)
    bad.start()
    with pytest.raises(ConfigError) as e:
        RemoteReward([address]).score(["p"], ["c"], [{"answer": 1}])
    assert "KeyError" in e.value.message and e.value.field == "runtime.reward"  # exit 78 on the trainer too


def test_critic_server_steps_like_the_colocated_critic_and_restores_its_state(tmp_path, serve):
    from kuberl_runtime.checkpoint import Checkpointer
    from kuberl_runtime.recipes.ppo import value_loss_fn

    cfg = make_cfg(tmp_path)
    service = CriticService(cfg, CPU)
    address = serve(service)
    service.start()
    tok = load_tokenizer(cfg.model)
    t = cfg.training
    local = TorchTrainEngine(build_critic(cfg.model, tok.vocab_size, CPU, torch.float32), t, lr=t.critic_lr,
                             pad_token_id=tok.pad_token_id, total_optimizer_steps=t.total_steps,
                             temperature=cfg.rollout.temperature)
    remote = RemoteCritic([address])
    prompts, responses = sequences(4, seed=1)
    for step in range(3):
        values = remote.forward(prompts, responses).values
        want = local.forward(prompts, responses).values
        for g, w in zip(values, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        extras = {"old_values": values, "returns": [torch.full_like(v, 1.0 + step) for v in values]}
        got = remote.train_step(prompts, responses, extras)
        ref = local.train_step(prompts, responses, extras, value_loss_fn(cfg.algorithm))
        assert got.keys() == ref.keys() and got["value_loss"] == pytest.approx(ref["value_loss"], rel=1e-5)
        if step == 1:  # the trainer's checkpoint of RL step 2 asks the critic to save, records its count
            Checkpointer(cfg.checkpoint).save(2, {"critic": remote, "model": torch.nn.Linear(1, 1)})
    assert service.path(2).is_file() and remote.optimizer_steps == 3
    after3 = remote.forward(prompts, responses).values

    # A critic pod started for a resumed job restores the state named by the trainer's checkpoint
    # before it says ready; the trainer's load_state_dict then finds it there.
    fresh = CriticService(cfg, CPU)
    fresh.start()
    assert fresh.optimizer_steps == 2
    fresh_address = serve(fresh)
    again = RemoteCritic([fresh_address])
    again.load_state_dict({"optimizer_steps": 2})
    extras = {"old_values": again.forward(prompts, responses).values,
              "returns": [torch.full_like(v, 3.0) for v in responses]}
    again.train_step(prompts, responses, extras)  # step 3 again, from the restored state
    for g, w in zip(again.forward(prompts, responses).values, after3):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)

    with pytest.raises(ConfigError) as e:
        again.load_state_dict({"optimizer_steps": 7})
    assert "optimizer-step-00000007.pt" in e.value.message and e.value.field == "runtime.checkpoint.dir"

    # A checkpoint of the same job with the critic colocated holds no critic pod state: said at start.
    Checkpointer(cfg.checkpoint).save(3, {"critic": torch.nn.Linear(1, 1)})
    with pytest.raises(ConfigError) as e:
        CriticService(cfg, CPU).start()
    assert "was written with the critic inside the trainer" in e.value.message


def test_a_role_server_that_never_comes_is_named(tmp_path):
    from kuberl_runtime.launch import free_port

    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False)
    topo = Topology(trainer_world_size=1, reference_replicas=2, world_size=3)
    groups = Groups(topology=topo, rank=0, store=store, trainer=None, sync=None, backend="gloo", timeout_s=0.3,
                    collective_timeout_s=1800.0)
    store.set("kuberl/reference_address/0", "127.0.0.1:1")
    with pytest.raises(PeerLost) as e:
        RemoteReference.connect(groups)
    assert (e.value.role, e.value.rank) == ("reference", 1)
    assert "reference servers [1] did not come up within 0.3 s" in e.value.message
    # Once every server is there, a request may take as long as a collective may wait (a long forward
    # is work), not the rendezvous timeout that bounded the discovery.
    store.set("kuberl/reference_address/1", "127.0.0.1:2")
    assert RemoteReference.connect(groups).timeout_s == 1800.0


def test_a_vanished_server_is_named(tmp_path, serve):
    service = ReferenceService(make_cfg(tmp_path), CPU)
    address = serve(service)
    service.start()
    client = RemoteReference(["127.0.0.1:1", address])  # replica 0: nobody listens there
    with pytest.raises(PeerLost) as e:
        client.forward(*sequences(4))
    assert (e.value.role, e.value.rank) == ("reference", 0) and "stopped answering" in e.value.message


def _critic_requests_from_two_ranks(env):
    """Trainer ranks of a real gloo group use RemoteCritic against the servers the test names in env:
    each attempt's outcome, (error class, message, exit code, field) or ("ok", result)."""
    from kuberl_runtime.contract import Topology
    from kuberl_runtime.distributed import rendezvous
    from kuberl_runtime.errors import exit_code_for

    groups = rendezvous(Topology.from_env(), backend="gloo")
    # The trainer group with a short collective timeout (new_group's default is 30 min): without the
    # shared outcome, rank 1 would wait out a broadcast and fail with gloo's timeout, not rank 0's error.
    trainer = dist.new_group([0, 1], timeout=timedelta(seconds=15))
    try:
        prompts, responses = sequences(3, seed=groups.trainer_rank)  # each rank its own part
        extras = {"old_values": [torch.zeros(r.numel()) for r in responses],
                  "returns": [torch.ones(r.numel()) for r in responses]}

        def attempt(address, call):
            critic = RemoteCritic([address], timeout_s=30, group=trainer)
            try:
                return "ok", call(critic), critic.optimizer_steps
            except Exception as e:  # noqa: BLE001 - the outcome is what the test compares
                return type(e).__name__, str(e), exit_code_for(e), getattr(e, "field", None)
            finally:
                critic.close()

        return [
            attempt(env["TEST_CRITIC_GONE"], lambda c: c.train_step(prompts, responses, extras)),
            attempt(env["TEST_CRITIC_LOADING"], lambda c: c.state_dict()),
            attempt(env["TEST_CRITIC_READY"], lambda c: c.load_state_dict({"optimizer_steps": 7})),
            attempt(env["TEST_CRITIC_READY"], lambda c: c.train_step(prompts, responses, extras)),
        ]
    finally:
        groups.close()


def test_a_critic_request_that_fails_on_trainer_rank_0_fails_every_trainer_rank(tmp_path, serve):
    from procs import free_port, job_env, run_ranks, values

    ready = CriticService(make_cfg(tmp_path), CPU)
    addresses = {"TEST_CRITIC_GONE": f"127.0.0.1:{free_port()}",  # nobody listens there
                 "TEST_CRITIC_LOADING": serve(CriticService(make_cfg(tmp_path), CPU)),  # 503 until started
                 "TEST_CRITIC_READY": serve(ready)}
    ready.start()
    envs = [{**env, **addresses} for env in job_env(trainers=2, rollouts=0)]
    rank0, rank1 = values(run_ranks(_critic_requests_from_two_ranks, envs, timeout=120))

    gone, loading, missing, ok = rank0
    assert rank1[:3] == rank0[:3]  # every rank raises rank 0's error: class, message, exit code, field
    assert gone[0] == "PeerLost" and gone[2] == 75 and (
        f"critic server {addresses['TEST_CRITIC_GONE']} stopped answering POST /train_step: " in gone[1]
        and "Connection refused" in gone[1] and gone[1].endswith("(peer: critic rank 0)")), gone
    assert loading[:3] == ("PeerLost", f"critic server {addresses['TEST_CRITIC_LOADING']} answered POST /save "
                           "with 503: model loading (peer: critic rank 0)", 75), loading
    assert missing[0] == "ConfigError" and missing[2] == 78 and missing[3] == "runtime.checkpoint.dir", missing
    assert "optimizer-step-00000007.pt is missing" in missing[1]
    # The group is still in step after those failures: one step over both ranks' parts, shared.
    assert ok[0] == "ok" and ok == rank1[3] and ok[2] == 1 and ready.optimizer_steps == 1


def tiny_reward_model(path) -> str:
    """A sequence-classification checkpoint with its tokenizer, built here (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForSequenceClassification

    vocab = {"[PAD]": 0, "[UNK]": 1, **{ch: i + 2 for i, ch in enumerate("0123456789+=? ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, num_labels=1, pad_token_id=0)
    Qwen2ForSequenceClassification(cfg).save_pretrained(path)
    return str(path)


def test_reward_pod_runs_a_reward_model_checkpoint(tmp_path, serve):
    from kuberl_runtime.rewards import RewardModel

    path = tiny_reward_model(tmp_path / "rm")
    service = RewardService(make_cfg(tmp_path, reward={"model": path}), CPU)
    address = serve(service)
    service.start()
    rows = [{"prompt": "1+2=", "answer": 3}, {"prompt": "4+4=", "answer": 8}, {"prompt": "0+9=", "answer": 9}]
    completions = ["3", "12", "9 9"]
    got = RemoteReward([address]).score([r["prompt"] for r in rows], completions, rows)
    local = RewardModel(path)
    want = [local(r["prompt"], c, r) for r, c in zip(rows, completions)]
    assert got == want and len(set(got)) == 3  # the model's own scores, which differ per sequence



def test_ids_the_model_embeds_beyond_the_tokenizer_are_accepted(tmp_path, serve):
    # A model whose vocabulary is padded past the tokenizer's (Qwen2.5: 151936 rows, 151665 tokens):
    # the rollout samples over all rows, so the reference and critic pods must take those ids too.
    tok = load_tokenizer(make_cfg(tmp_path).model)
    cfg = make_cfg(tmp_path, model={"init": {"architecture": "qwen2", "hiddenSize": 32, "numLayers": 1, "numHeads": 4,
                                             "numKvHeads": 2, "intermediateSize": 64, "vocabSize": tok.vocab_size + 8}})
    prompts, responses = [torch.tensor([3, 4])], [torch.tensor([5, tok.vocab_size + 3])]
    reference, critic = ReferenceService(cfg, CPU), CriticService(cfg, CPU)
    addresses = [serve(reference), serve(critic)]
    reference.start()
    critic.start()
    local = TorchTrainEngine(build_reference(cfg.model, tok.vocab_size, CPU, torch.float32), cfg.training,
                             pad_token_id=tok.pad_token_id, temperature=cfg.rollout.temperature)
    got = RemoteReference(addresses[:1]).forward(prompts, responses).logprobs
    torch.testing.assert_close(got[0], local.forward(prompts, responses).logprobs[0], rtol=1e-5, atol=1e-6)
    assert len(RemoteCritic(addresses[1:]).forward(prompts, responses).values[0]) == 2
    status, doc = request(addresses[0], "POST", "/logprobs", {"prompts": [[3]], "responses": [[tok.vocab_size + 8]]})
    assert status == 400 and f"outside the vocabulary [0, {tok.vocab_size + 8})" in doc["error"]
