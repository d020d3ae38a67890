"""Build (once per machine) and locate the control-plane binaries of the dev cluster.

Everything is compiled from the Go module proxy, because the machines this runs on have no Docker,
no registry and no release downloads. Binaries land in a cache directory outside the repository
(``~/.cache/kuberl/k8s/<version>/bin``, or ``$KUBERL_K8S_CACHE/bin``); a second call with the cache
present only checks that the files exist.

Use ``ensure_binaries()`` from Python or ``python -m kuberl_operator.devcluster build``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

K8S_VERSION = "v1.36.3"
K8S_STAGING_VERSION = "v0.36.3"
ETCD_VERSION = "v3.6.13"
KWOK_VERSION = "v0.8.0"
HELM_MODULE = "helm.sh/helm/v3"
HELM_VERSION = "v3.21.4"

K8S_COMMANDS = ("kube-apiserver", "kube-scheduler", "kube-controller-manager", "kubectl")
BINARIES = (*K8S_COMMANDS, "etcd", "kwok", "helm")


class BuildError(RuntimeError):
    """A binary could not be built; the message names the module that failed."""


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of the built binaries."""

    bin_dir: Path

    def __getitem__(self, name: str) -> Path:
        return self.bin_dir / name

    def missing(self) -> list[str]:
        return [name for name in BINARIES if not os.access(self[name], os.X_OK)]


def cache_dir() -> Path:
    """Root of the build cache: ``$KUBERL_K8S_CACHE`` or ``~/.cache/kuberl/k8s/<k8s version>``."""
    override = os.environ.get("KUBERL_K8S_CACHE")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "kuberl" / "k8s" / K8S_VERSION


def locate_binaries() -> Binaries:
    return Binaries(cache_dir() / "bin")


def ensure_binaries(log=None) -> Binaries:
    """Return the binaries, building the missing ones first (10-30 minutes cold on 2 cores)."""
    log = log or _stderr
    binaries = locate_binaries()
    if not binaries.missing():
        return binaries
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    # Two sessions (pytest and a shell, say) must not build into the same directory at once.
    with open(root / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = binaries.missing()
        if missing:
            _build(root, binaries.bin_dir, missing, log)
    return binaries


def _stderr(message: str) -> None:
    print(f"[kuberl build] {message}", file=sys.stderr, flush=True)


def _go_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GOPROXY", "https://proxy.golang.org,direct")
    env["CGO_ENABLED"] = "0"
    env["GOTOOLCHAIN"] = env.get("GOTOOLCHAIN", "local")
    # sum.golang.org is not reachable from every build machine. The wrappers' go.sum is seeded
    # from the upstream modules' own go.sum, so dependency hashes are still checked against what
    # upstream committed; only the top-level modules come from the proxy unverified.
    if "GOSUMDB" not in os.environ and not os.environ.get("KUBERL_USE_SUMDB"):
        env["GOSUMDB"] = "off"
    return env


def _build(root: Path, bin_dir: Path, missing: list[str], log) -> None:
    env = _go_env(root)
    if not shutil.which("go"):
        raise BuildError("the go command is not on PATH; install Go >= 1.25 to build the "
                         "dev cluster")
    bin_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"building {', '.join(missing)} into {bin_dir} (cold: about 10-30 minutes on 2 cores)")
    if any(name in missing for name in K8S_COMMANDS):
        _build_kubernetes(root, bin_dir, [n for n in K8S_COMMANDS if n in missing], env, log)
    if "etcd" in missing:
        _build_etcd(root, bin_dir, env, log)
    if "kwok" in missing:
        _go_install("sigs.k8s.io/kwok", "cmd/kwok", KWOK_VERSION, bin_dir, env, log,
                    ldflags="-s -w")
    if "helm" in missing:
        _go_install(HELM_MODULE, "cmd/helm", HELM_VERSION, bin_dir, env, log,
                    ldflags=f"-s -w -X helm.sh/helm/v3/internal/version.version={HELM_VERSION}")
    log(f"all binaries ready in {time.monotonic() - started:.0f}s")


