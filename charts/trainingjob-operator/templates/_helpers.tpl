{{/*
Standard helpers (the names `helm create` generates).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "trainingjob-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, else
"<release>-<name>", or the release name when it already contains the name.
*/}}
{{- define "trainingjob-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "name-version" for the helm.sh/chart label. */}}
{{- define "trainingjob-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object of the release. */}}
{{- define "trainingjob-operator.labels" -}}
helm.sh/chart: {{ include "trainingjob-operator.chart" . }}
{{ include "trainingjob-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: trainingjob-operator
{{- end }}

{{/* Selector labels (immutable in a Deployment: never add to them). */}}
{{- define "trainingjob-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trainingjob-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "trainingjob-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trainingjob-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: repository@digest when a digest is set, else repository:tag. */}}
{{- define "trainingjob-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The RBAC rules of the operator in the watched namespace(s): exactly the API
calls it makes (tests/integration/test_rbac.py checks the recorded requests
against these rules, both ways). Shared by the ClusterRole (cluster-wide mode)
and by each namespace's Role (namespaces mode).
*/}}
{{- define "trainingjob-operator.namespacedRules" -}}
# TrainingJobs: Kopf lists and watches them (its cache and the wake-ups);
# every reconcile GETs the job fresh. The operator never writes the spec or
# metadata (no finalizers, no annotations: no update/patch).
- apiGroups: ["trainingjob.dev"]
  resources: ["trainingjobs"]
  verbs: ["get", "list", "watch"]
# TrainingJob status: phase, attempt, restarts, snapshot, conditions
# (one JSON merge patch per change).
- apiGroups: ["trainingjob.dev"]
  resources: ["trainingjobs/status"]
  verbs: ["patch"]
# TrainingJob finalizers: never written, but every pod and Service carries an
# ownerReference with blockOwnerDeletion: true, and where the
# OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift) that
# needs update on the owner's finalizers, or every create is a 403 (as
# JobSet and the training-operator grant).
- apiGroups: ["trainingjob.dev"]
  resources: ["trainingjobs/finalizers"]
  verbs: ["update"]
# Pods: each attempt's gang is created here; fencing and cleanup delete
# them; Kopf lists and watches the operator's pods (label selector) to see
# phases, exit codes and DisruptionTarget conditions. No get: state comes
# from the watch cache.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["create", "delete", "list", "watch"]
# Services: the headless Service per attempt that gives rank 0 a stable DNS
# name for the c10d rendezvous; created and deleted with the gang, watched
# like the pods.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "delete", "list", "watch"]
# Secrets: read the job's snapshot.credentialsSecret (named in the job's own
# spec) to list its S3 snapshots. get only: never list or watch Secrets.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Events: every decision (GangCreated, Preempted, WorkerFailed, ...) is
# recorded as an Event on the TrainingJob; Kopf posts its own warnings too.
# patch: a repeated Event (a quota refusal retried) is aggregated, count and
# lastTimestamp of the one Event move, as client-go's recorder does.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
