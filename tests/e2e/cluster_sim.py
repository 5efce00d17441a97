"""A cluster simulation: run the chart's rendered Jobs as a kubelet and the Job controller would, as local processes.

No API server can run here, so this harness takes the manifests ``helm template`` printed and executes them:

- every pod is a real process tree in its own UTS, mount and PID namespaces (``unshare``): its own hostname, an
  ``/etc/hosts`` of its own in which the Service's DNS names resolve to the pods' addresses (each pod gets its own
  127.0.1.x; nothing leaves loopback), a read-only root filesystem, the pod's volumes at their mount paths
  (ConfigMap files, emptyDirs, a memory-backed tmpfs for ``medium: Memory``), and the container's user from its
  security context;
- the container's command and args with ``$(VAR)`` expansion, its env with the downward API (name, namespace,
  labels, annotations, pod IP), Secret references, and what the Job controller adds (``JOB_COMPLETION_INDEX``);
- the "image" is this repository's virtualenv plus the ENV lines of the Dockerfile's final stage;
- Job semantics: Indexed completions, a failed pod replaced once it has stopped, the pod failure policy
  (FailJob / Ignore / Count by exit code or pod condition), backoffLimit with a (shortened) back-off delay,
  and eviction (DisruptionTarget condition, SIGTERM, SIGKILL after terminationGracePeriodSeconds).

Signals go to the container's main process; when it ends, the pod's PID 1 exits with its status and the
kernel ends every other process of the pod, as in a container.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$")


class SimError(AssertionError):
    """The manifests asked for something the simulation (or a cluster) would refuse."""


def image_env(dockerfile: Path = REPO / "Dockerfile") -> dict[str, str]:
    """The ENV of the Dockerfile's final stage, with PATH pointing at the virtualenv that plays the image."""
    stage = dockerfile.read_text().split("\nFROM ")[-1]
    env: dict[str, str] = {}
    for statement in re.findall(r"^ENV ((?:.*\\\n)*.*)$", stage, flags=re.M):
        for token in shlex.split(statement.replace("\\\n", " ")):
            name, _, value = token.partition("=")
            env[name] = value
    env["PATH"] = f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known names are replaced, unknown ones kept, ``$$`` escapes ``$``."""
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _VAR.sub(one, text)


def field_value(path: str, pod: Pod) -> str:
    """The downward API's fieldRef values the chart may use."""
    subscript = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if subscript:
        source = pod.labels if subscript.group(1) == "labels" else pod.annotations
        if subscript.group(2) not in source:
            raise SimError(f"pod {pod.name}: fieldRef {path} names a {subscript.group(1)[:-1]} the pod lacks")
        return source[subscript.group(2)]
    values = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "status.podIP": pod.ip,
              "spec.nodeName": "sim-node", "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default")}
    if path not in values:
        raise SimError(f"pod {pod.name}: fieldRef {path} is not simulated")
    return values[path]


def _overlay(folder: Path, layer: Path) -> list[str]:
    """Shell lines that put a writable overlay (its upper layer on a fresh tmpfs) over ``folder``, in this pod only."""
    return [f"mkdir -p {layer}", f"mount -t tmpfs tmpfs {layer}", f"mkdir {layer}/up {layer}/work",
            f"mount -t overlay overlay -o lowerdir={folder},upperdir={layer}/up,workdir={layer}/work {folder}"]


def _closed_folders_on_the_way_to(path: Path, uid: int) -> list[Path]:
    """Folders above ``path`` that a user other than their owner cannot traverse."""
    if uid == 0:
        return []
    return [folder for folder in reversed(path.parents)
            if folder != Path("/") and not folder.stat().st_mode & 0o001 and folder.stat().st_uid != uid]