def _run_go(args: list[str], cwd: Path, env: dict[str, str], module: str, log) -> str:
    """Run one go command, echoing a progress line every 50 compiled packages."""
    log(f"{module}: go {' '.join(args[:2])} ...")
    proc = subprocess.Popen(["go", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    packages = 0
    last = time.monotonic()
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-40:]
        if args[0] in ("build", "install") and not line.startswith(("go: ", "#")):
            packages += 1
            if packages % 50 == 0 or time.monotonic() - last > 60:
                last = time.monotonic()
                log(f"{module}: {packages} packages compiled, latest {line.strip()}")
    if proc.wait() != 0:
        raise BuildError(f"building {module} failed (go {' '.join(args)}):\n" + "\n".join(tail))
    return "\n".join(tail)


def _module_dir(module: str, version: str, cwd: Path, env: dict[str, str], log) -> dict:
    out = subprocess.run(["go", "mod", "download", "-json", f"{module}@{version}"], cwd=cwd,
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise BuildError(f"downloading {module}@{version} failed:\n{out.stdout}{out.stderr}")
    return json.loads(out.stdout)


def _k8s_wrapper_go_mod(upstream_go_mod: str) -> str:
    """A go.mod that requires k8s.io/kubernetes and pins every staging module it replaces."""
    staging = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", upstream_go_mod, re.M)
    if not staging:
        raise BuildError("k8s.io/kubernetes: no ./staging replace directives found in its go.mod")
    godebug = re.search(r"^godebug\s+(\(.*?\)|[^\n]+)", upstream_go_mod, re.M | re.S)
    go_line = re.search(r"^go\s+(\S+)", upstream_go_mod, re.M)
    lines = [
        "module kuberl.local/k8s-build",
        "",
        f"go {go_line.group(1) if go_line else '1.25'}",
        "",
    ]
    if godebug:
        lines += [godebug.group(0), ""]
    lines += [f"require k8s.io/kubernetes {K8S_VERSION}", "", "replace ("]
    lines += [f"\t{path} => {path} {K8S_STAGING_VERSION}" for path in sorted(set(staging))]
    lines += [")", ""]
    return "\n".join(lines)


def _k8s_ldflags() -> str:
    major, minor = K8S_VERSION.lstrip("v").split(".")[:2]
    build_date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    flags = ["-s", "-w"]
    # Without these /version says v0.0.0-master and Helm's kubeVersion checks reject the cluster.
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={K8S_VERSION}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate={build_date}",
        ]
    return " ".join(flags)


def _build_kubernetes(root: Path, bin_dir: Path, commands: list[str], env, log) -> None:
    module = f"k8s.io/kubernetes@{K8S_VERSION}"
    work = root / "src" / "kubernetes"
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text("module kuberl.local/bootstrap\n\ngo 1.25\n")
    info = _module_dir("k8s.io/kubernetes", K8S_VERSION, work, env, log)
    upstream_go_mod = Path(info["GoMod"]).read_text()
    (work / "go.mod").write_text(_k8s_wrapper_go_mod(upstream_go_mod))
    (work / "go.sum").write_text((Path(info["Dir"]) / "go.sum").read_text())
    packages = [f"k8s.io/kubernetes/cmd/{name}" for name in commands]
    _run_go(["get", *[f"{p}@{K8S_VERSION}" for p in packages]], work, env, module, log)
    _build_into(work, bin_dir, packages, _k8s_ldflags(), env, module, log)


def _build_etcd(root: Path, bin_dir: Path, env, log) -> None:
    module = f"go.etcd.io/etcd/server/v3@{ETCD_VERSION}"
    work = root / "src" / "etcd"
    work.mkdir(parents=True, exist_ok=True)
    (work / "go.mod").write_text("module kuberl.local/etcd-build\n\ngo 1.25\n")
    info = _module_dir("go.etcd.io/etcd/server/v3", ETCD_VERSION, work, env, log)
    (work / "go.sum").write_text((Path(info["Dir"]) / "go.sum").read_text())
    # The server module is itself the etcd main package; requiring it from a wrapper drops the
    # ../api-style replace directives that make `go install` refuse it.
    _run_go(["get", module], work, env, module, log)
    _build_into(work, bin_dir, ["go.etcd.io/etcd/server/v3"], "-s -w", env, module, log,
                rename={"v3": "etcd", "server": "etcd"})


def _build_into(work: Path, bin_dir: Path, packages: list[str], ldflags: str, env, module: str,
                log, rename: dict[str, str] | None = None) -> None:
    staging = work / "out"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    _run_go(["build", "-mod=mod", "-v", "-p", "2", "-trimpath", "-ldflags", ldflags,
             "-o", str(staging) + "/", *packages], work, env, module, log)
    for built in staging.iterdir():
        name = (rename or {}).get(built.name, built.name)
        os.replace(built, bin_dir / name)
        log(f"{module}: installed {bin_dir / name}")


def _go_install(module: str, cmd: str, version: str, bin_dir: Path, env, log,
                ldflags: str) -> None:
    env = dict(env, GOBIN=str(bin_dir))
    _run_go(["install", "-v", "-p", "2", "-trimpath", "-ldflags", ldflags,
             f"{module}/{cmd}@{version}"], bin_dir, env, f"{module}@{version}", log)

