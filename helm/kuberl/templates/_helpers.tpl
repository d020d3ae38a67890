{{/* Names, labels and the derived values every template shares. */}}

{{- define "kuberl.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kuberl.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kuberl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kuberl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kuberl.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "kuberl.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kuberl
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kuberl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kuberl.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kuberl.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kuberl.runtimeImage" -}}
{{- printf "%s:%s" .Values.runtimeImage.repository (default .Chart.AppVersion .Values.runtimeImage.tag) -}}
{{- end -}}

{{/* kopf peering: on when more than one replica runs; the peering object is named after the release. */}}
{{- define "kuberl.peering" -}}
{{- if gt (int .Values.replicas) 1 -}}{{ include "kuberl.fullname" . }}{{- end -}}
{{- end -}}

{{/*
The rules the operator needs in every namespace it watches (ClusterRole when cluster-wide, one Role
per namespace otherwise). docs/install.md explains each; tests/integration/test_helm_install.py runs
the operator with exactly these.
*/}}
{{- define "kuberl.namespacedRules" -}}
# RLJobs: watched (kopf), read fresh each pass, deleted after ttlSecondsAfterFinished.
- apiGroups: [kuberl.io]
  resources: [rljobs]
  verbs: [get, list, watch, delete]
# The status is written once per pass with a replace (optimistic concurrency on resourceVersion).
- apiGroups: [kuberl.io]
  resources: [rljobs/status]
  verbs: [update]
# Children carry owner references with blockOwnerDeletion; where the OwnerReferencesPermissionEnforcement
# admission plugin runs (OpenShift), setting one needs update on the owner's finalizers.
- apiGroups: [kuberl.io]
  resources: [rljobs/finalizers]
  verbs: [update]
# One pod per role replica: watched by label, created, deleted on gang restarts, adopted (patch)
# when orphaned by `kubectl delete rlj --cascade=orphan` and the job re-created.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, create, delete, patch]
# The rendered runtime config: created, read, kept current; watched so a deleted one is recreated.
# delete: never called, but OwnerReferencesPermissionEnforcement (OpenShift) lets only a client that
# may delete an object change its owner references, which adopting an orphaned one does.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch, delete]
# The headless Service that gives the gang stable DNS names; watched so a deleted one is recreated;
# read and adopted (patch) when it exists already (delete: as for ConfigMaps).
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, delete]
# Warning/Normal Events on every transition.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Gang scheduling objects: Kubernetes Workload/PodGroup, Volcano and scheduler-plugins PodGroups
# (patch: adopted when orphaned).
- apiGroups: [scheduling.k8s.io, scheduling.volcano.sh, scheduling.x-k8s.io]
  resources: [workloads, podgroups]
  verbs: [get, create, delete, patch]
{{- if and (include "kuberl.peering" .) .Values.watchNamespaces }}
# kopf peering (replicas > 1, namespaced mode): keep-alives in each namespace's KopfPeering.
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end -}}
