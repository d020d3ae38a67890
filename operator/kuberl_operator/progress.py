"""Read trainer rank 0's progress document (GET /progress), rate-limited per job.

A job is polled at most once per `interval` seconds however often it is reconciled, so thousands of
jobs do not turn into thousands of requests (or status writes) per second. A failed fetch is not an
error: the job just keeps its last mirrored progress.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from pydantic import ValidationError

from kuberl_operator import names
from kuberl_operator.planner import is_foreign
from kuberl_runtime.config import LoggingConfig
from kuberl_runtime.contract import Progress

Obj = dict[str, Any]
log = logging.getLogger("kuberl.progress")
DEFAULT_INTERVAL_S = 15.0
DEFAULT_URL_TEMPLATE = "http://{pod_ip}:{port}/progress"
FETCH_TIMEOUT_S = 3.0
DEFAULT_PORT: int = LoggingConfig.model_fields["port"].default  # the runtime's HTTP port (8470)


def progress_url(template: str, job: Obj, pod: Obj) -> str | None:
    """The URL of the driver pod's progress endpoint, or None while the pod has no IP."""
    pod_ip = (pod.get("status") or {}).get("podIP")
    if not pod_ip:
        return None
    logging_cfg = ((job.get("spec") or {}).get("runtime") or {}).get("logging") or {}
    port = logging_cfg.get("port", DEFAULT_PORT)
    meta = job["metadata"]
    return template.format(pod_ip=pod_ip, port=port, pod=pod["metadata"]["name"], job=meta["name"],
                           namespace=meta["namespace"])


class ProgressReader:
    def __init__(self, interval: float = DEFAULT_INTERVAL_S, url_template: str = DEFAULT_URL_TEMPLATE):
        self.interval = interval
        self.url_template = url_template
        self._last: dict[tuple[str, str], float] = {}
        self._session: aiohttp.ClientSession | None = None

    def forget(self, key: tuple[str, str]) -> None:
        self._last.pop(key, None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def driver(self, job: Obj, pods: list[Obj]) -> Obj | None:
        """Trainer rank 0 of this job (not of an earlier job of the same name), while it runs."""
        meta = job["metadata"]
        want = names.pod_name(meta["name"], "trainer", 0)
        return next((p for p in pods if p["metadata"]["name"] == want and not is_foreign(p, meta.get("uid", ""))
                     and (p.get("status") or {}).get("phase") == "Running"), None)

    async def read(self, job: Obj, pods: list[Obj]) -> Progress | None:
        """The driver's progress when it runs and the job is due for a poll; else None."""
        if self.interval <= 0:
            return None
        meta = job["metadata"]
        key = (meta["namespace"], meta["name"])
        pod = self.driver(job, pods)
        if pod is None or time.monotonic() - self._last.get(key, -1e9) < self.interval:
            return None
        try:
            url = progress_url(self.url_template, job, pod)
        except (KeyError, ValueError, IndexError) as e:
            log.warning("bad --progress-url-template %r: %s", self.url_template, e)
            return None
        if url is None:
            return None
        self._last[key] = time.monotonic()
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S))
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    return None
                return Progress.model_validate(await resp.json(content_type=None))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, ValidationError) as e:
            log.debug("progress of %s/%s not read from %s: %s", *key, url, e)
            return None
