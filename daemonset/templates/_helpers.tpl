{{/* Names, labels and small decisions shared by every template. */}}

{{- define "spotguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, cut to 63 characters (DNS label limit). A release named like the chart
is not repeated ("spotguard", not "spotguard-spotguard").
*/}}
{{- define "spotguard.fullname" -}}
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

{{- define "spotguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spotguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spotguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "spotguard.labels" -}}
helm.sh/chart: {{ include "spotguard.chart" . }}
{{ include "spotguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: spotguard
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "spotguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "spotguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The user name the API server gives spotguard's ServiceAccount tokens. */}}
{{- define "spotguard.serviceAccountUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "spotguard.serviceAccountName" .) }}
{{- end }}

{{- define "spotguard.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* HOST:PORT the daemon listens on (SPOTGUARD_LISTEN). */}}
{{- define "spotguard.listen" -}}
{{- $port := printf ":%d" (int .Values.port) }}
{{- if and .Values.listen (not (hasSuffix $port .Values.listen)) }}
{{- fail (printf "listen %q must end in %s: the probes and the metrics port use `port`" .Values.listen $port) }}
{{- end }}
{{- /* $(POD_IP) is expanded by the kubelet from the env var of that name (downward API). */}}
{{- default (printf "$(POD_IP)%s" $port) .Values.listen }}
{{- end }}

{{/*
A Helm value as the daemon expects it in an environment variable. Numbers go through JSON so
0.5 stays "0.5" and 30 stays "30" (not "3e+01" or "30.000000").
*/}}
{{- define "spotguard.envValue" -}}
{{- if kindIs "string" . }}{{ . }}{{ else if kindIs "bool" . }}{{ ternary "true" "false" . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/*
Whether the ValidatingAdmissionPolicy is rendered: "auto" follows the API server's capabilities
(real installs ask the server; `helm template` needs --api-versions or enabled=true).
*/}}
{{- define "spotguard.vapEnabled" -}}
{{- $setting := .Values.validatingAdmissionPolicy.enabled }}
{{- if eq (toString $setting) "auto" }}
{{- if .Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy" }}true{{ end }}
{{- else if $setting }}true
{{- end }}
{{- end }}

{{/* Surge: on only with the admission policies that keep its pod-create permission to placeholders. */}}
{{- define "spotguard.surgeEnabled" -}}
{{- if and .Values.surge.enabled (include "spotguard.vapEnabled" .) }}true{{ end }}
{{- end }}

{{/* The surge placeholders' PriorityClass. */}}
{{- define "spotguard.placeholderPriorityClass" -}}
{{- default (printf "%s-placeholder" (include "spotguard.fullname" .)) .Values.surge.priorityClass.name }}
{{- end }}

{{/* Namespace of an optional monitoring object: its own setting, else the release's. */}}
{{- define "spotguard.monitoringNamespace" -}}
{{- default .root.Release.Namespace .namespace }}
{{- end }}

{{/*
Refuse to install where Pod Security would refuse the pods: with hostNetwork (and so a hostPort)
the DaemonSet needs the `privileged` level, and under `baseline` or `restricted` Helm would report
"deployed" while the DaemonSet runs no pod and no node is protected. The namespace is read with
`lookup` (a live install or upgrade; `helm template` cannot, and NOTES says what is needed).
*/}}
{{- define "spotguard.podSecurityCheck" -}}
{{- $namespace := lookup "v1" "Namespace" "" .Release.Namespace }}
{{- if and $namespace .Values.hostNetwork }}
{{- $labels := $namespace.metadata.labels | default dict }}
{{- $level := get $labels "pod-security.kubernetes.io/enforce" | default "privileged" }}
{{- if has $level (list "baseline" "restricted") }}
{{- fail (printf "namespace %s enforces Pod Security level %q, which refuses spotguard's pods (hostNetwork: true, a hostPort): the DaemonSet would run no pod and no node would be protected. Install into a dedicated, admin-only namespace labelled pod-security.kubernetes.io/enforce=privileged (not kube-system), or set hostNetwork=false where the pods reach the metadata server without it (README.md \"hostNetwork\")" .Release.Namespace $level) }}
{{- end }}
{{- end }}
{{- end }}
