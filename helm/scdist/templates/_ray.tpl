{{/* The spec of a KubeRay RayCluster, shared by the long-lived RayCluster and the RayJob's
     ephemeral cluster. KubeRay writes the `ray start` command itself; ports are KubeRay's
     defaults (6379 GCS, 8265 dashboard / job API, 10001 Ray Client).
     Arguments: root (the chart context), pipeline (mount the pipeline ConfigMap on the head). */}}

{{- define "scdist.rayPod" -}}
{{- $ := .root -}}
serviceAccountName: {{ include "scdist.serviceAccountName" $ }}
automountServiceAccountToken: false
{{- with $.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "scdist.podSecurityContext" $ | nindent 2 }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .container }}
    image: {{ .image }}
    imagePullPolicy: {{ $.Values.image.pullPolicy }}
    workingDir: {{ include "scdist.workingDir" $ }}
    env:
      {{- include "scdist.env" $ | nindent 6 }}
      {{- with .extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with (include "scdist.envFrom" $) }}
    envFrom:
      {{- . | nindent 6 }}
    {{- end }}
    {{- with .ports }}
    ports:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    resources:
      {{- toYaml .resources | nindent 6 }}
    securityContext:
      {{- include "scdist.containerSecurityContext" $ | nindent 6 }}
    volumeMounts:
      {{- include "scdist.volumeMounts" $ | nindent 6 }}
      - name: dshm
        mountPath: /dev/shm
      {{- if .pipeline }}
      - name: pipeline
        mountPath: /etc/scdist
        readOnly: true
      {{- end }}
volumes:
  {{- include "scdist.volumes" $ | nindent 2 }}
  {{- include "scdist.shmVolume" $ | nindent 2 }}
  {{- if .pipeline }}
  - name: pipeline
    configMap:
      name: {{ include "scdist.fullname" $ }}-pipeline
  {{- end }}
{{- end }}

{{- define "scdist.rayClusterSpec" -}}
{{- $ := .root }}
{{- $v := $.Values.ray -}}
rayVersion: {{ $v.rayVersion | quote }}
headGroupSpec:
  rayStartParams:
    dashboard-host: "0.0.0.0"
    num-cpus: {{ $v.head.numCpus | quote }}
  template:
    metadata:
      labels:
        {{- include "scdist.selectorLabels" $ | nindent 8 }}
        app.kubernetes.io/component: ray-head
    spec:
      {{- $ports := list (dict "name" "gcs-server" "containerPort" 6379 "protocol" "TCP") (dict "name" "dashboard" "containerPort" 8265 "protocol" "TCP") (dict "name" "client" "containerPort" 10001 "protocol" "TCP") }}
      {{- $extraEnv := list }}
      {{- if $.Values.dask.enabled }}
      {{- $extraEnv = list (dict "name" "SCDIST_DASK_ADDRESS" "value" (include "scdist.daskAddress" $)) }}
      {{- end }}
      {{- include "scdist.rayPod" (dict "root" $ "container" "ray-head" "image" (include "scdist.image" $) "resources" $v.head.resources "nodeSelector" $v.head.nodeSelector "tolerations" $v.head.tolerations "ports" $ports "pipeline" .pipeline "extraEnv" $extraEnv) | nindent 6 }}
workerGroupSpecs:
  {{- if $v.cpuWorkers.enabled }}
  - groupName: cpu
    replicas: {{ $v.cpuWorkers.replicas }}
    minReplicas: {{ $v.cpuWorkers.minReplicas }}
    maxReplicas: {{ $v.cpuWorkers.maxReplicas }}
    rayStartParams: {}
    template:
      metadata:
        labels:
          {{- include "scdist.selectorLabels" $ | nindent 10 }}
          app.kubernetes.io/component: ray-worker
      spec:
        {{- include "scdist.rayPod" (dict "root" $ "container" "ray-worker" "image" (include "scdist.image" $) "resources" $v.cpuWorkers.resources "nodeSelector" $v.cpuWorkers.nodeSelector "tolerations" $v.cpuWorkers.tolerations) | nindent 8 }}
  {{- end }}
  {{- if $v.gpuWorkers.enabled }}
  {{- /* sprig's merge writes into its first argument: give each list a fresh dict. */}}
  {{- $n := toString $v.gpuWorkers.gpusPerWorker }}
  {{- $res := dict "requests" (merge (dict "nvidia.com/gpu" $n) (deepCopy (default dict $v.gpuWorkers.resources.requests))) "limits" (merge (dict "nvidia.com/gpu" $n) (deepCopy (default dict $v.gpuWorkers.resources.limits))) }}
  - groupName: gpu
    replicas: {{ $v.gpuWorkers.replicas }}
    minReplicas: {{ $v.gpuWorkers.minReplicas }}
    maxReplicas: {{ $v.gpuWorkers.maxReplicas }}
    rayStartParams: {}
    template:
      metadata:
        labels:
          {{- include "scdist.selectorLabels" $ | nindent 10 }}
          app.kubernetes.io/component: ray-gpu-worker
      spec:
        {{- include "scdist.rayPod" (dict "root" $ "container" "ray-worker" "image" (include "scdist.gpuImage" $) "resources" $res "nodeSelector" $v.gpuWorkers.nodeSelector "tolerations" $v.gpuWorkers.tolerations) | nindent 8 }}
  {{- end }}
{{- end }}
