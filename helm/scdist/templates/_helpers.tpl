{{/* Names ---------------------------------------------------------------------------- */}}

{{- define "scdist.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kept to 40 characters: the longest derived name (e.g. "<fullname>-dask-scheduler",
     KubeRay's "<fullname>-ray-head-svc") must stay a valid 63-character DNS label. */}}
{{- define "scdist.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "scdist.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "scdist.selectorLabels" -}}
app.kubernetes.io/name: {{ include "scdist.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "scdist.labels" -}}
helm.sh/chart: {{ include "scdist.chart" . }}
{{ include "scdist.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "scdist.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "scdist.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "scdist.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "scdist.gpuImage" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cuda" (default .Chart.AppVersion .Values.image.tag)) .Values.image.gpuTag) }}
{{- end }}

{{- define "scdist.claimName" -}}
{{- default (printf "%s-store" (include "scdist.fullname" .)) .Values.storage.pvc.existingClaim }}
{{- end }}

{{- define "scdist.daskSchedulerService" -}}
{{- printf "%s-dask-scheduler" (include "scdist.fullname" .) }}
{{- end }}

{{- define "scdist.rayClusterName" -}}
{{- printf "%s-ray" (include "scdist.fullname" .) }}
{{- end }}

{{/* Cluster addresses the run connects to (scdist reads SCDIST_DASK_ADDRESS / SCDIST_RAY_ADDRESS). */}}
{{- define "scdist.daskAddress" -}}
{{- if .Values.dask.enabled }}
{{- printf "tcp://%s:%d" (include "scdist.daskSchedulerService" .) (int .Values.dask.scheduler.port) }}
{{- end }}
{{- end }}

{{/* KubeRay names the head Service "<raycluster>-head-svc"; 10001 is the Ray Client port. */}}
{{- define "scdist.rayAddress" -}}
{{- if .Values.ray.enabled }}
{{- printf "ray://%s-head-svc:10001" (include "scdist.rayClusterName" .) }}
{{- end }}
{{- end }}

{{/* The pipeline spec text and its parsed form ----------------------------------------- */}}

{{- define "scdist.specText" -}}
{{- .Values.pipeline.specYaml | trim }}
{{- end }}

{{/* Checks that need more than one value (values.schema.json checks each value alone).
     Each message names the value and the fix. */}}
{{- define "scdist.validate" -}}
{{- $spec := include "scdist.specText" . | fromYaml }}
{{- if hasKey $spec "Error" }}
{{- fail (printf "[pipeline.specYaml] is not valid YAML: %s. Fix: check the file given with --set-file pipeline.specYaml=..." $spec.Error) }}
{{- end }}
{{- if not $spec.store }}
{{- fail "[pipeline.specYaml] the pipeline spec has no `store`. Fix: set store to a path on the volume (e.g. atlas.zarr) or an object-store URL" }}
{{- end }}
{{- if not $spec.stages }}
{{- fail "[pipeline.specYaml] the pipeline spec has no `stages`. Fix: add at least one stage (e.g. pseudobulk: {min_cells: 10})" }}
{{- end }}
{{- $store := toString $spec.store }}
{{- if eq .Values.storage.type "objectStore" }}
{{- if not (regexMatch "^[a-z][a-z0-9+.-]*://" $store) }}
{{- fail (printf "[pipeline.specYaml store] storage.type is objectStore but store %q is not a URL. Fix: use s3://bucket/path.zarr (or gs://, abfs://), or storage.type=pvc" $store) }}
{{- end }}
{{- else }}
{{- if regexMatch "^[a-z][a-z0-9+.-]*://" $store }}
{{- fail (printf "[storage.type] store %q is a URL but storage.type is pvc. Fix: set storage.type=objectStore and storage.objectStore.existingSecret" $store) }}
{{- end }}
{{- if and (hasPrefix "/" $store) (not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.storage.mountPath)) $store)) }}
{{- fail (printf "[pipeline.specYaml store] %q is outside the volume mounted at %s, so it would not persist. Fix: use a relative path or one under %s" $store .Values.storage.mountPath .Values.storage.mountPath) }}
{{- end }}
{{- end }}
{{- if and .Values.schedule.enabled (eq .Values.job.kind "RayJob") }}
{{- fail "[schedule.enabled] a KubeRay RayJob cannot be scheduled. Fix: use job.kind=Job with ray.enabled=true for scheduled runs" }}
{{- end }}
{{- if and .Values.schedule.enabled (eq .Values.job.kind "DaskJob") }}
{{- fail "[schedule.enabled] a DaskJob cannot be scheduled. Fix: use job.kind=Job (with dask.mode=operator or plain) for scheduled runs" }}
{{- end }}
{{- if and (eq .Values.job.kind "DaskJob") (not (and .Values.dask.enabled (eq .Values.dask.mode "operator"))) }}
{{- fail "[job.kind] a DaskJob needs the Dask operator. Fix: set dask.enabled=true and dask.mode=operator, or job.kind=Job" }}
{{- end }}
{{- $rayUsed := or .Values.ray.enabled (eq .Values.job.kind "RayJob") }}
{{- $rayWorkers := or .Values.ray.cpuWorkers.enabled .Values.ray.gpuWorkers.enabled }}
{{- if and $rayUsed (not $rayWorkers) (eq (toString .Values.ray.head.numCpus) "0") }}
{{- fail "[ray.cpuWorkers.enabled] the Ray cluster has no worker group and its head runs no tasks (ray.head.numCpus=0), so Ray stages would wait forever. Fix: enable ray.cpuWorkers or ray.gpuWorkers, or give the head CPUs" }}
{{- end }}
{{- if and (eq .Values.job.kind "RayJob") .Values.ray.enabled }}
{{- fail "[ray.enabled] job.kind=RayJob brings up its own Ray cluster. Fix: set ray.enabled=false (or job.kind=Job to use the long-lived RayCluster)" }}
{{- end }}
{{- end }}

{{/* Pod building blocks shared by every workload ---------------------------------------- */}}

{{- define "scdist.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "scdist.containerSecurityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/* Volumes every pod gets: the store volume (pvc), a writable /tmp (read-only root fs). */}}
{{- define "scdist.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSize }}
{{- if eq .Values.storage.type "pvc" }}
- name: store
  persistentVolumeClaim:
    claimName: {{ include "scdist.claimName" . }}
{{- end }}
{{- end }}

{{- define "scdist.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if eq .Values.storage.type "pvc" }}
- name: store
  mountPath: {{ .Values.storage.mountPath }}
{{- end }}
{{- end }}

{{/* Ray's object store lives in /dev/shm; the default 64 MiB of a container is far too small. */}}
{{- define "scdist.shmVolume" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.ray.shmSize }}
{{- end }}

{{- define "scdist.workingDir" -}}
{{- if eq .Values.storage.type "pvc" }}{{ .Values.storage.mountPath }}{{ else }}/tmp{{ end }}
{{- end }}

{{/* Environment every scdist container gets: a writable HOME, and object-store settings. */}}
{{- define "scdist.env" -}}
- name: HOME
  value: /tmp
{{- if eq .Values.storage.type "objectStore" }}
{{- range $k, $v := .Values.storage.objectStore.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end }}
{{- end }}

{{- define "scdist.envFrom" -}}
{{- if eq .Values.storage.type "objectStore" -}}
- secretRef:
    name: {{ .Values.storage.objectStore.existingSecret }}
{{- end }}
{{- end }}

{{/* The pod that runs `scdist run` (Job, CronJob, DaskJob). Arguments: root (the chart context),
     container (its name; the Dask operator wants "job"), daskAddress (default: the chart's
     Dask scheduler Service). */}}
{{- define "scdist.runnerPodSpec" -}}
{{- $ := .root }}
{{- $dask := default (include "scdist.daskAddress" $) .daskAddress -}}
serviceAccountName: {{ include "scdist.serviceAccountName" $ }}
automountServiceAccountToken: false
restartPolicy: Never
{{- with $.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "scdist.podSecurityContext" $ | nindent 2 }}
{{- with $.Values.job.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $.Values.job.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $.Values.job.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: {{ default "scdist" .container }}
    image: {{ include "scdist.image" $ }}
    imagePullPolicy: {{ $.Values.image.pullPolicy }}
    args:
      - run
      - /etc/scdist/pipeline.yaml
      {{- range $.Values.pipeline.extraArgs }}
      - {{ . | quote }}
      {{- end }}
    workingDir: {{ include "scdist.workingDir" $ }}
    env:
      {{- include "scdist.env" $ | nindent 6 }}
      {{- if $dask }}
      - name: SCDIST_DASK_ADDRESS
        value: {{ $dask | quote }}
      {{- end }}
      {{- if $.Values.ray.enabled }}
      - name: SCDIST_RAY_ADDRESS
        value: {{ include "scdist.rayAddress" $ | quote }}
      {{- end }}
      {{- with $.Values.job.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with (include "scdist.envFrom" $) }}
    envFrom:
      {{- . | nindent 6 }}
    {{- end }}
    resources:
      {{- toYaml $.Values.job.resources | nindent 6 }}
    securityContext:
      {{- include "scdist.containerSecurityContext" $ | nindent 6 }}
    volumeMounts:
      {{- include "scdist.volumeMounts" $ | nindent 6 }}
      - name: pipeline
        mountPath: /etc/scdist
        readOnly: true
volumes:
  {{- include "scdist.volumes" $ | nindent 2 }}
  - name: pipeline
    configMap:
      name: {{ include "scdist.fullname" $ }}-pipeline
{{- end }}
