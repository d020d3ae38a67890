"""One reconcile pass at a time per job, triggers coalesced, later passes scheduled.

Every trigger (an RLJob event, an event of one of its pods, a timer) calls `request(key)`. Passes
of one job never overlap: a request that arrives while a pass runs marks the job dirty and the
running pass goes round once more. Different jobs reconcile concurrently. `later(key, delay)`
keeps one timer per job, the earliest wins. A pass that raises is retried with per-job exponential
backoff (kopf.TemporaryError's delay when it gives one), so no RLJob can make the operator loop hot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import kopf

Key = tuple[str, str]  # (namespace, name)
log = logging.getLogger("kuberl.workqueue")
MIN_SPACING_S = 0.2  # at most 5 passes a second per job, whatever triggers them
ERROR_BACKOFF_S = (1, 2, 5, 10, 30, 60, 120, 300)


@dataclass
class _JobState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dirty: bool = False
    timer: asyncio.TimerHandle | None = None
    timer_at: float = 0.0
    failures: int = 0
    last_pass: float = 0.0


class WorkQueue:
    def __init__(self, reconcile: Callable[[Key], Awaitable[float | None]],
                 on_error: Callable[[Key, BaseException], None] | None = None):
        self._reconcile = reconcile  # returns seconds until the next pass is needed, or None
        self._on_error = on_error
        self._jobs: dict[Key, _JobState] = {}
        self._tasks: set[asyncio.Task] = set()

    def forget(self, key: Key) -> None:
        state = self._jobs.pop(key, None)
        if state is not None and state.timer is not None:
            state.timer.cancel()

    def later(self, key: Key, delay: float) -> None:
        """Make sure a pass of `key` starts within `delay` seconds."""
        state = self._jobs.setdefault(key, _JobState())
        loop = asyncio.get_running_loop()
        at = loop.time() + max(delay, 0.0)
        if state.timer is not None and state.timer_at <= at:
            return
        if state.timer is not None:
            state.timer.cancel()
        state.timer_at = at
        state.timer = loop.call_at(at, self._fire, key)

    def _fire(self, key: Key) -> None:
        state = self._jobs.get(key)
        if state is None:
            return
        state.timer = None
        task = asyncio.get_running_loop().create_task(self.request(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def request(self, key: Key) -> None:
        state = self._jobs.setdefault(key, _JobState())
        state.dirty = True
        if state.lock.locked():
            return  # the running pass will go round once more
        async with state.lock:
            while state.dirty and self._jobs.get(key) is state:
                state.dirty = False
                wait = state.last_pass + MIN_SPACING_S - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                state.last_pass = time.monotonic()
                await self._run(key, state)

    async def _run(self, key: Key, state: _JobState) -> None:
        try:
            requeue = await self._reconcile(key)
        except kopf.TemporaryError as e:
            state.failures += 1
            self.later(key, e.delay if e.delay is not None else self._backoff(state))
            log.info("%s/%s: %s", *key, e)
            return
        except Exception as e:  # noqa: BLE001 - nothing an RLJob contains may stop the operator
            state.failures += 1
            delay = self._backoff(state)
            log.exception("%s/%s: reconcile failed (retry in %ss)", *key, delay)
            if self._on_error is not None:
                self._on_error(key, e)
            self.later(key, delay)
            return
        state.failures = 0
        if requeue is not None and self._jobs.get(key) is state:
            self.later(key, requeue)

    @staticmethod
    def _backoff(state: _JobState) -> float:
        return float(ERROR_BACKOFF_S[min(state.failures, len(ERROR_BACKOFF_S)) - 1])
