"""Work-arounds for kopf bugs the operator runs into; `apply()` installs them (main.py calls it, so
they hold however the operator is started: `kuberl operator` or `kopf run -m kuberl_operator.main`).

Namespaces created while the operator starts (kopf 1.45.2, `--namespace` patterns): kopf's
namespace observer lists the namespaces, then starts a watch-stream, which lists them a second time
and watches from that second listing; the entries of the second listing are ignored. A namespace
created between the two listings is in neither the first listing nor any watch event, so kopf
never watched it and its RLJobs were ignored until the operator restarted. The patch treats an
entry of the second listing that kopf does not know yet like an ADDED event (the same revision
as for the first listing's entries); known and non-matching ones stay ignored, as before.
"""

from __future__ import annotations

from typing import Any

try:
    from kopf._core.reactor import observation
except ImportError:  # another kopf layout: nothing to patch there
    observation = None


async def _process_discovered_namespace_event(*, raw_event: dict, namespaces: Any, insights: Any, **_: Any) -> None:
    if raw_event["type"] is None:  # an entry of the watch-stream's own listing
        name = raw_event["object"]["metadata"]["name"]
        matched = any(observation.references.match_namespace(name, pattern) for pattern in namespaces)
        if name in insights.namespaces or not matched:
            return
    async with insights.revised:
        observation.revise_namespaces(raw_events=[raw_event], insights=insights, namespaces=namespaces)
        insights.revised.notify_all()


def apply() -> None:
    if observation is not None and hasattr(observation, "process_discovered_namespace_event"):
        observation.process_discovered_namespace_event = _process_discovered_namespace_event