@dataclass
class Pod:
    name: str
    namespace: str
    index: int | None
    hostname: str
    subdomain: str | None
    ip: str
    spec: dict[str, Any]
    labels: dict[str, str]
    annotations: dict[str, str]
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    conditions: set[str] = field(default_factory=set)
    lines: list[str] = field(default_factory=list)
    started: float = 0.0
    reader: threading.Thread | None = None

    @property
    def dns_names(self) -> list[str]:
        names = [self.hostname]
        if self.subdomain:
            fqdn = f"{self.hostname}.{self.subdomain}.{self.namespace}.svc.cluster.local"
            names = [fqdn, f"{self.hostname}.{self.subdomain}.{self.namespace}.svc",
                     f"{self.hostname}.{self.subdomain}", self.hostname]
        return names

    @property
    def running(self) -> bool:
        return self.process is not None and self.exit_code is None

    def main_pid(self) -> int | None:
        """The host PID of the container's main process (the child of the pod's PID 1, a shell like an init)."""
        pid = self.process.pid if self.process is not None else None
        for _ in range(2):  # unshare -> the namespace's PID 1 -> the container's process
            if pid is None:
                return None
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                return None
            pid = int(children[0]) if children else None
        return pid


@dataclass
class JobResult:
    name: str
    status: str  # Complete | Failed
    reason: str
    pods: list[Pod]
    counted_failures: int

    def log(self, index: int | None = None) -> str:
        return "\n".join(f"[{p.name}] {line}" for p in self.pods if index is None or p.index == index
                         for line in p.lines)


