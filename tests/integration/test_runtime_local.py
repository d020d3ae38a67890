"""`kuberl local` as a user runs it (a subprocess): the demo completes; mistakes end with the
exit code the operator would see and a message naming the field to change. `kuberl-runtime`, the
pod entry point, runs a rendered config from $KUBERL_CONFIG the same way."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo-cpu.yaml"
KUBERL = [sys.executable, "-m", "kuberl_operator.cli"]


def kuberl_local(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*KUBERL, "local", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def job_with(tmp_path: Path, **runtime_sections) -> Path:
    doc = yaml.safe_load(DEMO.read_text())
    for name, values in runtime_sections.items():
        doc["spec"]["runtime"][name] = values
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_demo_runs_to_the_end(tmp_path):
    r = kuberl_local(str(DEMO), "--steps", "4", "--checkpoint-dir", str(tmp_path / "ckpt"),
                     "--metrics-file", str(tmp_path / "m.jsonl"), "--tensorboard", str(tmp_path / "tb"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert "step 4/4" in r.stdout + r.stderr
    assert (tmp_path / "ckpt" / "step-000004" / "COMPLETE").exists()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_wrong_prompt_key_exits_78_naming_the_field(tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n')
    job = job_with(tmp_path, data={"path": str(tmp_path / "prompts.jsonl")})
    r = kuberl_local(str(job), "--steps", "1", "--checkpoint-dir", str(tmp_path / "ckpt"), cwd=tmp_path)
    assert r.returncode == 78, r.stdout + r.stderr
    assert "runtime.data.promptKey" in r.stderr and "'prompt'" in r.stderr


def test_reward_function_that_raises_exits_78_naming_the_field(tmp_path):
    (tmp_path / "badreward.py").write_text("def score(prompt, completion, row):\n    raise RuntimeError('boom')\n")
    job = job_with(tmp_path, reward={"function": "badreward:score", "pythonPath": [str(tmp_path)]})
    r = kuberl_local(str(job), "--steps", "1", "--checkpoint-dir", str(tmp_path / "ckpt"), cwd=tmp_path)
    assert r.returncode == 78, r.stdout + r.stderr
    assert "boom" in r.stderr and "runtime.reward" in r.stderr


def test_invalid_job_is_rejected_before_anything_runs(tmp_path):
    job = job_with(tmp_path, training={"totalSteps": 0})
    r = kuberl_local(str(job), cwd=tmp_path)
    assert r.returncode == 1 and "totalSteps" in r.stderr


def kuberl_runtime(config: Path | None, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    full.pop("KUBERL_CONFIG", None)
    if config is not None:
        full["KUBERL_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "kuberl_runtime.main"], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=300)


def test_kuberl_runtime_runs_the_rendered_config(tmp_path):
    runtime = yaml.safe_load(DEMO.read_text())["spec"]["runtime"]
    runtime["training"]["totalSteps"] = 2
    runtime["checkpoint"] = {"dir": str(tmp_path / "ckpt"), "interval": 1}
    runtime["logging"] = {"port": _free_port()}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(runtime))
    r = kuberl_runtime(tmp_path / "config.yaml", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step 2/2" in r.stdout
    assert (tmp_path / "ckpt" / "step-000002" / "COMPLETE").exists()


def test_kuberl_runtime_config_errors_exit_78(tmp_path):
    assert kuberl_runtime(None, tmp_path).returncode == 78
    (tmp_path / "bad.yaml").write_text("model: {path: /nonexistent}\ndata: {synthetic: {}}\ntraining: {lr: -1}\n")
    r = kuberl_runtime(tmp_path / "bad.yaml", tmp_path)
    assert r.returncode == 78 and "runtime.training.lr" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
