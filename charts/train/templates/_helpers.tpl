{{/* Names: the release is the run; `helm install train charts/train` gives pods train-0, train-1, ... */}}
{{- define "train.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The headless Service that gives each worker pod a stable DNS name (<fullname>-<index>.<service>). */}}
{{- define "train.service" -}}
{{- printf "%s-nodes" (include "train.fullname" .) -}}
{{- end -}}

{{/*
Every string reaches a manifest through `quote` or `toYaml`, never bare: a value is data, so a newline, `---`,
`{a: b}` or `key: value` inside it stays inside its string instead of becoming YAML structure (a new key, a new
document, a privileged container). values.schema.json also gives each name-like value its Kubernetes pattern.
*/}}
{{- define "train.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}

{{- define "train.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end -}}

{{/*
Checks the schema cannot express with a clear message. Access keys never go into values: a plain `value` for an
AWS credential in extraEnv would sit in the Job spec (readable by anyone who can read Jobs) and override the
Secret, so it fails the install naming the variable; `valueFrom` (a secretKeyRef) is fine.
*/}}
{{- define "train.checkValues" -}}
{{- $credentials := list "AWS_ACCESS_KEY_ID" "AWS_SECRET_ACCESS_KEY" "AWS_SESSION_TOKEN" "AWS_SECURITY_TOKEN" -}}
{{- range .Values.extraEnv -}}
{{- if and (has .name $credentials) (hasKey . "value") -}}
{{- fail (printf "extraEnv: %s has a plain value; access keys never go into values: use valueFrom.secretKeyRef, or name a Secret in s3.existingSecret" .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "train.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "train.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "train.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* requests/limits of a container, GPUs added from gpusPerNode; quantities as strings, as kubectl shows them */}}
{{- define "train.resources" -}}
{{- $out := dict -}}
{{- range $kind := list "requests" "limits" -}}
{{- $items := dict -}}
{{- range $name, $value := (get ($.resources | default dict) $kind | default dict) -}}
{{- $_ := set $items $name (toString $value) -}}
{{- end -}}
{{- if gt (int $.gpus) 0 -}}
{{- $_ := set $items "nvidia.com/gpu" (toString $.gpus) -}}
{{- end -}}
{{- if $items -}}
{{- $_ := set $out $kind $items -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{- define "train.procsPerNode" -}}
{{- if gt (int .Values.gpusPerNode) 0 -}}{{ .Values.gpusPerNode }}{{- else -}}{{ .Values.cpuProcsPerNode }}{{- end -}}
{{- end -}}

{{- define "train.s3uri" -}}
{{- printf "s3://%s/%s" .root.Values.s3.bucket (trimAll "/" .path) -}}
{{- end -}}

{{/* The trainer's YAML: the user's `config` over the locations the chart knows. */}}
{{- define "train.config" -}}
{{- $images := include "train.s3uri" (dict "root" . "path" .Values.dataset.images) -}}
{{- $coco := include "train.s3uri" (dict "root" . "path" .Values.dataset.coco) -}}
{{- $defaults := dict
  "run" (dict "name" (include "train.fullname" .) "dir" (include "train.s3uri" (dict "root" . "path" .Values.runsPrefix)))
  "data" (dict
    "train" (dict "coco" (printf "%s/%s.json" $coco .Values.dataset.trainSplit) "images" $images)
    "val" (dict "coco" (printf "%s/%s.json" $coco .Values.dataset.valSplit) "images" $images))
  "checkpoint" (dict "grace_seconds" .Values.terminationGracePeriodSeconds) -}}
{{- toYaml (mustMergeOverwrite $defaults (deepCopy .Values.config)) -}}
{{- end -}}

{{/* S3 settings for every container that touches the bucket: endpoint, region, keys from a Secret. */}}
{{- define "train.s3env" -}}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- with .Values.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.s3.accessKeyIdKey | quote }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.s3.secretAccessKeyKey | quote }}}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: {{ $.Values.s3.sessionTokenKey | quote }}, optional: true}
{{- end }}
- name: TRAINER_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- end -}}

{{- define "train.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "train.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* `trainer convert`: idempotent (skips when report.json records a successful conversion). */}}
{{- define "train.convertContainer" -}}
- name: convert
  image: {{ include "train.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy | quote }}
  command: ["trainer"]
  args:
    - convert
    - {{ printf "--voc-root=%s" (include "train.s3uri" (dict "root" . "path" .Values.dataset.voc)) | quote }}
    - {{ printf "--out=%s" (include "train.s3uri" (dict "root" . "path" .Values.dataset.coco)) | quote }}
    - {{ printf "--report=%s/report.json" (include "train.s3uri" (dict "root" . "path" .Values.dataset.coco)) | quote }}
    - {{ printf "--splits=%s,%s" .Values.dataset.trainSplit .Values.dataset.valSplit | quote }}
    {{- if not .Values.convert.force }}
    - --skip-if-done
    {{- end }}
    {{- range .Values.convert.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    {{- include "train.s3env" . | nindent 4 }}
  resources:
    {{- toYaml .Values.convert.resources | nindent 4 }}
  securityContext:
    {{- include "train.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - {name: tmp, mountPath: /tmp}
{{- end -}}

{{/*
The worker pod. Args is the torchrun command line: one agent per pod, one process per GPU, rendezvous at the
pod with index 0. `workload` decides which names the pods get, hence the rendezvous host and this pod's name.
*/}}
{{- define "train.workerPodSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $procs := include "train.procsPerNode" $root -}}
serviceAccountName: {{ include "train.serviceAccountName" $root | quote }}
automountServiceAccountToken: false
{{- if ne $v.workload "PyTorchJob" }}
restartPolicy: Never
subdomain: {{ include "train.service" $root | quote }}
{{- end }}
terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
enableServiceLinks: false
securityContext:
  {{- include "train.podSecurityContext" $root | nindent 2 }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if and $v.convert.enabled (eq $v.convert.mode "initContainer") }}
initContainers:
  {{- include "train.convertContainer" $root | nindent 2 }}
{{- end }}
containers:
  {{- /* the Kubeflow training operator finds its container by the name "pytorch" */}}
  - name: {{ ternary "pytorch" "trainer" (eq $v.workload "PyTorchJob") }}
    image: {{ include "train.image" $root | quote }}
    imagePullPolicy: {{ $v.image.pullPolicy | quote }}
    command: ["trainer-launch"]
    args:
      - {{ printf "--nnodes=%v" $v.nodes | quote }}
      - {{ printf "--nproc-per-node=%v" $procs | quote }}
      - --rdzv-backend=c10d
      - {{ printf "--rdzv-endpoint=%s:%v" .rdzvHost $v.rendezvous.port | quote }}
      - {{ printf "--rdzv-id=%s" (include "train.fullname" $root) | quote }}
      - {{ printf "--rdzv-conf=join_timeout=%v" $v.rendezvous.joinTimeoutSeconds | quote }}
      - --local-addr=$(TRAINER_POD_HOST)
      {{- /* any failure ends every pod; the Job re-forms the whole group (trainer/launch.py says why) */}}
      - --max-restarts=0
      - -m
      - trainer.train
      - --config=/etc/trainer/config.yaml
      {{- range $v.extraArgs }}
      - {{ . | quote }}
      {{- end }}
    env:
      - name: TRAINER_NODE_INDEX
        valueFrom:
          fieldRef:
            fieldPath: {{ .indexField | quote }}
      - name: TRAINER_POD_HOST
        value: {{ .podHost | quote }}
      - name: TRAINER_RDZV_RETRY_SECONDS
        value: {{ $v.rendezvous.joinTimeoutSeconds | quote }}
      - name: POD_NAME
        valueFrom:
          fieldRef: {fieldPath: metadata.name}
      - name: POD_NAMESPACE
        valueFrom:
          fieldRef: {fieldPath: metadata.namespace}
      {{- include "train.s3env" $root | nindent 6 }}
      {{- with $v.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    ports:
      - {name: rendezvous, containerPort: {{ $v.rendezvous.port }}, protocol: TCP}
    resources:
      {{- include "train.resources" (dict "resources" $v.resources "gpus" $v.gpusPerNode) | nindent 6 }}
    securityContext:
      {{- include "train.containerSecurityContext" $root | nindent 6 }}
    volumeMounts:
      - {name: config, mountPath: /etc/trainer, readOnly: true}
      - {name: dshm, mountPath: /dev/shm}
      - {name: tmp, mountPath: /tmp}
      - {name: cache, mountPath: /home/trainer/.cache}
volumes:
  - name: config
    configMap:
      name: {{ printf "%s-config" (include "train.fullname" $root) | quote }}
  - name: dshm
    emptyDir: {medium: Memory, sizeLimit: {{ $v.shmSize | toString | quote }}}
  - name: tmp
    emptyDir: {}
  - name: cache
    emptyDir: {}
{{- end -}}

{{/* Pod labels of the workers: the selector labels (Service, NetworkPolicy, `trainer watch`) plus a role. */}}
{{- define "train.podMetadata" -}}
labels:
  {{- include "train.labels" . | nindent 2 }}
  app.kubernetes.io/component: worker
  {{- with .Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ include "train.config" . | sha256sum | quote }}
  {{- with .Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Checks that do not apply to batch pods, each with the reason (checkov reads these annotations). */}}
{{- define "train.checkovSkips" -}}
checkov.io/skip1: "CKV_K8S_8=a batch training pod serves nothing to probe; torchrun's agent watches its workers"
checkov.io/skip2: "CKV_K8S_9=no readiness to report, nothing routes traffic to these pods"
checkov.io/skip3: "CKV_K8S_35=boto3 reads keys from the environment; they come from a Secret, never from values"
{{- if not .Values.image.digest }}
checkov.io/skip4: "CKV_K8S_43=a tag by default so the chart installs as is; image.digest pins the image by digest"
{{- end }}
{{- end -}}

{{/* Where the run writes: <run.dir>/<run.name>, by default s3://<bucket>/<runsPrefix>/<release>. */}}
{{- define "train.runUri" -}}
{{- $config := .Values.config | default dict -}}
{{- $run := get $config "run" | default dict -}}
{{- $dir := get $run "dir" | default (include "train.s3uri" (dict "root" . "path" .Values.runsPrefix)) -}}
{{- printf "%s/%s" (trimSuffix "/" $dir) (get $run "name" | default (include "train.fullname" .)) -}}
{{- end -}}
