"""kopf_patches: kopf's namespace observer, as the operator runs it, takes a namespace that only its
watch-stream's own listing shows (created between kopf's two listings at start-up), and nothing
else from that listing. The race itself, against a real operator: tests/integration/test_operator_start.py."""

from __future__ import annotations

import asyncio

import pytest
from kopf._cogs.structs.references import Insights
from kopf._core.reactor import observation

import kuberl_operator.main  # noqa: F401 - the registration table applies the patches on import

PATTERNS = ["team-*"]


def listed(name: str) -> dict:
    """An entry of a watch-stream's initial listing, as kopf hands it to the processor."""
    return {"type": None, "object": {"metadata": {"name": name}}}


async def observe(insights: Insights, *events: dict) -> None:
    for event in events:
        await observation.process_discovered_namespace_event(raw_event=event, namespaces=PATTERNS, insights=insights)


@pytest.mark.parametrize(("known", "event", "after"), [
    # Created between the two listings: only the second one shows it. kopf ignored it for good.
    (set(), listed("team-a"), {"team-a"}),
    # What kopf already knows, and what no pattern matches, stay as they are.
    ({"team-a"}, listed("team-a"), {"team-a"}),
    (set(), listed("other"), set()),
    # Terminating (kopf's own test: a deletionTimestamp and the namespace controller's conditions).
    (set(), {"type": None, "object": {"metadata": {"name": "team-b", "deletionTimestamp": "2026-01-01T00:00:00Z"},
                                      "status": {"conditions": [{"type": "NamespaceDeletionContentFailure",
                                                                 "status": "False"}]}}}, set()),
    # Watch events are kopf's own handling, unchanged.
    (set(), {"type": "ADDED", "object": {"metadata": {"name": "team-c"}}}, {"team-c"}),
    ({"team-c"}, {"type": "DELETED", "object": {"metadata": {"name": "team-c"}}}, set()),
])
def test_the_watch_streams_listing_adds_only_namespaces_kopf_missed(known, event, after):
    async def main():
        insights = Insights()
        insights.namespaces.update(known)
        await observe(insights, event)
        return insights.namespaces

    assert asyncio.run(main()) == after