class Cluster:
    """One namespace of a pretend cluster: Secrets the test provides, and Jobs run from manifests."""

    def __init__(self, manifests: list[dict[str, Any]], workdir: Path, namespace: str,
                 secrets_data: dict[str, dict[str, str]] | None = None, backoff_base_s: float = 0.5) -> None:
        if os.geteuid() != 0:
            raise SimError("the cluster simulation needs root (unshare, mount): run the tests as root")
        self.manifests = manifests
        self.workdir = workdir
        self.namespace = namespace
        self.secrets = secrets_data or {}
        self.backoff_base_s = backoff_base_s
        self.image_env = image_env()
        self.pods: list[Pod] = []
        self._next_ip = 1
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)

    # ------------------------------------------------------------------------------------- objects
    def objects(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.manifests if obj.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for obj in self.objects(kind):
            if obj["metadata"]["name"] == name:
                return obj
        raise SimError(f"no {kind} named {name} in the manifests")

    def hooks(self, event: str) -> list[dict[str, Any]]:
        """Jobs annotated as Helm hooks for this event, in hook-weight order (as Helm runs them)."""
        chosen = [obj for obj in self.objects("Job")
                  if event in (obj["metadata"].get("annotations") or {}).get("helm.sh/hook", "").split(",")]
        return sorted(chosen, key=lambda obj: int(obj["metadata"]["annotations"].get("helm.sh/hook-weight", "0")))

    # ------------------------------------------------------------------------------------- pods
    def _new_pod(self, job: dict[str, Any], index: int | None) -> Pod:
        template = job["spec"]["template"]
        spec = template["spec"]
        job_name = job["metadata"]["name"]
        suffix = secrets.token_hex(3)[:5]
        name = f"{job_name}-{index}-{suffix}" if index is not None else f"{job_name}-{suffix}"
        labels = {**(template.get("metadata", {}).get("labels") or {}), "job-name": job_name,
                  "batch.kubernetes.io/job-name": job_name}
        annotations = dict(template.get("metadata", {}).get("annotations") or {})
        if index is not None:
            labels[INDEX_KEY] = annotations[INDEX_KEY] = str(index)
        with self._lock:
            if self._next_ip > 254:
                raise SimError("the simulation ran out of pod addresses (127.0.1.1-254)")
            ip = f"127.0.1.{self._next_ip}"  # every pod, including a replacement, gets a fresh address
            self._next_ip += 1
        hostname = f"{job_name}-{index}" if index is not None else name
        pod = Pod(name=name, namespace=self.namespace, index=index, hostname=hostname,
                  subdomain=spec.get("subdomain") if index is not None else None, ip=ip, spec=spec, labels=labels,
                  annotations=annotations, workdir=self.workdir / "pods" / name)
        pod.workdir.mkdir(parents=True)
        return pod

    def _hosts_text(self, pod: Pod) -> str:
        lines = ["127.0.0.1\tlocalhost", f"{pod.ip}\t{' '.join(pod.dns_names)}"]
        with self._lock:
            for other in self.pods:  # the cluster DNS: every running pod of the same subdomain, by its
                # Service names (a bare hostname resolves only inside its own pod, as in Kubernetes)
                if other is not pod and other.running and other.subdomain and other.subdomain == pod.subdomain:
                    lines.append(f"{other.ip}\t{' '.join(other.dns_names[:3])}")
        return "\n".join(lines) + "\n"

    def _refresh_dns(self) -> None:
        """Rewrite every running pod's /etc/hosts in place (the bind mount keeps the inode), like DNS updates."""
        with self._lock:
            for pod in self.pods:
                if pod.running:
                    with open(pod.workdir / "hosts", "r+") as hosts:
                        hosts.truncate(0)
                        hosts.write(self._hosts_text(pod))

    def _container_env(self, pod: Pod, container: dict[str, Any]) -> dict[str, str]:
        env = dict(self.image_env)
        env["HOSTNAME"] = pod.hostname
        if pod.index is not None:
            env["JOB_COMPLETION_INDEX"] = str(pod.index)
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = expand(str(item["value"]), env)
                continue
            source = item.get("valueFrom") or {}
            if "fieldRef" in source:
                env[name] = field_value(source["fieldRef"]["fieldPath"], pod)
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                value = self.secrets.get(ref["name"], {}).get(ref["key"])
                if value is None and not ref.get("optional"):
                    raise SimError(f"pod {pod.name}: Secret {ref['name']} key {ref['key']} does not exist")
                if value is not None:
                    env[name] = value
            else:
                raise SimError(f"pod {pod.name}: env {name} uses {list(source)}, which is not simulated")
        return env

    def _volumes(self, pod: Pod, container: dict[str, Any]) -> list[str]:
        """Shell lines that mount the container's volumes at their paths (run inside the pod's mount namespace)."""
        uid, gid = self._ids(pod, container)
        fs_group = (pod.spec.get("securityContext") or {}).get("fsGroup", gid)
        volumes = {volume["name"]: volume for volume in pod.spec.get("volumes") or []}
        mounts = container.get("volumeMounts") or []
        lines: list[str] = []
        # Mount points that do not exist on this machine appear inside an overlay of their nearest existing
        # parent, so the host's own tree is never touched.
        overlaid: set[Path] = set()
        for number, mount in enumerate(mounts):
            target = Path(mount["mountPath"])
            if target.exists() or target == Path("/dev/shm"):
                continue
            parent = target
            while not parent.exists():
                parent = parent.parent
            if parent == Path("/"):
                raise SimError(f"pod {pod.name}: mount path {target} would need an overlay of /")
            if parent not in overlaid:
                lines += _overlay(parent, pod.workdir / f"overlay{number}")
                overlaid.add(parent)
            lines.append(f"mkdir -p {target}")
        # The "image" is this machine's virtualenv: where it or its interpreter sits under a folder the container
        # user may not enter (pyenv under /root, a checkout in a `mktemp -d` folder), an overlay opens that folder
        # inside this pod only.
        closed = dict.fromkeys([*_closed_folders_on_the_way_to(Path(os.path.realpath(VENV_BIN / "python")), uid),
                                *_closed_folders_on_the_way_to(VENV_BIN, uid)])
        for folder in closed:
            lines += [*_overlay(folder, pod.workdir / f"open{len(overlaid)}"), f"chmod o+x {folder}"]
            overlaid.add(folder)
        lines.append(f"mount --bind {pod.workdir / 'hosts'} /etc/hosts")
        # a volume mounted over a parent of this harness's files (e.g. /tmp) goes last, once its sources are used
        hides_sources = [m for m in mounts if pod.workdir.is_relative_to(m["mountPath"])]
        # The "image" (this checkout and its virtualenv) must stay at its path even when that path is under such
        # a volume (a clone in /tmp): hold it open on fd 3, then bind it back from the descriptor afterwards.
        hidden_image = any(REPO.is_relative_to(m["mountPath"]) for m in mounts)
        if hidden_image:
            lines.append(f"exec 3<{REPO}")
        for mount in [m for m in mounts if m not in hides_sources] + hides_sources:
            volume = volumes.get(mount["name"])
            if volume is None:
                raise SimError(f"pod {pod.name}: volumeMount {mount['name']} has no volume")
            target = mount["mountPath"]
            if "configMap" in volume:
                source = pod.workdir / "volumes" / mount["name"]
                source.mkdir(parents=True)
                config_map = self.get("ConfigMap", volume["configMap"]["name"])
                for key, text in (config_map.get("data") or {}).items():
                    (source / key).write_text(text)
                    (source / key).chmod(0o644)
                lines += [f"mount --bind {source} {target}", f"mount -o remount,bind,ro {target}"]
            elif "emptyDir" in volume:
                if (volume["emptyDir"] or {}).get("medium") == "Memory":
                    size = str((volume["emptyDir"] or {}).get("sizeLimit", "64Mi")).replace("i", "").lower()
                    lines += [f"mount -t tmpfs -o size={size},mode=1777 tmpfs {target}"]
                else:
                    source = pod.workdir / "volumes" / mount["name"]
                    source.mkdir(parents=True, exist_ok=True)
                    os.chown(source, uid, fs_group)
                    source.chmod(0o2775)
                    lines.append(f"mount --bind {source} {target}")
                if mount.get("readOnly"):
                    lines.append(f"mount -o remount,bind,ro {target}")
            else:
                raise SimError(f"pod {pod.name}: volume {mount['name']} kind {list(volume)} is not simulated")
        if hidden_image:
            lines += [f"mkdir -p {REPO}", f"mount --no-canonicalize --bind /proc/self/fd/3 {REPO}",
                      f"mount -o remount,bind,ro {REPO}", "exec 3<&-"]
        if (container.get("securityContext") or {}).get("readOnlyRootFilesystem"):
            # Last, so that the volumes bound from this machine's files above stay writable: this namespace's
            # copy of the root mount (and of the overlays) becomes read-only; the host's stays as it is.
            lines.append("mount -o remount,bind,ro /")
            lines += [f"mount -o remount,bind,ro {parent}" for parent in sorted(overlaid)]
        return lines

    @staticmethod
    def _ids(pod: Pod, container: dict[str, Any]) -> tuple[int, int]:
        pod_context = pod.spec.get("securityContext") or {}
        context = {**pod_context, **(container.get("securityContext") or {})}
        uid, gid = context.get("runAsUser"), context.get("runAsGroup", context.get("runAsUser"))
        if context.get("runAsNonRoot") and (uid is None or uid == 0):
            raise SimError(f"pod {pod.name}: runAsNonRoot without a non-zero runAsUser would not start")
        return int(uid or 0), int(gid or 0)

    def start_pod(self, job: dict[str, Any], index: int | None) -> Pod:
        pod = self._new_pod(job, index)
        containers = pod.spec["containers"]
        if len(containers) != 1:
            raise SimError(f"pod {pod.name}: the simulation runs one container per pod")
        if pod.spec.get("initContainers"):
            raise SimError(f"pod {pod.name}: init containers are not simulated (use convert.mode=hook)")
        container = containers[0]
        env = self._container_env(pod, container)
        argv = [expand(str(part), env) for part in [*container.get("command", []), *container.get("args", [])]]
        uid, gid = self._ids(pod, container)
        (pod.workdir / "hosts").write_text(self._hosts_text(pod))
        setup = [f"hostname {pod.hostname}", *self._volumes(pod, container)]
        run_as = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        if (container.get("securityContext") or {}).get("allowPrivilegeEscalation") is False:
            run_as.append("--no-new-privs")
        env_args = [f"{name}={value}" for name, value in env.items()]
        # PID 1 is a shell that waits for the container's process and exits with its status (128 + n when signal
        # n killed it, as a container runtime reports). When it exits, the kernel ends every other process of the
        # pod's PID namespace.
        script = " && ".join(setup) + " && " + shlex.join([*run_as, "env", "-i", *env_args, *argv]) + "; exit $?"
        pod.process = subprocess.Popen(
            ["unshare", "--uts", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc",
             "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=pod.workdir, start_new_session=True)
        pod.started = time.monotonic()
        pod.reader = threading.Thread(target=self._read, args=(pod,), daemon=True)
        with self._lock:
            self.pods.append(pod)
        pod.reader.start()
        self._refresh_dns()
        return pod

    def _read(self, pod: Pod) -> None:
        assert pod.process is not None and pod.process.stdout is not None
        with open(pod.workdir / "log.txt", "wb") as log:
            for raw in pod.process.stdout:
                log.write(raw)
                log.flush()
                with self._changed:
                    pod.lines.append(raw.decode(errors="replace").rstrip("\n"))
                    self._changed.notify_all()
        code = pod.process.wait()
        with self._changed:
            pod.exit_code = code
            self._changed.notify_all()
        self._refresh_dns()

    def wait_for_line(self, predicate: Callable[[Pod, str], bool], timeout: float) -> tuple[Pod, str]:
        """The first log line (of any pod, past or future) that matches."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for pod in self.pods:
                    for line in pod.lines:
                        if predicate(pod, line):
                            return pod, line
                if time.monotonic() > deadline:
                    tail = "\n".join(f"[{p.name}] {line}" for p in self.pods for line in p.lines[-15:])
                    raise AssertionError(f"no matching log line in {timeout:.0f} s; last lines:\n{tail}")
                self._changed.wait(0.5)

    def kill(self, pod: Pod, sig: int = signal.SIGKILL) -> None:
        """A signal to the container's main process (SIGKILL: the whole pod dies with it)."""
        pid = pod.main_pid()
        if pid is not None:
            os.kill(pid, sig)

    def evict(self, pod: Pod, grace_s: float | None = None) -> None:
        """Preemption/eviction as the kubelet does it: DisruptionTarget, SIGTERM, SIGKILL after the grace period."""
        grace = float(pod.spec.get("terminationGracePeriodSeconds", 30) if grace_s is None else grace_s)
        pod.conditions.add("DisruptionTarget")
        self.kill(pod, signal.SIGTERM)

        def enforce() -> None:
            deadline = time.monotonic() + grace
            while pod.running and time.monotonic() < deadline:
                time.sleep(0.2)
            if pod.running:
                self.kill(pod, signal.SIGKILL)
        threading.Thread(target=enforce, daemon=True).start()

    def running_pods(self, job_name: str) -> list[Pod]:
        with self._lock:
            return [p for p in self.pods if p.running and p.labels.get("job-name") == job_name]

    def shutdown(self) -> None:
        for pod in list(self.pods):
            if pod.running:
                self.kill(pod)
        for pod in list(self.pods):
            if pod.process is not None:
                try:
                    pod.process.wait(10)
                except subprocess.TimeoutExpired:
                    pod.process.kill()

    # ------------------------------------------------------------------------------------- jobs
    def run_job(self, job: dict[str, Any], timeout: float) -> JobResult:
        """The Job controller for one Job, until it completes or fails."""
        spec = job["spec"]
        name = job["metadata"]["name"]
        indexed = spec.get("completionMode") == "Indexed"
        completions = int(spec.get("completions", 1))
        if indexed and int(spec.get("parallelism", 1)) != completions:
            raise SimError(f"job {name}: the simulation needs parallelism == completions")
        if spec.get("podFailurePolicy") and spec["template"]["spec"].get("restartPolicy") != "Never":
            raise SimError(f"job {name}: podFailurePolicy requires restartPolicy Never")
        backoff_limit = int(spec.get("backoffLimit", 6))
        rules = (spec.get("podFailurePolicy") or {}).get("rules", [])
        slots: list[int | None] = list(range(completions)) if indexed else [None]
        current = {slot: self.start_pod(job, slot) for slot in slots}
        mine: list[Pod] = list(current.values())
        done: set[int | None] = set()
        counted = 0
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                self._changed.wait(0.2)
            for slot, pod in list(current.items()):
                if slot in done or pod.exit_code is None:
                    continue
                if pod.exit_code == 0:
                    done.add(slot)
                    continue
                action = failure_action(rules, pod)
                if action == "FailJob":
                    return self._end(name, "Failed", f"PodFailurePolicy: {pod.name} exit {pod.exit_code}",
                                     mine, counted)
                if action == "Count":
                    counted += 1
                    if counted > backoff_limit:
                        return self._end(name, "Failed", "BackoffLimitExceeded", mine, counted)
                    time.sleep(min(self.backoff_base_s * 2 ** (counted - 1), 10.0))
                current[slot] = self.start_pod(job, slot)  # replaced once stopped (podReplacementPolicy Failed)
                mine.append(current[slot])
            if len(done) == len(slots):
                return self._end(name, "Complete", "", mine, counted)
            if time.monotonic() > deadline:
                return self._end(name, "Failed", "DeadlineExceeded (simulation timeout)", mine, counted)

    def _end(self, name: str, status: str, reason: str, pods: list[Pod], counted: int) -> JobResult:
        for pod in pods:
            if pod.running:
                self.kill(pod, signal.SIGTERM)
        for pod in pods:
            deadline = time.monotonic() + float(pod.spec.get("terminationGracePeriodSeconds", 30))
            while pod.running and time.monotonic() < deadline:
                time.sleep(0.2)
            if pod.running:
                self.kill(pod)
        for pod in pods:
            if pod.reader is not None:
                pod.reader.join(10)
        return JobResult(name, status, reason, pods, counted)

    def start_job(self, job: dict[str, Any], timeout: float) -> JobRun:
        return JobRun(self, job, timeout)


class JobRun:
    """A Job controller running in the background, so the test can act on its pods meanwhile."""

    def __init__(self, cluster: Cluster, job: dict[str, Any], timeout: float) -> None:
        self.result: JobResult | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = cluster.run_job(job, timeout)
            except BaseException as exc:  # re-raised in wait()
                self.error = exc
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait(self, timeout: float) -> JobResult:
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise AssertionError(f"the Job controller did not finish in {timeout:.0f} s")
        return self.result


def failure_action(rules: list[dict[str, Any]], pod: Pod) -> str:
    """The pod failure policy's verdict for a failed pod: the first matching rule's action, else Count."""
    container = pod.spec["containers"][0]["name"]
    for rule in rules:
        by_code = rule.get("onExitCodes")
        if by_code and by_code.get("containerName", container) == container:
            values = set(by_code["values"])
            inside = pod.exit_code in values
            if inside if by_code["operator"] == "In" else (not inside and pod.exit_code != 0):
                return str(rule["action"])
        for condition in rule.get("onPodConditions") or []:
            if condition["type"] in pod.conditions and condition.get("status", "True") == "True":
                return str(rule["action"])
    return "Count"


def iter_lines(result: JobResult) -> Iterator[tuple[Pod, str]]:
    for pod in result.pods:
        for line in pod.lines:
            yield pod, line
