{{/* Chart name, overridable. */}}
{{- define "emlisten.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name; leaves room for the "-headless"/"-worker" suffixes (63 chars). */}}
{{- define "emlisten.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "emlisten.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "emlisten.selectorLabels" -}}
app.kubernetes.io/name: {{ include "emlisten.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "emlisten.labels" -}}
helm.sh/chart: {{ include "emlisten.chart" . }}
{{ include "emlisten.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "emlisten.workerName" -}}
{{- printf "%s-worker" (include "emlisten.fullname" .) }}
{{- end }}

{{- define "emlisten.headlessName" -}}
{{- printf "%s-headless" (include "emlisten.fullname" .) }}
{{- end }}

{{- define "emlisten.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "emlisten.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "emlisten.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Secondaries; the vendor's key WorkerReplicaCount wins when given (0 included). */}}
{{- define "emlisten.workerReplicas" -}}
{{- if and (hasKey .Values "WorkerReplicaCount") (not (kindIs "invalid" .Values.WorkerReplicaCount)) }}
{{- int .Values.WorkerReplicaCount }}
{{- else }}
{{- int .Values.workerReplicaCount }}
{{- end }}
{{- end }}

{{/* Python logging level from our names or the vendor's .NET ones. */}}
{{- define "emlisten.logLevel" -}}
{{- $map := dict "trace" "DEBUG" "debug" "DEBUG" "information" "INFO" "info" "INFO" "warning" "WARNING" "warn" "WARNING" "error" "ERROR" "critical" "CRITICAL" }}
{{- $level := lower (toString .Values.logLevel) }}
{{- get $map $level | default (upper $level) }}
{{- end }}

{{/* Percent-escaping for URL user info and path parts (urlquery turns spaces into "+"). */}}
{{- define "emlisten.urlEscape" -}}
{{- . | toString | urlquery | replace "+" "%20" }}
{{- end }}

{{- define "emlisten.redisConfigured" -}}
{{- if or .Values.redis.url .Values.redis.host }}true{{ end }}
{{- end }}

{{- define "emlisten.rabbitmqConfigured" -}}
{{- if or .Values.rabbitmq.url .Values.rabbitmq.host }}true{{ end }}
{{- end }}

{{- define "emlisten.redisUrl" -}}
{{- $r := .Values.redis }}
{{- if $r.url }}
{{- $r.url }}
{{- else if $r.host }}
{{- $scheme := ternary "rediss" "redis" (eq (toString $r.tls) "true") }}
{{- $auth := "" }}
{{- if $r.password }}
{{- $auth = printf ":%s@" (include "emlisten.urlEscape" $r.password) }}
{{- end }}
{{- $hostPort := $r.host }}
{{- if not (contains ":" $r.host) }}
{{- $hostPort = printf "%s:%v" $r.host $r.port }}
{{- end }}
{{- printf "%s://%s%s/%d" $scheme $auth $hostPort (int $r.database) }}
{{- end }}
{{- end }}

{{- define "emlisten.amqpUrl" -}}
{{- $q := .Values.rabbitmq }}
{{- if $q.url }}
{{- $q.url }}
{{- else if $q.host }}
{{- $scheme := ternary "amqps" "amqp" (eq (toString $q.tls) "true") }}
{{- $auth := "" }}
{{- if $q.login }}
{{- $auth = printf "%s@" (include "emlisten.urlEscape" $q.login) }}
{{- if $q.password }}
{{- $auth = printf "%s:%s@" (include "emlisten.urlEscape" $q.login) (include "emlisten.urlEscape" $q.password) }}
{{- end }}
{{- end }}
{{- printf "%s://%s%s:%v/%s" $scheme $auth $q.host $q.port (include "emlisten.urlEscape" $q.vhost) }}
{{- end }}
{{- end }}

{{- define "emlisten.secretName" -}}
{{- default (include "emlisten.fullname" .) .Values.existingSecret }}
{{- end }}

{{/* Whether the chart renders its own Secret (something to put in it, no existingSecret). */}}
{{- define "emlisten.createSecret" -}}
{{- if and (not .Values.existingSecret) (or (include "emlisten.redisConfigured" .) (include "emlisten.rabbitmqConfigured" .) .Values.secretKey .Values.apiToken (not .Values.allowUnauthenticated)) }}true{{ end }}
{{- end }}

{{/* The API token: the value given, else the one already in the chart's Secret (kept across
upgrades), else a new random one; empty with allowUnauthenticated and no value. */}}
{{- define "emlisten.apiToken" -}}
{{- if .Values.apiToken }}
{{- .Values.apiToken }}
{{- else if not .Values.allowUnauthenticated }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "emlisten.fullname" .) }}
{{- $data := (get (default dict $existing) "data") | default dict }}
{{- if hasKey $data "EMLISTEN_API_TOKEN" }}
{{- index $data "EMLISTEN_API_TOKEN" | b64dec }}
{{- else }}
{{- randAlphaNum 40 }}
{{- end }}
{{- end }}
{{- end }}

{{/* Whether the primary keeps its state on a volume (single-node mode with persistence). */}}
{{- define "emlisten.persistent" -}}
{{- if and .Values.persistence.enabled (not (include "emlisten.redisConfigured" .)) }}true{{ end }}
{{- end }}

{{/* Refuse values that would start pods which cannot work together. */}}
{{- define "emlisten.validate" -}}
{{- if not .Values.existingSecret }}
{{- $workers := int (include "emlisten.workerReplicas" .) }}
{{- $shared := or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled }}
{{- if and (or $shared (gt $workers 0)) (not (include "emlisten.redisConfigured" .)) }}
{{- fail "more than one emlisten pod needs the shared store: set redis.host (or redis.url) or existingSecret" }}
{{- end }}
{{- if and (gt $workers 0) (not (include "emlisten.rabbitmqConfigured" .)) }}
{{- fail "workerReplicaCount > 0 needs the work queue: set rabbitmq.host (or rabbitmq.url) or existingSecret" }}
{{- end }}
{{- if and (include "emlisten.redisConfigured" .) (not .Values.secretKey) }}
{{- fail "with Redis, mail credentials are encrypted at rest: set secretKey (or existingSecret)" }}
{{- end }}
{{- if and (include "emlisten.persistent" .) (not .Values.secretKey) }}
{{- fail "with persistence, mail credentials are encrypted on the volume: set secretKey (or existingSecret)" }}
{{- end }}
{{- end }}
{{- if and .Values.persistence.enabled (include "emlisten.redisConfigured" .) }}
{{- fail "persistence is for the single-node mode: with Redis the state lives there (set persistence.enabled=false)" }}
{{- end }}
{{- end }}

{{/* Pod spec shared by primaries and secondaries. Call with (dict "root" $ "role" "primary"). */}}
{{- define "emlisten.podTemplate" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- $secret := include "emlisten.secretName" $root }}
{{- $keys := $values.existingSecretKeys }}
metadata:
  labels:
    {{- include "emlisten.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
    {{- with $values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $annotations := deepCopy $values.podAnnotations }}
  {{- if include "emlisten.createSecret" $root }}
  {{- /* Roll the pods when the chart's Secret changes. */}}
  {{- $_ := set $annotations "checksum/secret" (include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum) }}
  {{- end }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "emlisten.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ add (int $values.shutdownGraceSeconds) 20 }}
  containers:
    - name: emlisten
      image: {{ include "emlisten.image" $root | quote }}
      imagePullPolicy: {{ $values.image.pullPolicy }}
      securityContext:
        {{- toYaml $values.securityContext | nindent 8 }}
      ports:
        - name: http
          containerPort: 8080
          protocol: TCP
      env:
        - name: EMLISTEN_ROLE
          value: {{ .role | quote }}
        # The pod name is the node id (stable for the primaries' StatefulSet).
        - name: EMLISTEN_NODE_ID
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        # All interfaces: the NetworkPolicy (networkPolicy.*) decides who reaches the port.
        - name: EMLISTEN_HOST
          value: "0.0.0.0"
        {{- if $values.allowUnauthenticated }}
        - name: EMLISTEN_ALLOW_UNAUTHENTICATED
          value: "true"
        {{- end }}
        - name: EMLISTEN_PORT
          value: "8080"
        - name: EMLISTEN_LOG_LEVEL
          value: {{ include "emlisten.logLevel" $root | quote }}
        - name: EMLISTEN_LOG_FORMAT
          value: {{ $values.logFormat | quote }}
        - name: EMLISTEN_SHUTDOWN_GRACE_SECONDS
          value: {{ $values.shutdownGraceSeconds | quote }}
        {{- if not (kindIs "invalid" $values.maxBpmonlineDownTime) }}
        - name: EMLISTEN_MAX_BPMONLINE_DOWN_TIME_MINUTES
          value: {{ $values.maxBpmonlineDownTime | quote }}
        {{- end }}
        {{- $secretEnv := list (list "EMLISTEN_REDIS_URL" $keys.redisUrl) (list "EMLISTEN_AMQP_URL" $keys.amqpUrl) (list "EMLISTEN_SECRET_KEY" $keys.secretKey) (list "EMLISTEN_API_TOKEN" $keys.apiToken) }}
        {{- if $values.existingSecret }}
        {{- range $secretEnv }}
        - name: {{ index . 0 }}
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ index . 1 }}
              optional: true
        {{- end }}
        {{- else if include "emlisten.createSecret" $root }}
        {{- /* Only the keys the chart's Secret holds. */}}
        {{- $held := dict "EMLISTEN_REDIS_URL" (include "emlisten.redisConfigured" $root) "EMLISTEN_AMQP_URL" (include "emlisten.rabbitmqConfigured" $root) "EMLISTEN_SECRET_KEY" $values.secretKey "EMLISTEN_API_TOKEN" (or $values.apiToken (not $values.allowUnauthenticated)) }}
        {{- range $secretEnv }}
        {{- if get $held (index . 0) }}
        - name: {{ index . 0 }}
          valueFrom:
            secretKeyRef:
              name: {{ $secret }}
              key: {{ index . 0 }}
              optional: true
        {{- end }}
        {{- end }}
        {{- end }}
        {{- if and (eq .role "primary") (include "emlisten.persistent" $root) }}
        # Mailboxes, checkpoints and statuses survive restarts on the volume (single-node mode).
        - name: EMLISTEN_DATA_DIR
          value: /data
        {{- end }}
        {{- range $name, $value := $values.env }}
        - name: {{ $name }}
          value: {{ $value | toString | quote }}
        {{- end }}
        {{- with $values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $values.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      livenessProbe:
        httpGet:
          path: {{ $values.probes.liveness.path }}
          port: http
        initialDelaySeconds: {{ $values.probes.liveness.initialDelaySeconds }}
        periodSeconds: {{ $values.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ $values.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ $values.probes.liveness.failureThreshold }}
      readinessProbe:
        httpGet:
          path: {{ $values.probes.readiness.path }}
          port: http
        initialDelaySeconds: {{ $values.probes.readiness.initialDelaySeconds }}
        periodSeconds: {{ $values.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ $values.probes.readiness.timeoutSeconds }}
        failureThreshold: {{ $values.probes.readiness.failureThreshold }}
      resources:
        {{- toYaml .resources | nindent 8 }}
      volumeMounts:
        # Writable scratch space on a read-only root filesystem.
        - name: tmp
          mountPath: /tmp
        {{- if and (eq .role "primary") (include "emlisten.persistent" $root) }}
        - name: data
          mountPath: /data
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {}
  {{- with $values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
