"""The Helm chart, rendered offline with the real `helm` binary: lint, strict values schema,
deterministic output, the CRD identical to the generated one, and the objects each value makes.

Server-side validation, install/upgrade/uninstall and the RBAC under a running operator are in
tests/integration/test_helm_install.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from kuberl_operator.api import DEFAULT_IMAGE, parse_job
from kuberl_operator.builders import DEFAULT_IMAGE_ENV, container_image
from kuberl_operator.devcluster.build import locate_binaries

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kuberl"
CRD_FILE = ROOT / "crds" / "kuberl.io_rljobs.yaml"
CHART_CRD_FILE = CHART / "files" / "kuberl.io_rljobs.yaml"
KUBE_VERSION = "1.36.3"
HELM = locate_binaries().bin_dir / "helm"
CHART_LABELS = {"helm.sh/chart", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by"}

needs_helm = pytest.mark.skipif(not HELM.exists(), reason=f"helm is not built yet ({HELM}); "
                                "run `kuberl dev-cluster build` (make test does)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=check, timeout=60)


def template_text(*sets: str, release: str = "kuberl", namespace: str = "kuberl-system") -> str:
    args = ["template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    return helm(*args).stdout


def render(*sets: str, **kw) -> list[dict]:
    return [d for d in yaml.safe_load_all(template_text(*sets, **kw)) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict]) -> list[tuple[str, str, str | None]]:
    return sorted((d["kind"], d["metadata"]["name"], d["metadata"].get("namespace")) for d in docs)


def container(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


# ----------------------------------------------------------------------------- the CRD, one source
def test_chart_crd_file_is_a_copy_of_the_generated_crd():
    assert CHART_CRD_FILE.read_bytes() == CRD_FILE.read_bytes(), (
        "helm/kuberl/files/kuberl.io_rljobs.yaml differs from crds/kuberl.io_rljobs.yaml; "
        "run: cp crds/kuberl.io_rljobs.yaml helm/kuberl/files/")


@needs_helm
@pytest.mark.parametrize("keep", [True, False])
def test_rendered_crd_is_the_generated_crd_plus_chart_metadata(keep):
    text = template_text(f"crds.keep={str(keep).lower()}")
    crd = one([d for d in yaml.safe_load_all(text) if d], "CustomResourceDefinition")
    generated = yaml.safe_load(CRD_FILE.read_text())
    # The schema is emitted verbatim, not re-serialised (numbers such as 1.0 or 1e-06 stay as written).
    assert CRD_FILE.read_text().split("\nspec:\n", 1)[1].rstrip() in text
    meta = crd["metadata"]
    assert (meta.get("annotations") or {}).get("helm.sh/resource-policy") == ("keep" if keep else None)
    assert CHART_LABELS <= set(meta["labels"])
    meta.pop("annotations", None)
    meta["labels"] = {k: v for k, v in meta["labels"].items() if k not in CHART_LABELS}
    assert crd == generated


@needs_helm
def test_crds_enabled_false_leaves_the_crd_out():
    assert not [d for d in render("crds.enabled=false") if d["kind"] == "CustomResourceDefinition"]


# ------------------------------------------------------------------------------ lint, determinism
@needs_helm
def test_helm_lint_passes():
    result = helm("lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_helm
@pytest.mark.parametrize("sets", [(), ("replicas=3", "watchNamespaces={a,b}", "podDisruptionBudget.enabled=true",
                                       "metrics.serviceMonitor.enabled=true")])
def test_template_output_is_deterministic(sets):
    assert template_text(*sets) == template_text(*sets)


# ----------------------------------------------------------------------------- the values schema
@needs_helm
@pytest.mark.parametrize("bad, message", [
    ("foo=bar", "additional properties 'foo' not allowed"),
    ("metrics.servicemonitor.enabled=true", "additional properties 'servicemonitor' not allowed"),
    ("image.tags=v1", "additional properties 'tags' not allowed"),
    ("securityContext.runAsRoot=true", "additional properties 'runAsRoot' not allowed"),
    ("tolerations[0].keys=x", "additional properties 'keys' not allowed"),
    ("replicas=-1", "minimum"),
    ("image.pullPolicy=Sometimes", "value must be one of"),
    ("watchNamespaces={Team_A}", "Team_A"),
])
def test_values_schema_rejects_typos_with_a_message(bad, message):
    result = helm("template", "t", str(CHART), "--kube-version", KUBE_VERSION, "--set", bad, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


# Free-form Kubernetes objects the API server validates (dry-run catches their typos).
FREE_FORM = {"/properties/affinity/properties/nodeAffinity", "/properties/affinity/properties/podAffinity",
             "/properties/affinity/properties/podAntiAffinity"}


def test_values_schema_closes_every_object():
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "additionalProperties" not in node \
                    and path not in FREE_FORM and "/valueFrom/" not in path:
                open_objects.append(path)
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(schema, "")
    assert schema["additionalProperties"] is False
    assert open_objects == []


def value_paths(node, prefix=""):
    """Every leaf key of values.yaml as a dotted path (lists and empty maps are leaves)."""
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from value_paths(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def test_docs_list_every_value():
    docs = (ROOT / "docs" / "install.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # A leaf counts as documented when it or a parent has a row (`resources` covers resources.limits.memory).
    rows = set(re.findall(r"^\| `([^`]+)` \|", docs, re.M))
    missing = [p for p in value_paths(values)
               if not any(".".join(p.split(".")[:i]) in rows for i in range(1, p.count(".") + 2))]
    assert missing == []


# ---------------------------------------------------------------------------- what values make
@needs_helm
def test_defaults_render_a_cluster_wide_standalone_operator():
    docs = render()
    assert kinds(docs) == [
        ("ClusterRole", "kuberl-cluster", None),
        ("ClusterRoleBinding", "kuberl-cluster", None),
        ("CustomResourceDefinition", "rljobs.kuberl.io", None),
        ("Deployment", "kuberl", "kuberl-system"),
        ("Service", "kuberl-metrics", "kuberl-system"),
        ("ServiceAccount", "kuberl", "kuberl-system"),
    ]
    c = container(docs)
    assert c["image"] == "ghcr.io/kuberl/kuberl-operator:0.1.0"
    assert c["args"] == ["operator", "--liveness=http://0.0.0.0:8081/healthz", "--metrics-port=8080",
                         "--all-namespaces", "--standalone"]
    assert one(docs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    # Empty by default so the operator schedules on any (CPU) node, kwok's included.
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert not {"nodeSelector", "tolerations", "affinity"} & set(pod)


@needs_helm
def test_operator_pod_is_locked_down():
    docs = render()
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"}}
    assert {"mountPath": "/tmp", "name": "tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in c["ports"]
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]


@needs_helm
def test_values_reach_the_pod():
    docs = render("image.tag=1.2.3", "image.repository=registry.local/kuberl-operator",
                  "imagePullSecrets={regcred}", "nodeSelector.pool=system",
                  "tolerations[0].key=dedicated", "tolerations[0].operator=Exists",
                  "extraEnv[0].name=HTTPS_PROXY", "extraEnv[0].value=http://proxy:3128",
                  "extraArgs={--verbose}", "metrics.port=9090", "health.port=9091",
                  "runtimeImage.repository=registry.local/kuberl-runtime", "runtimeImage.tag=1.2.3")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert c["image"] == "registry.local/kuberl-operator:1.2.3"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    assert env[DEFAULT_IMAGE_ENV] == "registry.local/kuberl-runtime:1.2.3"
    assert c["args"][-1] == "--verbose"
    assert "--metrics-port=9090" in c["args"] and "--liveness=http://0.0.0.0:9091/healthz" in c["args"]
    svc = one(docs, "Service")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]


def test_default_runtime_image_applies_only_to_jobs_left_at_the_api_default(monkeypatch):
    job = {"apiVersion": "kuberl.io/v1alpha1", "kind": "RLJob", "metadata": {"name": "j"},
           "spec": {"runtime": {"model": {"path": "/m"}, "data": {"path": "/d.jsonl"}}}}
    spec = parse_job(job)
    assert container_image(spec, spec.roles.trainer) == DEFAULT_IMAGE
    monkeypatch.setenv(DEFAULT_IMAGE_ENV, "registry.local/kuberl-runtime:1.2.3")
    assert container_image(spec, spec.roles.trainer) == "registry.local/kuberl-runtime:1.2.3"
    own = parse_job({**job, "spec": {**job["spec"], "image": "mine/rt:7"}})
    assert container_image(own, own.roles.trainer) == "mine/rt:7"


def rules(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


NAMESPACED_RULES = {
    ("kuberl.io", "rljobs"): {"get", "list", "watch", "delete"},
    ("kuberl.io", "rljobs/status"): {"update"},
    ("kuberl.io", "rljobs/finalizers"): {"update"},
    ("", "pods"): {"list", "watch", "create", "delete", "patch"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "events"): {"create"},
    **{(g, r): {"get", "create", "delete", "patch"}
       for g in ("scheduling.k8s.io", "scheduling.volcano.sh", "scheduling.x-k8s.io")
       for r in ("workloads", "podgroups")},
}
CLUSTER_READS = {("", "nodes"): {"list"}, ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}


@needs_helm
@pytest.mark.parametrize("replicas", [1, 2])
def test_cluster_wide_rbac_is_exactly_what_the_operator_calls(replicas):
    docs = render(f"replicas={replicas}")
    expected = {**CLUSTER_READS, **NAMESPACED_RULES}
    if replicas > 1:
        expected[("kopf.dev", "clusterkopfpeerings")] = {"get", "list", "watch", "patch"}
    assert rules(one(docs, "ClusterRole")) == expected
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kuberl", "namespace": "kuberl-system"}]


@needs_helm
def test_watch_namespaces_gives_a_role_per_namespace_and_no_cluster_wide_writes():
    docs = render("watchNamespaces={team-a,team-b}", "replicas=2")
    assert rules(one(docs, "ClusterRole")) == {**CLUSTER_READS, ("", "namespaces"): {"list", "watch"}}
    for ns in ("team-a", "team-b"):
        role = [d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == ns]
        assert len(role) == 1
        assert rules(role[0]) == {**NAMESPACED_RULES, ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"}}
        binding = [d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["namespace"] == ns][0]
        assert binding["roleRef"]["name"] == role[0]["metadata"]["name"]
        peering = [d for d in docs if d["kind"] == "KopfPeering" and d["metadata"]["namespace"] == ns]
        assert [p["metadata"]["name"] for p in peering] == ["kuberl"]
    args = container(docs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args
    assert "--peering=kuberl" in args


@needs_helm
def test_replicas_above_one_turn_on_peering_and_a_rolling_update():
    docs = render("replicas=2", "podDisruptionBudget.enabled=true")
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "kuberl"
    assert "--peering=kuberl" in container(docs)["args"] and "--standalone" not in container(docs)["args"]
    assert one(docs, "Deployment")["spec"]["strategy"] == {"type": "RollingUpdate"}
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    # The peering CRDs ship in crds/, which Helm installs before the templates.
    crds = list(yaml.safe_load_all((CHART / "crds" / "kopf-peerings.yaml").read_text()))
    assert {c["metadata"]["name"] for c in crds} == {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"}


@needs_helm
def test_service_monitor_selects_the_metrics_service():
    docs = render("metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    svc = one(docs, "Service")
    assert all(svc["metadata"]["labels"][k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_readme_shows_the_helm_install():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"helm (upgrade --install|install) kuberl \S*helm/kuberl", readme)


@needs_helm
def test_argocd_example_points_at_the_chart_with_valid_values(tmp_path):
    app = yaml.safe_load((ROOT / "examples" / "gitops" / "argocd-application.yaml").read_text())
    source = app["spec"]["source"]
    assert (ROOT / source["path"] / "Chart.yaml").exists()
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(source["helm"]["valuesObject"]))
    result = helm("template", source["helm"]["releaseName"], str(ROOT / source["path"]), "--kube-version",
                  KUBE_VERSION, "-f", str(values), check=False)
    assert result.returncode == 0, result.stderr
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
