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

{{/* Settings come from the ConfigMap file; secrets from the Secret's env. With the
embedded Redis its URL (password inside) comes from the Redis Secret; an env entry wins
over envFrom, so that Redis is the one used. */}}
{{- define "modgate.env" -}}
- name: MODGATE_CONFIG
  value: /etc/modgate/modgate.yaml
{{- if .Values.redis.enabled }}
- name: MODGATE_REDIS__URL
  valueFrom:
    secretKeyRef:
      name: {{ include "modgate.redisSecretName" . }}
      key: redis-url
{{- end }}
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
{{- if and (eq .component "worker") (include "modgate.split" .ctx) -}}
{{- until (int .ctx.Values.inference.ingestProcesses) | toJson -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}

{{- define "modgate.redisName" -}}
{{- printf "%s-redis" (include "modgate.fullname" .) -}}
{{- end -}}

{{- define "modgate.redisSecretName" -}}
{{- include "modgate.redisName" . -}}
{{- end -}}

{{/* Host of the embedded Redis as pods of any namespace resolve it (KEDA's operator). */}}
{{- define "modgate.redisHost" -}}
{{- printf "%s.%s.svc" (include "modgate.redisName" .) .Release.Namespace -}}
{{- end -}}

{{- define "modgate.consoleSecretName" -}}
{{- .Values.console.existingSecret | default (printf "%s-console" (include "modgate.fullname" .)) -}}
{{- end -}}

{{/* A generated secret that survives upgrades: the value stored under `key` in the live
Secret `name` when there is one (helm install/upgrade), else a fresh one from `fresh`.
(dict "ctx" . "name" "..." "key" "..." "fresh" "...") */}}
{{- define "modgate.keep" -}}
{{- $live := lookup "v1" "Secret" .ctx.Release.Namespace .name -}}
{{- $data := dig "data" (dict) ($live | default (dict)) -}}
{{- if hasKey $data .key -}}
{{- index $data .key | b64dec -}}
{{- else -}}
{{- .fresh -}}
{{- end -}}
{{- end -}}

{{/* The worker runs without a GPU (worker.device=cpu): no GPU request, small resources,
no GPU node placement, no split shape. */}}
{{- define "modgate.workerOnCpu" -}}
{{- if eq (.Values.worker.device | default "gpu") "cpu" -}}true{{- end -}}
{{- end -}}

{{/* The split shape runs (inference.enabled on a GPU worker): "true" or "". */}}
{{- define "modgate.split" -}}
{{- if and .Values.worker.enabled .Values.inference.enabled (not (include "modgate.workerOnCpu" .)) -}}true{{- end -}}
{{- end -}}
