{{/* Dask pod specs shared by the plain Deployments and the operator's DaskCluster. The container
     names "scheduler" and "worker" are the ones the operator expects. */}}

{{- define "scdist.daskSchedulerPodSpec" -}}
serviceAccountName: {{ include "scdist.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "scdist.podSecurityContext" . | nindent 2 }}
containers:
  - name: scheduler
    image: {{ include "scdist.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: [dask, scheduler]
    args:
      - --port={{ .Values.dask.scheduler.port }}
      - --dashboard-address=:{{ .Values.dask.scheduler.dashboardPort }}
    workingDir: {{ include "scdist.workingDir" . }}
    env:
      {{- include "scdist.env" . | nindent 6 }}
    ports:
      - name: tcp-comm
        containerPort: {{ .Values.dask.scheduler.port }}
        protocol: TCP
      - name: http-dashboard
        containerPort: {{ .Values.dask.scheduler.dashboardPort }}
        protocol: TCP
    readinessProbe:
      httpGet:
        path: /health
        port: http-dashboard
      initialDelaySeconds: 5
      periodSeconds: 10
    livenessProbe:
      httpGet:
        path: /health
        port: http-dashboard
      initialDelaySeconds: 15
      periodSeconds: 20
    resources:
      {{- toYaml .Values.dask.scheduler.resources | nindent 6 }}
    securityContext:
      {{- include "scdist.containerSecurityContext" . | nindent 6 }}
    volumeMounts:
      {{- include "scdist.volumeMounts" . | nindent 6 }}
volumes:
  {{- include "scdist.volumes" . | nindent 2 }}
{{- end }}

{{/* Workers read the store and write result chunks, so they mount the same storage as the run. */}}
{{- define "scdist.daskWorkerPodSpec" -}}
{{- $ := .root -}}
serviceAccountName: {{ include "scdist.serviceAccountName" $ }}
automountServiceAccountToken: false
{{- with $.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- include "scdist.podSecurityContext" $ | nindent 2 }}
{{- with $.Values.dask.worker.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $.Values.dask.worker.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $.Values.dask.worker.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: worker
    image: {{ include "scdist.image" $ }}
    imagePullPolicy: {{ $.Values.image.pullPolicy }}
    command: [dask, worker]
    args:
      - {{ .scheduler | quote }}
      - --name={{ .workerName }}
      - --nthreads={{ $.Values.dask.worker.nthreads }}
      - --memory-limit={{ $.Values.dask.worker.memoryLimit }}
      - --local-directory=/tmp
      - --dashboard-address=:8788
      - --preload=scdist.engines.dask_preload
    workingDir: {{ include "scdist.workingDir" $ }}
    env:
      - name: POD_NAME
        valueFrom:
          fieldRef:
            fieldPath: metadata.name
      {{- include "scdist.env" $ | nindent 6 }}
    {{- with (include "scdist.envFrom" $) }}
    envFrom:
      {{- . | nindent 6 }}
    {{- end }}
    ports:
      - name: http-dashboard
        containerPort: 8788
        protocol: TCP
    resources:
      {{- toYaml $.Values.dask.worker.resources | nindent 6 }}
    securityContext:
      {{- include "scdist.containerSecurityContext" $ | nindent 6 }}
    volumeMounts:
      {{- include "scdist.volumeMounts" $ | nindent 6 }}
volumes:
  {{- include "scdist.volumes" $ | nindent 2 }}
{{- end }}

{{/* scheduler + worker of a DaskCluster (also the cluster of a DaskJob). */}}
{{- define "scdist.daskClusterSpec" -}}
{{- $ := .root -}}
scheduler:
  spec:
    {{- include "scdist.daskSchedulerPodSpec" $ | nindent 4 }}
  service:
    type: ClusterIP
    selector:
      dask.org/cluster-name: {{ .clusterName }}
      dask.org/component: scheduler
    ports:
      - name: tcp-comm
        protocol: TCP
        port: {{ $.Values.dask.scheduler.port }}
        targetPort: tcp-comm
      - name: http-dashboard
        protocol: TCP
        port: {{ $.Values.dask.scheduler.dashboardPort }}
        targetPort: http-dashboard
worker:
  replicas: {{ $.Values.dask.worker.replicas }}
  spec:
    {{- /* The operator injects DASK_SCHEDULER_ADDRESS and DASK_WORKER_NAME (it retires workers by that name). */}}
    {{- include "scdist.daskWorkerPodSpec" (dict "root" $ "scheduler" "$(DASK_SCHEDULER_ADDRESS)" "workerName" "$(DASK_WORKER_NAME)") | nindent 4 }}
{{- end }}
