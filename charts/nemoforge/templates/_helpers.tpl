{{/* Names ------------------------------------------------------------------------------- */}}
{{- define "nemoforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nemoforge.fullname" -}}
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

{{/* <fullname>-<component>, kept within 63 characters. Call with (list . "mlflow"). */}}
{{- define "nemoforge.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "nemoforge.fullname" $root | trunc 50 | trimSuffix "-") (index . 1) }}
{{- end }}

{{- define "nemoforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "nemoforge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels. Call with (list . "component"). -------------------------------------------- */}}
{{- define "nemoforge.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "nemoforge.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "nemoforge.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "nemoforge.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: nemoforge
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Images ------------------------------------------------------------------------------ */}}
{{- define "nemoforge.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Pod and container security ----------------------------------------------------------- */}}
{{- define "nemoforge.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "nemoforge.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end }}

{{- define "nemoforge.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* MLflow ------------------------------------------------------------------------------ */}}
{{- define "nemoforge.mlflowName" -}}
{{- include "nemoforge.componentName" (list . "mlflow") }}
{{- end }}

{{/* The tracking URI the pipeline runs, the schedule Job and the serving fetcher use. */}}
{{- define "nemoforge.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc.cluster.local:%d" (include "nemoforge.mlflowName" .) .Release.Namespace (int .Values.mlflow.port) }}
{{- else }}
{{- required "mlflow.externalUri is required when mlflow.enabled is false" .Values.mlflow.externalUri }}
{{- end }}
{{- end }}

{{/* Host header patterns MLflow accepts (its security middleware answers 403 otherwise). */}}
{{- define "nemoforge.mlflowAllowedHosts" -}}
{{- $svc := include "nemoforge.mlflowName" . }}
{{- $ns := .Release.Namespace }}
{{- $hosts := list "localhost" "localhost:*" "127.0.0.1" "127.0.0.1:*" }}
{{- range $name := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) }}
{{- $hosts = append $hosts $name }}
{{- $hosts = append $hosts (printf "%s:*" $name) }}
{{- end }}
{{- if .Values.mlflow.ingress.enabled }}
{{- $hosts = concat $hosts .Values.mlflow.ingress.hosts }}
{{- end }}
{{- $hosts = concat $hosts .Values.mlflow.extraAllowedHosts }}
{{- join "," $hosts }}
{{- end }}

{{/* S3 ---------------------------------------------------------------------------------- */}}
{{- define "nemoforge.bucket" -}}
{{- required "storage.bucket is required: the S3 bucket for MLflow artifacts, the pipeline root and the artifact store (infra/ output artifacts_bucket)" .Values.storage.bucket }}
{{- end }}

{{/* Environment for boto3 clients: region, endpoint, and static keys only from a Secret. */}}
{{- define "nemoforge.s3Env" -}}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.storage.region | quote }}
{{- with .Values.storage.endpoint }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.credentialsSecret.name }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.storage.credentialsSecret.accessKeyKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.storage.credentialsSecret.secretKeyKey }}
{{- end }}
{{- end }}

{{/* Serving ----------------------------------------------------------------------------- */}}
{{- define "nemoforge.servingName" -}}
{{- include "nemoforge.componentName" (list . "serving") }}
{{- end }}

{{- define "nemoforge.servedModelName" -}}
{{- default .Values.serving.registeredModel .Values.serving.servedModelName }}
{{- end }}

{{/* Where the fetched champion lies inside the serving pod. */}}
{{- define "nemoforge.championDir" -}}
{{- if .Values.serving.modelSubPath }}
{{- printf "/mnt/champion/%s" (trimPrefix "/" .Values.serving.modelSubPath) }}
{{- else }}
{{- print "/mnt/champion" }}
{{- end }}
{{- end }}

{{/* Init container: download models:/<name>@<alias> through the MLflow server. */}}
{{- define "nemoforge.championFetcher" -}}
- name: fetch-champion
  image: {{ printf "%s:%s" .Values.mlflow.image.repository .Values.mlflow.image.tag }}
  imagePullPolicy: {{ .Values.mlflow.image.pullPolicy }}
  command:
    - mlflow
    - artifacts
    - download
    - --artifact-uri
    - {{ printf "models:/%s@%s" .Values.serving.registeredModel .Values.serving.alias | quote }}
    - --dst-path
    - /mnt/champion
  env:
    - name: MLFLOW_TRACKING_URI
      value: {{ include "nemoforge.trackingUri" . | quote }}
    - name: HOME
      value: /tmp
    {{- include "nemoforge.s3Env" . | nindent 4 }}
  securityContext:
    {{- include "nemoforge.containerSecurityContext" . | nindent 4 }}
  resources:
    requests: {cpu: 500m, memory: 1Gi}
    limits: {cpu: "2", memory: 4Gi}
  volumeMounts:
    - name: champion
      mountPath: /mnt/champion
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/* After the champion is downloaded, and before vLLM runs its Python files (trust_remote_code): the
     checkpoint's configuration_decilm.py / modeling_decilm.py must be byte-identical (sha256) to the ones
     the nemoforge image ships, else the pod does not start (issue 16; nemoforge.models.remote_code). */}}
{{- define "nemoforge.remoteCodeVerifier" -}}
- name: verify-remote-code
  image: {{ include "nemoforge.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [python, -m, nemoforge.models.remote_code, {{ include "nemoforge.championDir" . | quote }}]
  env:
    - name: HOME
      value: /tmp
  securityContext:
    {{- include "nemoforge.containerSecurityContext" . | nindent 4 }}
  resources:
    requests: {cpu: 100m, memory: 256Mi}
    limits: {cpu: "1", memory: 1Gi}
  volumeMounts:
    - name: champion
      mountPath: /mnt/champion
      readOnly: true
    - name: tmp
      mountPath: /tmp
{{- end }}

{{/* vLLM engine flags shared by both serving modes (underscores: KServe's HF server takes
     them as-is and vLLM accepts either spelling). */}}
{{- define "nemoforge.vllmEngineArgs" -}}
- --tensor_parallel_size={{ .Values.serving.gpuCount }}
- --max_model_len={{ .Values.serving.maxModelLen }}
- --dtype={{ .Values.serving.dtype }}
- --gpu_memory_utilization={{ .Values.serving.gpuMemoryUtilization }}
{{- if .Values.serving.trustRemoteCode }}
- --trust_remote_code
{{- end }}
{{- range .Values.serving.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* GPU resources: requests/limits from values plus nvidia.com/gpu = gpuCount. */}}
{{- define "nemoforge.gpuResources" -}}
{{- $gpu := dict "nvidia.com/gpu" (toString .Values.serving.gpuCount) }}
requests:
  {{- toYaml (merge (dict) $gpu .Values.serving.resources.requests) | nindent 2 }}
limits:
  {{- toYaml (merge (dict) $gpu .Values.serving.resources.limits) | nindent 2 }}
{{- end }}

{{/* MLFLOW_BACKEND_STORE_URI from the external DSN Secret, or composed for the in-chart
     PostgreSQL from its password Secret (the kubelet expands $(POSTGRES_PASSWORD)). */}}
{{- define "nemoforge.mlflowDbEnv" -}}
{{- if .Values.postgresql.enabled }}
- name: POSTGRES_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "postgresql.passwordSecret.name is required: an existing Secret with the database password" .Values.postgresql.passwordSecret.name }}
      key: {{ .Values.postgresql.passwordSecret.key }}
- name: MLFLOW_BACKEND_STORE_URI
  value: {{ printf "postgresql+psycopg2://%s:$(POSTGRES_PASSWORD)@%s:5432/%s" .Values.postgresql.username (include "nemoforge.componentName" (list . "postgresql")) .Values.postgresql.database | quote }}
{{- else }}
- name: MLFLOW_BACKEND_STORE_URI
  valueFrom:
    secretKeyRef:
      name: {{ .Values.mlflow.backendStoreSecret.name }}
      key: {{ .Values.mlflow.backendStoreSecret.key }}
{{- end }}
{{- end }}
