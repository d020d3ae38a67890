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
    groups = Groups(topology=topo, rank=0, store=store, trainer=None, sync=None, backend="gloo", timeout_s=0.3)
    store.set("kuberl/reference_address/0", "127.0.0.1:1")
    with pytest.raises(PeerLost) as e:
        RemoteReference.connect(groups)
    assert (e.value.role, e.value.rank) == ("reference", 1)
    assert "reference servers [1] did not come up within 0.3 s" in e.value.message


def test_a_vanished_server_is_named(tmp_path, serve):
    service = ReferenceService(make_cfg(tmp_path), CPU)
    address = serve(service)
    service.start()
    client = RemoteReference(["127.0.0.1:1", address])  # replica 0: nobody listens there
    with pytest.raises(PeerLost) as e:
        client.forward(*sequences(4))
    assert (e.value.role, e.value.rank) == ("reference", 0) and "stopped answering" in e.value.message


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
