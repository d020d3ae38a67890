"""The kopf registration table: which event runs which handler. Nothing else lives here.

Run with `kuberl operator` (or `kopf run -m kuberl_operator.main`).
"""

from __future__ import annotations

import kopf

from kuberl_operator import kopf_patches, labels
from kuberl_operator.api import GROUP, PLURAL, VERSION
from kuberl_operator.handlers import handle_child_event, handle_job_event, handle_startup

kopf_patches.apply()  # before kopf.run starts its observers


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    await handle_startup.start(settings, memo)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_) -> None:
    await handle_startup.stop(memo)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def rljob_event(event: dict, namespace: str, name: str, memo: kopf.Memo, **_) -> None:
    await handle_job_event.on_job_event(memo["ctx"], event.get("type"), namespace, name)


@kopf.on.event("", "v1", "pods", labels={labels.JOB: kopf.PRESENT})
async def pod_event(namespace: str, meta: dict, memo: kopf.Memo, **_) -> None:
    await handle_child_event.on_child_event(memo["ctx"], namespace, meta)


@kopf.on.event("", "v1", "configmaps", labels={labels.JOB: kopf.PRESENT}, when=handle_child_event.is_deletion)
async def configmap_deleted(namespace: str, meta: dict, memo: kopf.Memo, **_) -> None:
    await handle_child_event.on_child_event(memo["ctx"], namespace, meta, gone=True)


@kopf.on.event("", "v1", "services", labels={labels.JOB: kopf.PRESENT}, when=handle_child_event.is_deletion)
async def service_deleted(namespace: str, meta: dict, memo: kopf.Memo, **_) -> None:
    await handle_child_event.on_child_event(memo["ctx"], namespace, meta, gone=True)


@kopf.on.probe(id="jobs")
def jobs_probe(memo: kopf.Memo, **_) -> int:
    return len(memo["ctx"].metrics._phases)
