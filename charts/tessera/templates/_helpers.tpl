{{- define "tessera.labels" -}}
app.kubernetes.io/name: tessera
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "tessera.operatorSelector" -}}
app.kubernetes.io/name: tessera-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tessera.operatorImage" -}}
{{ .Values.operator.image.repository }}:{{ .Values.operator.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "tessera.leaseName" -}}
{{ .Release.Name }}-operator-leader
{{- end -}}

{{- define "tessera.queueService" -}}
{{ .Release.Name }}-queue
{{- end -}}
