"""The effects layer's pure parts: the idempotent API wrapper and the "is the child current" check.
(Everything that talks to the API server is exercised against a real one in tests/integration.)"""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException

from kuberl_operator.effects import _is_subset, _plural, call, is_namespace_terminating


def api_error(status: int, body: dict | None = None) -> ApiException:
    e = ApiException(status=status, reason="x")
    e.body = json.dumps(body or {})
    return e


def raising(exc: Exception):
    def fn(*_a, **_kw):
        raise exc
    return fn


def test_call_returns_the_result_and_passes_arguments():
    assert call(lambda a, b=0: a + b, 1, b=2) == 3


@pytest.mark.parametrize("status", [409, 404])
def test_statuses_named_ok_mean_already_done(status):
    assert call(raising(api_error(status)), ok=(status,)) is None


@pytest.mark.parametrize("status,ok", [(409, (404,)), (404, (409,)), (500, (409, 404)), (403, (404,))])
def test_other_statuses_raise(status, ok):
    with pytest.raises(ApiException):
        call(raising(api_error(status)), ok=ok)


TERMINATING = {"kind": "Status", "code": 403, "reason": "Forbidden",
               "details": {"causes": [{"reason": "NamespaceTerminating"}]}}


def test_a_create_in_a_terminating_namespace_is_nothing_to_do():
    assert is_namespace_terminating(api_error(403, TERMINATING))
    assert call(raising(api_error(403, TERMINATING)), ok=(409,)) is None


GONE = {"kind": "Status", "code": 404, "reason": "NotFound", "message": 'namespaces "team-a" not found',
        "details": {"name": "team-a", "kind": "namespaces"}}


def test_a_create_in_a_namespace_already_gone_is_nothing_to_do():
    assert call(raising(api_error(404, GONE)), ok=(409,)) is None
    # ...but a 404 about anything else on a create is an error, and a delete's 404 is its own "ok"
    with pytest.raises(ApiException):
        call(raising(api_error(404, {**GONE, "details": {"name": "x", "kind": "podgroups"}})), ok=(409,))
    with pytest.raises(ApiException):
        call(raising(api_error(404, GONE)), ok=())


def test_other_forbidden_errors_raise_even_for_creates():
    with pytest.raises(ApiException):
        call(raising(api_error(403, {"reason": "Forbidden", "message": "RBAC: no"})), ok=(409,))
    # ...and a delete never swallows a 403
    with pytest.raises(ApiException):
        call(raising(api_error(403, TERMINATING)), ok=(404,))


def test_subset_ignores_server_defaults_but_not_changes():
    want = {"podGroupTemplates": [{"name": "gang", "schedulingPolicy": {"gang": {"minCount": 4}}}]}
    have = {"podGroupTemplates": [{"name": "gang", "schedulingPolicy": {"gang": {"minCount": 4}},
                                   "disruptionMode": "PodGroup"}], "controllerRef": {"kind": "RLJob"}}
    assert _is_subset(want, have)
    changed = {"podGroupTemplates": [{"name": "gang", "schedulingPolicy": {"gang": {"minCount": 6}}}]}
    assert not _is_subset(changed, have)
    assert not _is_subset({"a": [1, 2]}, {"a": [1]})
    assert not _is_subset({"a": {"b": 1}}, {"a": None})


@pytest.mark.parametrize("kind,plural", [("Pod", "pods"), ("ConfigMap", "configmaps"), ("Service", "services"),
                                         ("Workload", "workloads"), ("PodGroup", "podgroups")])
def test_plurals_of_every_child_kind(kind, plural):
    assert _plural({"kind": kind}) == plural
