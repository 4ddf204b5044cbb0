{{/*
The release's full name: the release name (when it holds the chart's name) or release-chart, at most 63
characters (a DNS label), or fullnameOverride. Every object's name is built from it, so two releases of the
chart coexist in one namespace.
*/}}
{{- define "tessera.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A child object's name: (list . "suffix") gives fullname-suffix, the full name shortened so the whole
stays within 63 characters. */}}
{{- define "tessera.child" -}}
{{- $suffix := index . 1 -}}
{{- $base := include "tessera.fullname" (index . 0) | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base $suffix -}}
{{- end -}}

{{- define "tessera.labels" -}}
app.kubernetes.io/name: tessera
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{- define "tessera.operatorSelector" -}}
app.kubernetes.io/name: tessera-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tessera.operatorImage" -}}
{{ .Values.operator.image.repository }}:{{ .Values.operator.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "tessera.workerImage" -}}
{{ .Values.worker.image.repository }}:{{ .Values.worker.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "tessera.operatorName" -}}
{{ include "tessera.child" (list . "operator") }}
{{- end -}}

{{- define "tessera.workerAccount" -}}
{{ include "tessera.child" (list . "worker") }}
{{- end -}}

{{- define "tessera.leaseName" -}}
{{ include "tessera.child" (list . "operator-leader") }}
{{- end -}}

{{- define "tessera.queueService" -}}
{{ include "tessera.child" (list . "queue") }}
{{- end -}}
