{{/* Names and labels. */}}
{{- define "segserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "segserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The labels every Ray pod carries: Services select on them. */}}
{{- define "segserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "segserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "segserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "segserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "segserve.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "segserve.fullname" .)) .Values.apiKey.existingSecret -}}
{{- end -}}

{{/* The device string of the GPU group's pools. */}}
{{- define "segserve.gpuDevice" -}}
{{- if eq .Values.gpu.vendor "intel" }}xpu{{ else }}cuda{{ end -}}
{{- end -}}

{{/*
segserve's ServiceConfig (the Serve application's `args`) from .Values.segserve: pools of
disabled groups are left out, `device: gpu` is resolved by vendor, tensor_parallel_size comes from
the group, chart-only keys (`fetch`) are removed and the API key is wired to the Secret's env var.
*/}}
{{- define "segserve.serviceArgs" -}}
{{- $gpuDevice := include "segserve.gpuDevice" . -}}
{{- $pools := list -}}
{{- $kept := list -}}
{{- range $i, $pool := .Values.segserve.pools -}}
  {{- $p := deepCopy $pool -}}
  {{- if eq $p.device "gpu" -}}{{- $_ := set $p "device" $gpuDevice -}}{{- end -}}
  {{- $group := ternary "cpu" "gpu" (eq $p.device "cpu") -}}
  {{- $g := index $.Values $group -}}
  {{- if $g.enabled -}}
    {{- if and (eq $group "gpu") (ne $p.device $gpuDevice) -}}
      {{- fail (printf "segserve.pools[%d] (%s): device %s does not match gpu.vendor %s (use device: gpu, or %s)" $i $p.name $p.device $.Values.gpu.vendor $gpuDevice) -}}
    {{- end -}}
    {{- if and (hasKey $p "tensor_parallel_size") (ne (int $p.tensor_parallel_size) (int $g.tensorParallelSize)) -}}
      {{- fail (printf "segserve.pools[%d] (%s): tensor_parallel_size %d differs from %s.tensorParallelSize %d (leave it out: the group's applies)" $i $p.name (int $p.tensor_parallel_size) $group (int $g.tensorParallelSize)) -}}
    {{- end -}}
    {{- $_ := set $p "tensor_parallel_size" (int $g.tensorParallelSize) -}}
    {{- $pools = append $pools $p -}}
    {{- $kept = append $kept $p.name -}}
  {{- end -}}
{{- end -}}
{{- if not $pools -}}
  {{- fail "no pool is left: every pool in segserve.pools belongs to a disabled worker group (gpu.enabled / cpu.enabled)" -}}
{{- end -}}
{{- $models := list -}}
{{- range $i, $model := .Values.segserve.models -}}
  {{- $m := omit $model "fetch" -}}
  {{- if and $model.fetch (not (hasKey $m "path")) -}}{{- $_ := set $m "path" $model.fetch -}}{{- end -}}
  {{- if $m.pools -}}
    {{- $wanted := list -}}
    {{- range $m.pools -}}{{- if has . $kept -}}{{- $wanted = append $wanted . -}}{{- end -}}{{- end -}}
    {{- if not $wanted -}}
      {{- fail (printf "segserve.models[%d] (%s): none of its pools %v is enabled" $i $m.name $m.pools) -}}
    {{- end -}}
    {{- $_ := set $m "pools" $wanted -}}
  {{- end -}}
  {{- $models = append $models $m -}}
{{- end -}}
{{- $ingress := deepCopy (default dict .Values.segserve.ingress) -}}
{{- if $ingress.api_key -}}
  {{- fail "segserve.ingress.api_key would put the key in the RayService in plain text: set apiKey.enabled (and apiKey.value or apiKey.existingSecret) instead" -}}
{{- end -}}
{{- if .Values.apiKey.enabled -}}
  {{- if and $ingress.api_key_env (ne $ingress.api_key_env .Values.apiKey.envVar) -}}
    {{- fail (printf "segserve.ingress.api_key_env (%s) must equal apiKey.envVar (%s), or be left out" $ingress.api_key_env .Values.apiKey.envVar) -}}
  {{- end -}}
  {{- $_ := set $ingress "api_key_env" .Values.apiKey.envVar -}}
{{- else if $ingress.api_key_env -}}
  {{- fail (printf "segserve.ingress.api_key_env (%s) needs apiKey.enabled=true: the chart puts the key from a Secret into that variable" $ingress.api_key_env) -}}
{{- end -}}
{{- toYaml (dict "models" $models "pools" $pools "ingress" $ingress) -}}
{{- end -}}

{{/* The whole Serve config file (serveConfigV2), as deploy/configs/*.yaml. */}}
{{- define "segserve.serveConfig" -}}
proxy_location: {{ .Values.serve.proxyLocation }}
http_options:
  host: 0.0.0.0
  port: {{ .Values.ports.http }}
grpc_options:
  port: {{ .Values.ports.grpc }}
  grpc_servicer_functions:
    - segserve.proto.servicer.add_SegServeServicer_to_server
applications:
  - name: {{ .Values.serve.applicationName }}
    route_prefix: {{ .Values.serve.routePrefix }}
    import_path: segserve.deploy.app:build_app
    args:
{{ include "segserve.serviceArgs" . | indent 6 }}
{{- end -}}

{{/* Models with `fetch:` (an init step fetches them). */}}
{{- define "segserve.fetchNames" -}}
{{- $names := list -}}
{{- range .Values.segserve.models -}}{{- if .fetch -}}{{- $names = append $names .fetch -}}{{- end -}}{{- end -}}
{{- $names | uniq | join " " -}}
{{- end -}}

{{/* Env of every Ray container. */}}
{{- define "segserve.env" -}}
- name: HOME
  value: /tmp
- name: SEGSERVE_CACHE_DIR
  value: {{ .Values.cache.mountPath }}
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
# Nothing downloads at start: only the fetch init step reaches the package index.
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
# A replica failing its health checks is killed at once, not drained for its grace period
# (segserve.deploy.launch.EVERY_MODE_ENV): a hung one would hold its GPU that long.
- name: RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS
  value: "1"
# and a hung proxy is found in ~36 s, not ~60 s
- name: RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S
  value: "2"
# and the HTTP proxy answers a request whose ingress replica died with our 503 body, not a
# bare 500 (segserve/deploy/proxy_middleware.py)
- name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
  value: segserve.deploy.proxy_middleware.proxy_middlewares
# and a replica takes gRPC handle calls as large as the proxy takes (Serve's replica default: 4 MiB)
- name: RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH
  value: "2147483647"
# Serve's mode (segserve.deploy.launch.SERVE_MODES): read once by every Ray process at start.
# proxy: Serve's proxy on these ports, with its throughput settings (handles over gRPC, our code
# on each replica's main loop); direct ingress named off, as THROUGHPUT_OPTIMIZED turns it on.
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
{{- if eq .Values.serve.mode "haproxy" }}
- name: RAY_SERVE_ENABLE_DIRECT_INGRESS
  value: "1"
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
- name: RAY_SERVE_LOG_TO_STDERR
  value: "0"
- name: RAY_SERVE_PROXY_USE_GRPC
  value: "0"
{{- else }}
- name: RAY_SERVE_ENABLE_DIRECT_INGRESS
  value: "0"
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "0"
- name: RAY_SERVE_LOG_TO_STDERR
  value: "1"
# the proxy calls the ingress over gRPC too (the flag above does not set this): a proxy that
# dies then ends its streams' engine requests
- name: RAY_SERVE_PROXY_USE_GRPC
  value: "1"
{{- end }}
{{- if eq .Values.ray.authMode "disabled" }}
# Ray 2.60 turns token auth on for new clusters unless told otherwise.
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
{{- if .Values.apiKey.enabled }}
- name: {{ .Values.apiKey.envVar }}
  valueFrom:
    secretKeyRef:
      name: {{ include "segserve.apiKeySecretName" . }}
      key: {{ .Values.apiKey.secretKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "segserve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
- name: cache
  mountPath: {{ .Values.cache.mountPath }}
{{- if or .Values.modelStorage.existingClaim .Values.modelStorage.hostPath }}
- name: models
  mountPath: {{ .Values.modelStorage.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "segserve.volumes" -}}
- name: tmp
  emptyDir: {}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.sharedMemory.sizeLimit }}
- name: cache
{{- if .Values.cache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.cache.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
{{- end }}
{{- if .Values.modelStorage.existingClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.modelStorage.existingClaim }}
    readOnly: true
{{- else if .Values.modelStorage.hostPath }}
- name: models
  hostPath:
    path: {{ .Values.modelStorage.hostPath }}
    {{- with .Values.modelStorage.hostPathType }}
    type: {{ . }}
    {{- end }}
{{- end }}
{{- end -}}

{{/* The fetch init step, when a model asks for it. Arguments: the root context and the image. */}}
{{- define "segserve.initContainers" -}}
{{- $ctx := index . 0 -}}
{{- $names := include "segserve.fetchNames" $ctx -}}
{{- if $names -}}
initContainers:
  - name: fetch-models
    image: {{ index . 1 }}
    imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
    command: ["/bin/sh", "-c"]
    args:
      - {{ printf "for m in %s; do segserve fetch \"$m\" || exit 1; done" $names | quote }}
    env:
      - name: HOME
        value: /tmp
      - name: SEGSERVE_CACHE_DIR
        value: {{ $ctx.Values.cache.mountPath }}
    resources:
      {{- toYaml $ctx.Values.fetch.resources | nindent 6 }}
    securityContext:
      {{- toYaml $ctx.Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: tmp
        mountPath: /tmp
      - name: cache
        mountPath: {{ $ctx.Values.cache.mountPath }}
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by the head and the workers. Arguments: root context, group values. */}}
{{/*
How long Kubernetes waits after SIGTERM before it kills a pod: the longest drain a replica may
take (the pools' graceful_shutdown_timeout_s; 600, ServiceConfig's default, where unset; the
ingress drains as long as its longest pool) plus 30 s for Serve to stop the replicas and Ray to
exit (`segserve serve` allows the same).
*/}}
{{- define "segserve.terminationGracePeriodSeconds" -}}
{{- $grace := 0.0 -}}
{{- range .Values.segserve.pools -}}
  {{- $grace = maxf $grace (ternary .graceful_shutdown_timeout_s 600 (hasKey . "graceful_shutdown_timeout_s")) -}}
{{- end -}}
{{- int (ceil (addf $grace 30)) -}}
{{- end -}}

{{- define "segserve.podSpecCommon" -}}
{{- $ctx := index . 0 -}}
{{- $g := index . 1 -}}
terminationGracePeriodSeconds: {{ include "segserve.terminationGracePeriodSeconds" $ctx }}
securityContext:
  {{- toYaml $ctx.Values.podSecurityContext | nindent 2 }}
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- include "segserve.volumes" $ctx | nindent 2 }}
{{- end -}}

{{- define "segserve.containerPorts" -}}
# KubeRay's worker readiness probe looks for the port named "serve".
- name: serve
  containerPort: {{ .Values.ports.http }}
- name: grpc
  containerPort: {{ .Values.ports.grpc }}
- name: metrics
  containerPort: {{ .Values.ports.metrics }}
{{- end -}}

{{/* String map of rayStartParams, chart defaults first, the user's on top. */}}
{{- define "segserve.rayStartParams" -}}
{{- $out := dict -}}
{{- range $k, $v := . -}}{{- $_ := set $out $k (toString $v) -}}{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* Requests and limits must both be set on every container. Arguments: resources, where. */}}
{{- define "segserve.checkResources" -}}
{{- $r := index . 0 -}}
{{- if not (and $r.requests $r.limits) -}}
{{- fail (printf "%s.resources needs both requests and limits" (index . 1)) -}}
{{- end -}}
{{- end -}}

{{/* A worker group's replica bounds. Arguments: group values, its name. */}}
{{- define "segserve.checkReplicas" -}}
{{- $g := index . 0 -}}
{{- $name := index . 1 -}}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) -}}
{{- fail (printf "%s.minReplicas (%d) must be <= %s.maxReplicas (%d)" $name (int $g.minReplicas) $name (int $g.maxReplicas)) -}}
{{- end -}}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) -}}
{{- fail (printf "%s.replicas (%d) must lie in [minReplicas, maxReplicas] = [%d, %d]" $name (int $g.replicas) (int $g.minReplicas) (int $g.maxReplicas)) -}}
{{- end -}}
{{- end -}}
