"""Start-up: kopf settings (bookkeeping in kuberl.io/* annotations, server-side pod selector, our own
Events), the shared context, the metrics server. Clean-up closes what start-up opened."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import kopf
from kubernetes import client, config

from kuberl_operator import labels
from kuberl_operator.context import OperatorConfig, OperatorContext
from kuberl_operator.effects import Kube
from kuberl_operator.metrics import Metrics
from kuberl_operator.observe import ClusterFacts
from kuberl_operator.progress import ProgressReader
from kuberl_operator.workqueue import WorkQueue

API_POOL_SIZE = 32


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf builds a diff base (a deep copy of the object) on every watch event, for change handlers
    (on.create/update/...). We register only event handlers, so there is nothing to diff: skipping
    it saves a deep copy of every pod and RLJob event (the operator's largest CPU cost at scale)."""

    def build(self, *, body, extra_fields=None):  # noqa: ARG002 - kopf's signature
        return {}

    def fetch(self, *, body):  # noqa: ARG002
        return None


def configure(settings: kopf.OperatorSettings) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=labels.KOPF_PREFIX)
    settings.persistence.diffbase_storage = NoDiffBase(prefix=labels.KOPF_PREFIX)
    settings.persistence.finalizer = f"{labels.KOPF_PREFIX}/finalizer"
    settings.posting.enabled = False  # the operator posts its own, designed Events
    for plural in ("pods", "configmaps", "services"):  # only children of an RLJob, filtered server-side
        settings.watching.label_selectors[plural] = labels.JOB
    settings.watching.server_timeout = 300
    settings.networking.error_backoffs = (1, 2, 5, 10, 30)


def api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    cfg = client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = API_POOL_SIZE
    return client.ApiClient(cfg)


async def start(settings: kopf.OperatorSettings, memo: kopf.Memo) -> None:
    configure(settings)
    # API calls run in worker threads (asyncio.to_thread): as many as the connection pool serves.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(API_POOL_SIZE, thread_name_prefix="kuberl"))
    cfg: OperatorConfig = memo.get("config") or OperatorConfig()
    kube = Kube(api_client())
    metrics = Metrics()
    metrics.serve(cfg.metrics_port)
    ctx = OperatorContext(config=cfg, kube=kube, facts=ClusterFacts(kube),
                          progress=ProgressReader(cfg.progress_interval, cfg.progress_url_template),
                          metrics=metrics, queue=None)  # type: ignore[arg-type]

    from kuberl_operator.handlers.handle_reconcile import reconcile

    async def run_pass(key):
        return await reconcile(ctx, key)

    ctx.queue = WorkQueue(run_pass, on_error=lambda key, exc: count_error(ctx))
    memo["ctx"] = ctx
    logging.getLogger("kuberl").info("kuberl operator started (metrics port %s)", cfg.metrics_port or "off")


def count_error(ctx: OperatorContext) -> None:
    ctx.metrics.errors.inc()
    ctx.metrics.reconciles.labels("error").inc()


async def stop(memo: kopf.Memo) -> None:
    ctx: OperatorContext | None = memo.get("ctx")
    if ctx is not None:
        await ctx.progress.close()
