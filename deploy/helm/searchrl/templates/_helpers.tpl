{{/* Chart name, truncated to 63 characters (DNS label). */}}
{{- define "searchrl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "searchrl.fullname" -}}
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

{{- define "searchrl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "searchrl.labels" -}}
helm.sh/chart: {{ include "searchrl.chart" . }}
app.kubernetes.io/name: {{ include "searchrl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: searchrl
{{- end }}

{{/* Selector labels of one component; call with (dict "root" $ "component" "retriever"). */}}
{{- define "searchrl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "searchrl.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "searchrl.componentLabels" -}}
{{ include "searchrl.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Name of a component's objects, e.g. searchrl-retriever. */}}
{{- define "searchrl.componentName" -}}
{{- printf "%s-%s" (include "searchrl.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The gRPC services this chart can deploy, in a fixed order. */}}
{{- define "searchrl.services" -}}
reward retriever simulator policy
{{- end }}

{{/* Image reference of a component: <registry>/<repository>:<tag>[-gpu]; call with (dict "root" $ "values" $v). */}}
{{- define "searchrl.image" -}}
{{- $g := .root.Values.global -}}
{{- $tag := .values.image.tag | default $g.imageTag | default .root.Chart.AppVersion -}}
{{- if and .values.gpu.enabled (not .values.image.tag) }}{{ $tag = printf "%s-gpu" $tag }}{{ end -}}
{{- if $g.imageRegistry -}}
{{- printf "%s/%s:%s" $g.imageRegistry .values.image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .values.image.repository $tag -}}
{{- end -}}
{{- end }}

{{/* In-cluster gRPC target of a component for clients that balance per call: dns:///<svc>.<ns>.svc.<domain>:<port>. */}}
{{- define "searchrl.target" -}}
{{- $v := index .root.Values .component -}}
{{- printf "dns:///%s.%s.svc.%s:%v" (include "searchrl.componentName" .) .root.Release.Namespace .root.Values.global.clusterDomain $v.service.grpcPort -}}
{{- end }}

{{/* Redis host/port/secret, from the bundled subchart or redis.external. */}}
{{- define "searchrl.redis.host" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s-redis.%s.svc.%s" .Release.Name .Release.Namespace .Values.global.clusterDomain -}}
{{- else -}}
{{- .Values.redis.external.host -}}
{{- end -}}
{{- end }}

{{- define "searchrl.redis.port" -}}
{{- if .Values.redis.enabled }}6379{{ else }}{{ .Values.redis.external.port }}{{ end -}}
{{- end }}

{{- define "searchrl.redis.secretName" -}}
{{- if .Values.redis.enabled -}}
{{- dig "auth" "existingSecret" "" .Values.redis | default (printf "%s-redis" .Release.Name) -}}
{{- else -}}
{{- .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end }}

{{- define "searchrl.redis.secretKey" -}}
{{- if .Values.redis.enabled -}}
{{- dig "auth" "existingSecretPasswordKey" "" .Values.redis | default "redis-password" -}}
{{- else -}}
{{- .Values.redis.external.existingSecretPasswordKey -}}
{{- end -}}
{{- end }}

{{- define "searchrl.redis.configured" -}}
{{- if or .Values.redis.enabled .Values.redis.external.host }}true{{ end -}}
{{- end }}

{{/*
Env vars for Redis: SEARCHRL_REDIS_URL without credentials and, when a Secret holds the password,
SEARCHRL_REDIS_PASSWORD from it (the services' redis_password setting; never part of the URL, so a password with
URL-reserved characters such as # % ? / works and the URL the services log carries no secret).
*/}}
{{- define "searchrl.redis.env" -}}
{{- if include "searchrl.redis.configured" . }}
{{- $scheme := ternary "rediss" "redis" (and (not .Values.redis.enabled) .Values.redis.external.tls) }}
{{- if include "searchrl.redis.secretName" . }}
- name: SEARCHRL_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "searchrl.redis.secretName" . }}
      key: {{ include "searchrl.redis.secretKey" . }}
{{- end }}
- name: SEARCHRL_REDIS_URL
  value: {{ printf "%s://%s:%s/%v" $scheme (include "searchrl.redis.host" .) (include "searchrl.redis.port" .) .Values.redis.db | quote }}
{{- end }}
{{- end }}

{{/* MLflow tracking URI: the bundled server or mlflow.external.trackingUri (empty when neither). */}}
{{- define "searchrl.mlflow.uri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s-mlflow.%s.svc.%s:5000" .Release.Name .Release.Namespace .Values.global.clusterDomain -}}
{{- else -}}
{{- .Values.mlflow.external.trackingUri -}}
{{- end -}}
{{- end }}

{{- define "searchrl.authSecretName" -}}
{{- .Values.global.auth.existingSecret | default (printf "%s-auth" (include "searchrl.fullname" .)) -}}
{{- end }}

{{- define "searchrl.trainer.serviceAccountName" -}}
{{- if .Values.trainer.serviceAccount.create -}}
{{- .Values.trainer.serviceAccount.name | default (printf "%s-trainer" (include "searchrl.fullname" .)) -}}
{{- else -}}
{{- .Values.trainer.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end }}

{{- define "searchrl.indexClaim" -}}
{{- .Values.retriever.index.persistence.existingClaim | default (printf "%s-index" (include "searchrl.fullname" .)) -}}
{{- end }}

{{- define "searchrl.checkpointClaim" -}}
{{- .Values.trainer.checkpoints.existingClaim | default (printf "%s-checkpoints" (include "searchrl.fullname" .)) -}}
{{- end }}

{{/* imagePullSecrets block. */}}
{{- define "searchrl.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ if kindIs "map" . }}{{ .name }}{{ else }}{{ . }}{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Names the embedding model can have without a download: the bundled all-MiniLM-L6-v2 (searchrl.assets). */}}
{{- define "searchrl.bundledEmbeddingModel" -}}
{{- if has (lower .) (list "all-minilm-l6-v2" "sentence-transformers/all-minilm-l6-v2") }}true{{ end -}}
{{- end }}

{{/*
Hash of the index build settings. The index-build Job writes into /index/<index.name>-<hash> and the retriever
serves from there, so a settings change builds a new directory beside the one in use and rolls the Deployment to it
(no directory is replaced under a running retriever).
*/}}
{{- define "searchrl.indexHash" -}}
{{- $v := .Values.retriever }}
{{- printf "%v|%v|%v|%v|%v" $v.index.name $v.indexBuild.corpus $v.indexBuild.indexType $v.embeddingModel $v.indexBuild.extraArgs | sha256sum | trunc 8 -}}
{{- end }}

{{/* Directory the retriever serves: /index/<name>-<hash> when the chart builds it, else /index/<name>. */}}
{{- define "searchrl.indexDir" -}}
{{- if .Values.retriever.indexBuild.enabled -}}
{{- printf "/index/%s-%s" .Values.retriever.index.name (include "searchrl.indexHash" .) -}}
{{- else -}}
{{- printf "/index/%s" .Values.retriever.index.name -}}
{{- end -}}
{{- end }}

{{/*
Client TLS/auth env of a pod that dials searchrl services (read by searchrl.client ChannelOptions.from_env): the CA
that signed the servers' certificates (ca.crt of the TLS Secret), the client certificate for mTLS (the pod's own
tls.crt/tls.key) and the bearer-token file. Paths are the mounts the chart's pods and the RayJobs use.
*/}}
{{- define "searchrl.clientEnv" -}}
{{- $g := .Values.global }}
- name: SEARCHRL_TLS
  value: {{ $g.tls.enabled | quote }}
{{- if $g.tls.enabled }}
- name: SEARCHRL_TLS_CA_FILE
  value: /etc/searchrl/tls/ca.crt
{{- if $g.tls.clientAuth }}
- name: SEARCHRL_TLS_CLIENT_CERT_FILE
  value: /etc/searchrl/tls/tls.crt
- name: SEARCHRL_TLS_CLIENT_KEY_FILE
  value: /etc/searchrl/tls/tls.key
{{- end }}
{{- end }}
{{- if $g.auth.enabled }}
- name: SEARCHRL_AUTH_TOKEN_FILE
  value: /etc/searchrl/auth/token
{{- end }}
{{- end }}

{{/* Largest replica count a component's Deployment can reach (replicaCount, HPA maxReplicas or KEDA maxReplicaCount). */}}
{{- define "searchrl.maxReplicas" -}}
{{- $v := . -}}
{{- if $v.keda.enabled -}}{{ $v.keda.maxReplicaCount }}
{{- else if $v.autoscaling.enabled -}}{{ $v.autoscaling.maxReplicas }}
{{- else -}}{{ $v.replicaCount }}
{{- end -}}
{{- end }}

{{/*
Refuses a claim that cannot work: ReadWriteMany on the cluster's default StorageClass (the EKS/GKE/AKS defaults are
block storage, ReadWriteOnce only: the claim stays Pending), and a ReadWriteOnce claim that several replicas mount
(pods on other nodes hit Multi-Attach errors). Call with (dict "what" "retriever.index.persistence" "p" $persistence
"replicas" N).
*/}}
{{- define "searchrl.checkClaim" -}}
{{- $p := .p -}}
{{- if and (has "ReadWriteMany" $p.accessModes) (not $p.storageClass) (not $p.existingClaim) -}}
{{- fail (printf "%s: accessModes ReadWriteMany needs storageClass set to a class that supports it (EFS efs-sc, Filestore standard-rwx, Azure Files azurefile-csi, an NFS provisioner); the cluster's default class is usually ReadWriteOnce only and the claim would stay Pending" .what) -}}
{{- end -}}
{{- if and (gt (int .replicas) 1) (not (has "ReadWriteMany" $p.accessModes)) (not (has "ReadOnlyMany" $p.accessModes)) (not $p.existingClaim) -}}
{{- fail (printf "%s: a %s claim cannot be shared by up to %v replicas (Multi-Attach errors on other nodes): use accessModes [ReadWriteMany] with an RWX storageClass, or cap the replicas (replicaCount / autoscaling.maxReplicas / keda.maxReplicaCount) at 1" .what (join "," $p.accessModes) .replicas) -}}
{{- end -}}
{{- end }}
