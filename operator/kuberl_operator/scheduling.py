"""Gang scheduling and queueing: what the pods carry and which group objects exist beside them.

Three contracts, all optional and combinable:
- Kubernetes' own gang scheduling (`scheduling.k8s.io/v1alpha2`, `GenericWorkload` +
  `GangScheduling` gates, v1.36): a Workload holding one gang PodGroupTemplate (minCount = all
  pods, controllerRef = the RLJob), one PodGroup per gang attempt created from that template, and
  `spec.schedulingGroup.podGroupName` on each pod naming it. The scheduler's GangScheduling plugin
  reads the PodGroup's policy and binds no pod until minCount of them fit. A new PodGroup per
  attempt because a pod's schedulingGroup and a PodGroup's policy are immutable; the planner
  deletes those of earlier attempts once their pods are gone. Used when `scheduling.gang` is on
  and the cluster serves the API.
- Kueue's plain-pod-group integration (RLJob is not a Kueue built-in kind): queue/group labels and
  the total-count annotation on every pod. A new group name per gang attempt, so a restarted gang is
  admitted as a fresh workload instead of joining the failed one.
- Volcano or scheduler-plugins (coscheduling) PodGroups, with the matching schedulerName.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kuberl_operator import labels, names
from kuberl_operator.api import RLJobSpec

Obj = dict[str, Any]

WORKLOAD_API_VERSION = "scheduling.k8s.io/v1alpha2"
WORKLOAD_POD_GROUP = "gang"  # the Workload's one PodGroupTemplate
VOLCANO_API_VERSION = "scheduling.volcano.sh/v1beta1"
COSCHEDULING_API_VERSION = "scheduling.x-k8s.io/v1alpha1"
SCHEDULER_FOR = {"volcano": "volcano", "scheduler-plugins": "scheduler-plugins-scheduler"}


@dataclass
class PodScheduling:
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    pod_spec: Obj = field(default_factory=dict)


def total_pods(spec: RLJobSpec) -> int:
    return sum(rs.replicas for _, rs in spec.roles.active())


def kueue_group_name(job: str, restart: int) -> str:
    return f"{job}-g{restart}"


def pod_scheduling(job: str, spec: RLJobSpec, restart: int, native_gang: bool = False) -> PodScheduling:
    s = spec.run_policy.scheduling
    out = PodScheduling()
    if s.queue_name:
        out.labels[labels.KUEUE_QUEUE] = s.queue_name
        out.labels[labels.KUEUE_POD_GROUP] = kueue_group_name(job, restart)
        out.annotations[labels.KUEUE_GROUP_TOTAL] = str(total_pods(spec))
    if s.pod_group == "volcano":
        out.annotations[labels.VOLCANO_GROUP] = names.podgroup_name(job)
    elif s.pod_group == "scheduler-plugins":
        out.labels[labels.COSCHEDULING_GROUP] = names.podgroup_name(job)
    scheduler = s.scheduler_name or SCHEDULER_FOR.get(s.pod_group)
    if scheduler:
        out.pod_spec["schedulerName"] = scheduler
    if s.priority_class_name:
        out.pod_spec["priorityClassName"] = s.priority_class_name
    if native_gang and s.gang:
        out.pod_spec["schedulingGroup"] = {"podGroupName": names.native_podgroup_name(job, restart)}
    return out


def _gang_policy(spec: RLJobSpec) -> Obj:
    return {"gang": {"minCount": total_pods(spec)}}


def build_workload(meta: Obj, spec: RLJobSpec) -> Obj:
    """Kubernetes' Workload: the gang's PodGroupTemplate, owned by (and pointing back at) the RLJob."""
    owner = meta["ownerReferences"][0]
    return {
        "apiVersion": WORKLOAD_API_VERSION,
        "kind": "Workload",
        "metadata": meta,
        "spec": {
            "controllerRef": {"apiGroup": owner["apiVersion"].split("/")[0], "kind": owner["kind"],
                              "name": owner["name"]},
            "podGroupTemplates": [{"name": WORKLOAD_POD_GROUP, "schedulingPolicy": _gang_policy(spec)}],
        },
    }


def build_native_podgroup(meta: Obj, workload: str, spec: RLJobSpec) -> Obj:
    """The runtime PodGroup of one gang attempt, stamped from the Workload's template."""
    return {
        "apiVersion": WORKLOAD_API_VERSION,
        "kind": "PodGroup",
        "metadata": meta,
        "spec": {
            "podGroupTemplateRef": {"workload": {"workloadName": workload, "podGroupTemplateName": WORKLOAD_POD_GROUP}},
            "schedulingPolicy": _gang_policy(spec),
        },
    }


def native_podgroup_ref(meta: Obj) -> Obj:
    """Enough of a native PodGroup to find and delete it (the gang attempt it served is over)."""
    return {"apiVersion": WORKLOAD_API_VERSION, "kind": "PodGroup", "metadata": meta}


def build_podgroup(meta: Obj, spec: RLJobSpec) -> Obj | None:
    """The PodGroup of Volcano or scheduler-plugins, when `scheduling.podGroup` asks for one."""
    s = spec.run_policy.scheduling
    if s.pod_group == "none":
        return None
    group_spec: Obj = {"minMember": total_pods(spec)}
    if s.pod_group == "volcano":
        if s.queue_name:
            group_spec["queue"] = s.queue_name
        if s.priority_class_name:
            group_spec["priorityClassName"] = s.priority_class_name
        api_version = VOLCANO_API_VERSION
    else:
        group_spec["scheduleTimeoutSeconds"] = 600
        api_version = COSCHEDULING_API_VERSION
    return {"apiVersion": api_version, "kind": "PodGroup", "metadata": meta, "spec": group_spec}
