"""`kuberl validate`, `render`, `crd`, `reference` and --help, through click's CliRunner.

tests/data/invalid/ holds RLJobs that must fail; each file's first line says what the error must
say (`# expect: <field path>: <message>`). The last test runs the installed console script once, to
prove the same holds outside the test runner: exit 1, field paths, never a traceback.
"""

import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from kuberl_operator.cli import LazyGroup, main
from kuberl_operator.crd import render_crd

ROOT = Path(__file__).resolve().parents[2]
INVALID = sorted((ROOT / "tests" / "data" / "invalid").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
MINIMAL = """\
apiVersion: kuberl.io/v1alpha1
kind: RLJob
metadata: {name: ok}
spec:
  runtime: {model: {path: /m}, data: {path: /d}}
"""
PV = """\
apiVersion: v1
kind: PersistentVolume
metadata: {name: ckpt}
spec: {capacity: {storage: 1Gi}, accessModes: [ReadWriteMany], hostPath: {path: /tmp/ckpt}}
"""
PVC = """\
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: ckpt, namespace: storage}
spec: {accessModes: [ReadWriteMany], volumeName: ckpt, resources: {requests: {storage: 1Gi}}}
"""


def stream(*docs: str) -> str:
    return "---\n".join(docs)


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: <message>'"
    return first[len("# expect: "):]


def test_there_are_at_least_20_invalid_jobs():
    assert len(INVALID) >= 20


@pytest.mark.parametrize("path", INVALID, ids=[p.name for p in INVALID])
def test_validate_rejects_with_the_field_path(path):
    result = run("validate", str(path))
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # an exit, not an exception escaping the command
    assert expectation(path) in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_validate_reports_every_file_and_fails_if_any_is_invalid():
    result = run("validate", *map(str, EXAMPLES), str(INVALID[0]))
    assert result.exit_code == 1
    for example in EXAMPLES:
        assert f"{example}: " in result.stdout and ": valid" in result.stdout
    assert str(INVALID[0]) in result.stderr


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_validate_accepts_the_examples(path):
    result = run("validate", str(path))
    assert result.exit_code == 0, result.output
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    assert result.stdout == f"{path}: {name}: valid\n"


def test_validate_reads_stdin_and_every_document():
    bad = MINIMAL.replace("name: ok", "name: bad").replace("path: /d", "path: /d, shuffle: maybe")
    result = run("validate", "-", input=MINIMAL + "---\n" + bad)
    assert result.exit_code == 1
    assert result.stdout == "-: ok: valid\n"
    assert "-: bad: spec.runtime.data.shuffle: Input should be a valid boolean" in result.stderr


@pytest.mark.parametrize(
    "args, exit_code, message",
    [
        (["validate", "does-not-exist.yaml"], 1, "does-not-exist.yaml: No such file or directory"),
        (["validate"], 2, "Missing argument 'FILES...'"),
        (["render", "does-not-exist.yaml"], 1, "does-not-exist.yaml: No such file or directory"),
        (["nonsense"], 2, "No such command 'nonsense'"),
    ],
)
def test_usage_errors(args, exit_code, message):
    result = run(*args)
    assert result.exit_code == exit_code
    assert message in result.stderr and "Traceback" not in result.output


NOT_RLJOB = "-: no RLJob (kind: RLJob, apiVersion: kuberl.io/v1alpha1) among"


@pytest.mark.parametrize(
    "documents, exit_code, stdout, stderr",
    [
        ([PVC, MINIMAL], 0, "-: skipped, not RLJobs: 1 document (PersistentVolumeClaim)\n-: ok: valid\n", ""),
        ([PV, PVC, MINIMAL, MINIMAL.replace("name: ok", "name: ok2")], 0,
         "-: skipped, not RLJobs: 2 documents (PersistentVolume, PersistentVolumeClaim)\n-: ok: valid\n"
         "-: ok2: valid\n", ""),
        ([PVC], 1, "", f"{NOT_RLJOB} 1 document (PersistentVolumeClaim)"),
        ([PV, PVC], 1, "", f"{NOT_RLJOB} 2 documents (PersistentVolume, PersistentVolumeClaim)"),
        # Only other APIs' objects are skipped: a kuberl.io typo or a missing apiVersion is checked.
        ([PVC, MINIMAL.replace("kind: RLJob", "kind: RLJobs")], 1, "-: skipped, not RLJobs: 1 document "
         "(PersistentVolumeClaim)\n", "-: ok: kind: must be RLJob"),
        ([PVC, MINIMAL.replace("apiVersion: kuberl.io/v1alpha1\n", "")], 1,
         "-: skipped, not RLJobs: 1 document (PersistentVolumeClaim)\n", "-: ok: apiVersion: must be kuberl.io/v1alpha1"),
        ([MINIMAL.replace("kuberl.io/v1alpha1", "batch/v1")], 1, "", "-: ok: apiVersion: must be kuberl.io/v1alpha1"),
    ],
    ids=["pvc-then-job", "pv-pvc-two-jobs", "only-pvc", "only-pv-pvc", "kind-typo", "no-api-version", "wrong-group"],
)
def test_validate_checks_only_rljobs(documents, exit_code, stdout, stderr):
    result = run("validate", "-", input=stream(*documents))
    assert (result.exit_code, result.stdout) == (exit_code, stdout), result.output
    assert stderr in result.stderr and (stderr or result.stderr == "")


E2E_JOBS = sorted((ROOT / "e2e" / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("path", E2E_JOBS, ids=[p.name for p in E2E_JOBS])
def test_the_e2e_job_files_validate_with_their_volume(path):
    """Each file users `kubectl apply` in docs/walkthrough.md: the checkpoint volume, then the RLJob."""
    result = run("validate", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"{path}: skipped, not RLJobs: 2 documents (PersistentVolume, PersistentVolumeClaim)\n"
                             f"{path}: {path.stem}: valid\n")


def test_an_empty_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    result = run("validate", str(empty))
    assert result.exit_code == 1 and "no documents" in result.stderr


# ------------------------------------------------------------------------------------------ render


def rendered(*args: str) -> list[dict]:
    result = run("render", *args)
    assert result.exit_code == 0, result.output
    return list(yaml.safe_load_all(result.stdout))


def test_render_prints_every_child_in_order():
    docs = rendered(str(ROOT / "examples" / "ppo-disaggregated.yaml"))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("ConfigMap", "ppo-llama-disagg-config"),
        ("Service", "ppo-llama-disagg"),
        ("Pod", "ppo-llama-disagg-trainer-0"),
        ("Pod", "ppo-llama-disagg-trainer-1"),
        ("Pod", "ppo-llama-disagg-rollout-0"),
        ("Pod", "ppo-llama-disagg-rollout-1"),
    ]
    assert {d["metadata"]["namespace"] for d in docs} == {"default"}


def test_render_is_byte_for_byte_repeatable():
    path = str(ROOT / "examples" / "grpo-8gpu.yaml")
    assert run("render", path).stdout == run("render", path).stdout


def test_render_namespace_and_native_gang():
    path = str(ROOT / "examples" / "grpo-8gpu.yaml")
    docs = rendered(path, "-n", "team-a", "--native-gang")
    assert {d["metadata"]["namespace"] for d in docs} == {"team-a"}
    assert "Workload" in {d["kind"] for d in docs}
    env = {e["name"]: e.get("value") for e in next(d for d in docs if d["kind"] == "Pod")["spec"]["containers"][0]["env"]}
    assert env["KUBERL_MASTER_ADDR"] == "grpo-qwen-8gpu-trainer-0.grpo-qwen-8gpu.team-a.svc"
    assert "Workload" not in {d["kind"] for d in rendered(path)}


def test_render_passes_other_documents_through_in_place():
    result = run("render", "-", "-n", "team-a", input=stream(PVC, MINIMAL, PV))
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "ConfigMap", "Service", "Pod", "PersistentVolume"]
    assert docs[0] == yaml.safe_load(PVC) and docs[-1] == yaml.safe_load(PV)  # unchanged, namespace included
    assert {d["metadata"]["namespace"] for d in docs[1:-1]} == {"team-a"}


@pytest.mark.parametrize(
    "documents, message",
    [
        ([PV, PVC], f"{NOT_RLJOB} 2 documents (PersistentVolume, PersistentVolumeClaim)"),
        (["# nothing here\n"], "-: no RLJob (kind: RLJob, apiVersion: kuberl.io/v1alpha1)\n"),
        ([PVC, MINIMAL.replace("kind: RLJob", "kind: RLJobs")], "-: kind: must be RLJob"),
    ],
    ids=["only-pv-pvc", "empty", "kind-typo"],
)
def test_render_needs_an_rljob(documents, message):
    result = run("render", "-", input=stream(*documents))
    assert result.exit_code == 1 and result.stdout == ""
    assert message in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("path", INVALID[:5], ids=[p.name for p in INVALID[:5]])
def test_render_refuses_invalid_jobs_naming_the_field(path):
    result = run("render", str(path))
    assert result.exit_code == 1 and result.stdout == ""
    assert expectation(path) in result.stderr and "Traceback" not in result.output


# -------------------------------------------------------------------------------- crd, reference, help


def test_crd_prints_the_generated_crd():
    result = run("crd")
    assert result.exit_code == 0 and result.stdout == render_crd()


def test_every_command_has_help():
    top = run("--help")
    assert top.exit_code == 0
    commands = main.list_commands(click.Context(main))
    assert {"validate", "render", "crd", "reference"} <= set(commands)
    for name in commands:
        assert name in top.stdout
        result = run(name, "--help")
        assert result.exit_code == 0, f"kuberl {name} --help: {result.output}"
        assert "Usage: " in result.stdout
    assert run("validate", "-h").exit_code == 0


def test_a_lazy_command_without_its_extra_says_what_to_install():
    class Group(LazyGroup):
        lazy = {"ghost": ("kuberl_operator.no_such_module", "ghost", "dev")}

    @click.group(cls=Group)
    def cli() -> None:
        pass

    result = CliRunner().invoke(cli, ["ghost"])
    assert result.exit_code == 1
    assert result.stderr == ("Error: `kuberl ghost` needs more packages (kuberl_operator.no_such_module is "
                             "missing): pip install 'kuberl[dev]'\n")


def test_the_console_script_never_shows_a_traceback():
    kuberl = Path(sys.executable).parent / "kuberl"
    proc = subprocess.run([str(kuberl), "validate", *map(str, INVALID)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    for path in INVALID:
        assert expectation(path) in proc.stderr, path.name


def test_the_operator_without_kopf_says_what_to_install():
    """`kuberl operator` imports kopf when it runs (its --help needs none): without the operator
    extra it names the package to install instead of a traceback. kopf is hidden from the import
    system of a subprocess, as on an install of kuberl[runtime]."""
    code = (
        "import sys\n"
        "class NoKopf:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'kopf':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoKopf())\n"
        "from kuberl_operator.cli import main\n"
        "main(['operator'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (proc.returncode, proc.stderr) == (
        1, "Error: `kuberl operator` needs more packages (kopf is missing): pip install 'kuberl[operator]'\n")


def test_the_offline_commands_need_only_the_base_install():
    """validate/render/crd/reference run with pydantic, pyyaml and click: no torch, no kubernetes client."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from kuberl_operator.cli import main\n"
        "for args in (['validate', 'examples/demo-cpu.yaml'], ['render', 'examples/grpo-8gpu.yaml'],\n"
        "             ['crd'], ['reference']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0, args\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'kubernetes', 'kopf') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""
