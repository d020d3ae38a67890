"""`kuberl`: validate, render and generate (CRD, field reference) offline; run the operator, a
dev cluster or a local job.

Commands that need heavy dependencies import them only when they run, so `kuberl validate`
works from the base install (pydantic, pyyaml, click) and the operator never loads torch.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import yaml

from kuberl_operator import api


def load_documents(path: str) -> list[Any]:
    """YAML documents of a file ('-' is stdin); raises click.ClickException on unreadable YAML."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise click.ClickException(f"{path}: {e.strerror}") from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise click.ClickException(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def is_other_object(doc: Any) -> bool:
    """A Kubernetes object of another API (a PersistentVolumeClaim next to the job, say): kind and
    apiVersion both set, kind not RLJob and group not kuberl.io. Anything else is checked as an RLJob,
    so `kind: RLJobs` or a missing apiVersion is an error, not a silent skip."""
    if not isinstance(doc, dict) or not doc.get("kind") or not doc.get("apiVersion"):
        return False
    return doc["kind"] != api.KIND and str(doc["apiVersion"]).split("/")[0] != api.GROUP


def _documents(docs: list[Any]) -> str:
    """'2 documents (PersistentVolume, PersistentVolumeClaim)'"""
    kinds = sorted({str(d["kind"]) for d in docs if isinstance(d, dict) and d.get("kind")})
    return f"{len(docs)} document{'' if len(docs) == 1 else 's'}" + (f" ({', '.join(kinds)})" if kinds else "")


def _job_errors(doc: Any) -> list[str]:
    if not isinstance(doc, dict):
        return ["document is not a mapping"]
    try:
        api.parse_job(doc)
    except api.SpecError as e:
        return [f"{p}: {m}" if p else m for p, m in e.errors]
    return []


class LazyGroup(click.Group):
    """A group whose heavier subcommands are imported only when invoked (or listed in --help)."""

    lazy: dict[str, tuple[str, str, str]] = {
        # name: (module, attribute, extra that provides its dependencies)
        "dev-cluster": ("kuberl_operator.devcluster.cli", "dev_cluster", "dev"),
        "local": ("kuberl_runtime.local", "local", "runtime"),
        "operator": ("kuberl_operator.run", "operator", "operator"),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return super().get_command(ctx, name)
        module, attr, extra = self.lazy[name]
        import importlib

        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:
            raise click.ClickException(
                f"`kuberl {name}` needs more packages ({e.name} is missing): pip install 'kuberl[{extra}]'"
            ) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kuberl")
def main() -> None:
    """kuberl: reinforcement-learning post-training of LLMs on Kubernetes."""


@main.command()
@click.argument("files", nargs=-1, required=True)
def validate(files: tuple[str, ...]) -> None:
    """Validate the RLJobs in manifest files; errors name the field path. Exit 1 if any is invalid.

    Documents of other kinds (a PersistentVolumeClaim the job mounts, say) are skipped and counted;
    a file without an RLJob is an error."""
    bad = 0
    for path in files:
        try:
            docs = load_documents(path)
        except click.ClickException as e:
            click.echo(e.message, err=True)
            bad += 1
            continue
        others = [d for d in docs if is_other_object(d)]
        if not docs:
            click.echo(f"{path}: no documents", err=True)
            bad += 1
        elif len(others) == len(docs):
            click.echo(f"{path}: no RLJob (kind: RLJob, apiVersion: {api.API_VERSION}) among {_documents(docs)}",
                       err=True)
            bad += 1
        elif others:
            click.echo(f"{path}: skipped, not RLJobs: {_documents(others)}")
        for i, doc in enumerate(docs):
            if is_other_object(doc):
                continue
            name = (doc.get("metadata") or {}).get("name", f"#{i}") if isinstance(doc, dict) else f"#{i}"
            errors = _job_errors(doc)
            for err in errors:
                click.echo(f"{path}: {name}: {err}", err=True)
            if errors:
                bad += 1
            else:
                click.echo(f"{path}: {name}: valid")
    sys.exit(1 if bad else 0)


@main.command()
@click.argument("file")
@click.option("--namespace", "-n", default=None, help="Namespace (default: metadata.namespace or 'default').")
@click.option("--native-gang/--no-native-gang", default=False, show_default=True,
              help="Render the Workload of Kubernetes' gang scheduling as a cluster serving it would get.")
def render(file: str, namespace: str | None, native_gang: bool) -> None:
    """Print every child object an RLJob gets, as YAML (offline; for review and GitOps diffs).

    Documents of other kinds in FILE (a PersistentVolumeClaim, say) are printed unchanged, in their
    place among the RLJobs' children (--namespace does not touch them)."""
    from kuberl_operator.planner import Observed, plan

    docs = load_documents(file)
    if all(is_other_object(d) for d in docs):
        others = f" among {_documents(docs)}" if docs else ""
        raise click.ClickException(f"{file}: no RLJob (kind: RLJob, apiVersion: {api.API_VERSION}){others}")
    out = []
    for doc in docs:
        if is_other_object(doc):
            out.append(doc)
            continue
        errors = _job_errors(doc)
        if errors:
            raise click.ClickException("\n".join(f"{file}: {e}" for e in errors))
        meta = dict(doc.get("metadata") or {})
        meta.setdefault("namespace", namespace or "default")
        if namespace:
            meta["namespace"] = namespace
        meta.setdefault("uid", "00000000-0000-0000-0000-000000000000")
        meta.setdefault("generation", 1)
        epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)  # fixed: rendering is byte-for-byte repeatable
        p = plan({**doc, "metadata": meta, "status": {}}, Observed(pods=[], now=epoch, native_gang=native_gang))
        out.extend(p.children + p.create_pods)
    click.echo(yaml.safe_dump_all(out, sort_keys=False, width=120), nl=False)


@main.command()
def crd() -> None:
    """Print the RLJob CustomResourceDefinition generated from the API models."""
    from kuberl_operator.crd import render_crd

    click.echo(render_crd(), nl=False)


@main.command()
def reference() -> None:
    """Print the Markdown reference of every RLJob field (docs/reference.md) from the API models."""
    from kuberl_operator.reference import render_reference

    click.echo(render_reference(), nl=False)


if __name__ == "__main__":
    main()
