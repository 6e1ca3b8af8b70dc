{{- define "modgate.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "modgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "modgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: {{ include "modgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* selector labels for one component: (dict "ctx" . "component" "worker") */}}
{{- define "modgate.selector" -}}
app.kubernetes.io/name: {{ include "modgate.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "modgate.secretName" -}}
{{- .Values.existingSecret | default (printf "%s-env" (include "modgate.fullname" .)) -}}
{{- end -}}

{{- define "modgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "modgate.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{- define "modgate.image" -}}
{{- $img := index .ctx.Values.image .which -}}
{{- printf "%s:%s" $img.repository ($img.tag | default .ctx.Chart.AppVersion) -}}
{{- end -}}

{{/* Settings come from the ConfigMap file; secrets from the Secret's env. */}}
{{- define "modgate.env" -}}
- name: MODGATE_CONFIG
  value: /etc/modgate/modgate.yaml
{{- if .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- end }}
{{- end -}}

{{- define "modgate.envFrom" -}}
- secretRef:
    name: {{ include "modgate.secretName" . }}
{{- end -}}

{{- define "modgate.podSpecCommon" -}}
serviceAccountName: {{ include "modgate.serviceAccountName" . }}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "modgate.configVolume" -}}
- name: config
  configMap:
    name: {{ include "modgate.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "modgate.configMounts" -}}
- name: config
  mountPath: /etc/modgate
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Indexes of the split worker pod's ingest containers (JSON list; empty unless
inference.enabled): (dict "ctx" . "component" "worker") */}}
{{- define "modgate.ingestIndexes" -}}
{{- if and (eq .component "worker") .ctx.Values.inference.enabled -}}
{{- until (int .ctx.Values.inference.ingestProcesses) | toJson -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}
