"""``trainer watch RELEASE``: one answer to "is it healthy, how far along, when does it end, what was saved last".

It finds the release's worker pods by the chart's labels, reads the tail of their logs (kubelet timestamps
included) and the Job, and reads the trainer's own lines back with the parsers in ``trainer.progress``: progress
(epoch, step, losses, images/s, ETA), the last evaluation and the last committed checkpoint (or, when S3
credentials work here, the run's ``latest.json``). It flags what needs a person: a pod silent while others log (a
hung rank), repeated restarts, OOMKilled, image pull errors, pods that cannot be scheduled.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import yaml

from trainer import storage
from trainer.checkpoint.layout import MAX_POINTER_BYTES
from trainer.exit_codes import DESCRIPTIONS
from trainer.kube import Kube, KubeError
from trainer.progress import (
    EvalLine,
    ProgressLine,
    format_duration,
    parse_checkpoint,
    parse_eval,
    parse_progress,
)

log = logging.getLogger("trainer.watch")

INDEX_LABELS = ("batch.kubernetes.io/job-completion-index", "training.kubeflow.org/replica-index")
IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d) ?(.*)$")
_RANK = re.compile(r"\[rank (\d+)\]")
_NEVER = datetime.min.replace(tzinfo=UTC)  # earlier than any real time: undated lines and events sort first


def selector(release: str) -> str:
    """The chart's labels on the worker pods (the same selector NOTES.txt prints for kubectl logs)."""
    return f"app.kubernetes.io/instance={release},app.kubernetes.io/component=worker"


def split_stamp(line: str) -> tuple[datetime | None, str]:
    """A kubelet log line (``2026-11-24T10:00:00.123456789Z text``) as (time, text)."""
    match = _STAMP.match(line)
    if match is None:
        return None, line
    fraction = (match[2] or "")[:7]  # Python parses at most microseconds
    zone = "+00:00" if match[3] == "Z" else match[3]
    try:
        return datetime.fromisoformat(f"{match[1]}{fraction}{zone}"), match[4]
    except ValueError:
        return None, line


def exit_meaning(code: int | None, reason: str | None) -> str:
    """What a container's exit says, in the trainer's terms (trainer/exit_codes.py)."""
    if reason == "OOMKilled":
        return "out of memory (OOMKilled)"
    if code is None:
        return ""
    if code in DESCRIPTIONS:
        return DESCRIPTIONS[code]
    if code == 137:
        return "killed (SIGKILL: node loss, eviction or memory)"
    if code == 143:
        return "terminated by SIGTERM before saving"
    return "crashed"


# ----------------------------------------------------------------------------------------- model
@dataclass
class PodView:
    name: str
    index: int | None
    phase: str
    node: str | None
    restarts: int
    age_s: float
    state: str  # running | waiting: <reason> | terminated: <reason>
    last_exit_code: int | None = None
    last_exit_reason: str | None = None
    last_exit_meaning: str = ""
    last_log_age_s: float | None = None
    current: bool = True  # the newest pod of its index
    ranks: list[int] = field(default_factory=list)
    message: str = ""  # waiting/scheduling message
    container: str = ""  # the (first) container, whose log is read


@dataclass
class CheckpointView:
    step: int
    uri: str
    age_s: float | None
    source: str  # "S3 latest.json" | "rank-0 log"


@dataclass
class Summary:
    release: str
    namespace: str
    job: dict[str, Any] | None
    pods: list[PodView]
    progress: ProgressLine | None = None
    progress_age_s: float | None = None
    last_eval: EvalLine | None = None
    checkpoint: CheckpointView | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def finished(self) -> str | None:
        return (self.job or {}).get("finished")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.progress is not None:
            done = (self.progress.epoch - 1) * self.progress.steps + self.progress.step
            data["progress"]["fraction"] = round(done / max(1, self.progress.epochs * self.progress.steps), 4)
        return data


@dataclass
class LogLine:
    pod: str
    time: datetime | None
    text: str

    @property
    def rank(self) -> int | None:
        match = _RANK.search(self.text)
        return int(match[1]) if match else None

    def prefixed(self) -> str:
        rank = self.rank
        return f"[{self.pod}{'' if rank is None else f'/rank {rank}'}] {self.text}"


# ----------------------------------------------------------------------------------------- collect
def _index(pod: Any) -> int | None:
    labels = pod.metadata.labels or {}
    for key in INDEX_LABELS:
        if str(labels.get(key, "")).isdigit():
            return int(labels[key])
    return None


def _age(when: datetime | None, now: datetime) -> float | None:
    return None if when is None else max(0.0, (now - when).total_seconds())


def _pod_view(pod: Any, now: datetime) -> PodView:
    statuses = list(pod.status.container_statuses or [])
    main = statuses[0] if statuses else None
    state, code, reason, message = pod.status.phase or "Unknown", None, None, ""
    if main is not None:
        if main.state and main.state.waiting:
            state, message = f"waiting: {main.state.waiting.reason}", main.state.waiting.message or ""
        elif main.state and main.state.terminated:
            term = main.state.terminated
            state, code, reason = f"terminated: {term.reason or term.exit_code}", term.exit_code, term.reason
        elif main.state and main.state.running:
            state = "running"
        if code is None and main.last_state and main.last_state.terminated:
            code, reason = main.last_state.terminated.exit_code, main.last_state.terminated.reason
    if pod.status.phase == "Pending" and not message:
        unscheduled = [c for c in pod.status.conditions or [] if c.type == "PodScheduled" and c.status == "False"]
        if unscheduled:
            state, message = f"unschedulable: {unscheduled[0].reason or ''}".strip(), unscheduled[0].message or ""
    return PodView(name=pod.metadata.name, index=_index(pod), phase=pod.status.phase or "Unknown",
                   node=pod.spec.node_name, restarts=sum(s.restart_count or 0 for s in statuses),
                   age_s=_age(pod.metadata.creation_timestamp, now) or 0.0, state=state, last_exit_code=code,
                   last_exit_reason=reason, last_exit_meaning=exit_meaning(code, reason), message=message,
                   container=pod.spec.containers[0].name if pod.spec.containers else "")


# the chart's `workload` kinds other than a Job: (group, version, plural) of their custom resources
JOBSET_API = ("jobset.x-k8s.io", "v1alpha2", "jobsets")
PYTORCHJOB_API = ("kubeflow.org", "v1", "pytorchjobs")


def _job_view(kube: Kube, namespace: str, release: str, now: datetime | None = None) -> dict[str, Any] | None:
    """The release's workload and its own status: its Indexed Job, else its JobSet, else its PyTorchJob. A JobSet
    or a PyTorchJob restarts the group itself, so its restarts and conditions say more than its pods do."""
    now = now or datetime.now(UTC)
    selector = f"app.kubernetes.io/instance={release}"
    jobs = [j for j in kube.jobs(namespace, selector)
            if (j.metadata.labels or {}).get("app.kubernetes.io/component") != "convert"]
    if jobs:
        job = jobs[0]
        conditions = {c.type: c for c in job.status.conditions or [] if c.status == "True"}
        finished = "Complete" if "Complete" in conditions else "Failed" if "Failed" in conditions else None
        return {"kind": "Job", "name": job.metadata.name, "active": job.status.active or 0,
                "succeeded": job.status.succeeded or 0, "failed": job.status.failed or 0, "finished": finished,
                "reason": (conditions["Failed"].reason if finished == "Failed" else None),
                "suspended": "Suspended" in conditions or bool(job.spec.suspend),
                "started": job.status.start_time.isoformat() if job.status.start_time else None,
                "restarts": None, "max_restarts": None, "conditions": [], "unit": "pods"}
    for api, view in ((JOBSET_API, _jobset_view), (PYTORCHJOB_API, _pytorchjob_view)):
        found = kube.custom_objects(*api, namespace, selector)  # None: the kind is not served here
        if found:
            return view(found[0], now)
    return None


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _true_conditions(status: dict[str, Any], now: datetime) -> list[dict[str, Any]]:
    """The conditions that hold, oldest first: type, reason, message and how long ago they became true."""
    out: list[dict[str, Any]] = []
    for condition in status.get("conditions") or []:
        if str(condition.get("status")) != "True":
            continue
        when = _parse_time(condition.get("lastTransitionTime") or condition.get("lastUpdateTime"))
        out.append({"type": str(condition.get("type", "")), "reason": condition.get("reason") or "",
                    "message": condition.get("message") or "", "age_s": _age(when, now), "when": when or _NEVER})
    out.sort(key=lambda c: c.pop("when"))
    return out


def _reason_of(conditions: list[dict[str, Any]], kind: str) -> str | None:
    return next((c["reason"] or None for c in conditions if c["type"] == kind), None)


def _jobset_view(obj: dict[str, Any], now: datetime) -> dict[str, Any]:
    """jobset.x-k8s.io/v1alpha2: status.restarts (group re-creations), terminalState, conditions and, per
    replicated job, how many of its Jobs are active, succeeded or failed."""
    status, spec, meta = obj.get("status") or {}, obj.get("spec") or {}, obj.get("metadata") or {}
    conditions = _true_conditions(status, now)
    types = {c["type"] for c in conditions}
    terminal = status.get("terminalState")
    finished = ("Complete" if terminal == "Completed" or "Completed" in types else
                "Failed" if terminal == "Failed" or "Failed" in types else None)
    replicated = status.get("replicatedJobsStatus") or []

    def total(key: str) -> int:
        return sum(int(item.get(key) or 0) for item in replicated)
    return {"kind": "JobSet", "name": meta.get("name", ""), "active": total("active"),
            "succeeded": total("succeeded"), "failed": total("failed"), "finished": finished,
            "reason": _reason_of(conditions, "Failed") if finished == "Failed" else None,
            "suspended": "Suspended" in types or bool(spec.get("suspend")), "started": meta.get("creationTimestamp"),
            "restarts": int(status.get("restarts") or 0),
            "max_restarts": (spec.get("failurePolicy") or {}).get("maxRestarts"), "conditions": conditions,
            "unit": "jobs"}


def _pytorchjob_view(obj: dict[str, Any], now: datetime) -> dict[str, Any]:
    """kubeflow.org/v1: conditions (Created, Running, Restarting, Succeeded, Failed, Suspended) and the Worker
    replicas' active/succeeded/failed counts; restarts are counted from the pods (see collect)."""
    status, spec, meta = obj.get("status") or {}, obj.get("spec") or {}, obj.get("metadata") or {}
    conditions = _true_conditions(status, now)
    types = {c["type"] for c in conditions}
    finished = "Complete" if "Succeeded" in types else "Failed" if "Failed" in types else None
    workers = (status.get("replicaStatuses") or {}).get("Worker") or {}
    run_policy, elastic = spec.get("runPolicy") or {}, spec.get("elasticPolicy") or {}
    limit = elastic.get("maxRestarts", run_policy.get("backoffLimit"))
    return {"kind": "PyTorchJob", "name": meta.get("name", ""), "active": int(workers.get("active") or 0),
            "succeeded": int(workers.get("succeeded") or 0), "failed": int(workers.get("failed") or 0),
            "finished": finished, "reason": _reason_of(conditions, "Failed") if finished == "Failed" else None,
            "suspended": "Suspended" in types or bool(run_policy.get("suspend")),
            "started": status.get("startTime") or meta.get("creationTimestamp"), "restarts": None,
            "max_restarts": limit, "conditions": conditions, "unit": "workers"}


def read_logs(kube: Kube, namespace: str, pods: Iterable[PodView], tail: int) -> dict[str, list[LogLine]]:
    """The last ``tail`` lines of each started pod's container (the one ``--follow`` streams too)."""
    out: dict[str, list[LogLine]] = {}
    for view in pods:
        if view.phase == "Pending" or not view.container:
            continue
        try:
            text = kube.log_tail(namespace, view.name, view.container, tail)
        except KubeError as exc:
            log.debug("no log for %s: %s", view.name, exc)
            continue
        out[view.name] = [LogLine(view.name, *split_stamp(line)) for line in text.splitlines()]
    return out


def _checkpoint_from_s3(kube: Kube, namespace: str, pods: list[Any], now: datetime) -> CheckpointView | None:
    """The run's latest.json, when the ConfigMap names an s3:// run and this machine can read it."""
    names = {v.config_map.name for p in pods for v in p.spec.volumes or [] if v.config_map is not None}
    for name in sorted(names):
        data = kube.config_map(namespace, name) or {}
        try:
            config = yaml.safe_load(data.get("config.yaml", "")) or {}
            run = config.get("run") or {}
            run_uri = storage.join(str(run["dir"]), str(run["name"]))
        except (yaml.YAMLError, AttributeError, KeyError, TypeError):
            continue
        if not storage.is_s3(run_uri) or not _have_s3_credentials():
            return None
        latest = storage.join(run_uri, "checkpoints", "latest.json")
        try:
            record = json.loads(storage.read_text(latest, max_bytes=MAX_POINTER_BYTES))
            when = storage.stat(latest).mtime
        except (storage.StorageError, ValueError) as exc:
            log.debug("latest.json not readable: %s", exc)
            return None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            return None
        return CheckpointView(record["step"], storage.join(run_uri, "checkpoints", str(record.get("dir", ""))),
                              _age(when, now), "S3 latest.json")
    return None


def _have_s3_credentials() -> bool:
    import boto3

    return boto3.session.Session().get_credentials() is not None


def collect(kube: Kube, namespace: str, release: str, *, tail: int = 300, hang_after_s: float = 600,
            now: datetime | None = None, read_s3: bool = True) -> tuple[Summary, dict[str, list[LogLine]]]:
    """Everything `trainer watch` shows, from one round of API calls."""
    pods = kube.pods(namespace, selector(release))
    now = now or datetime.now(UTC)
    job = _job_view(kube, namespace, release, now)
    if not pods and job is None:
        raise KubeError(f"no release {release!r} in namespace {namespace}: no Job, JobSet or PyTorchJob and no pods "
                        f"labelled {selector(release)} (check -n and the release name: helm list -A)")
    pods.sort(key=lambda p: (_index(p) if _index(p) is not None else 1 << 30, p.metadata.creation_timestamp))
    views = [_pod_view(p, now) for p in pods]
    newest: dict[int | None, PodView] = {}
    for view in views:
        newest[view.index] = view  # sorted by creation time within an index
    for view in views:
        view.current = newest[view.index] is view
    if job is not None and job["kind"] == "PyTorchJob":  # its pods restart in place (restartPolicy OnFailure)
        job["restarts"] = sum(v.restarts for v in views) + sum(1 for v in views if not v.current)
    current_pods = [p for p, v in zip(pods, views, strict=True) if v.current]
    logs = read_logs(kube, namespace, [view for view in views if view.current], tail)
    summary = Summary(release, namespace, job, views)
    for view in views:
        lines = logs.get(view.name, [])
        stamps = [line.time for line in lines if line.time is not None]
        view.last_log_age_s = _age(max(stamps), now) if stamps else None
        view.ranks = sorted({r for r in (line.rank for line in lines) if r is not None})
    _read_progress(summary, [line for lines in logs.values() for line in lines], now)
    if read_s3:
        from_s3 = _checkpoint_from_s3(kube, namespace, current_pods, now)
        if from_s3 is not None and (summary.checkpoint is None or from_s3.step >= summary.checkpoint.step):
            summary.checkpoint = from_s3
    summary.warnings = warnings(summary, kube, namespace, hang_after_s)
    return summary, logs


def _read_progress(summary: Summary, lines: list[LogLine], now: datetime) -> None:
    """The latest progress, evaluation and checkpoint lines of rank 0."""
    rank0 = sorted((line for line in lines if line.rank == 0),
                   key=lambda line: line.time or _NEVER)
    for line in rank0:
        progress, evaluation, committed = parse_progress(line.text), parse_eval(line.text), parse_checkpoint(line.text)
        if progress is not None:
            summary.progress, summary.progress_age_s = progress, _age(line.time, now)
        if evaluation is not None:
            summary.last_eval = evaluation
        if committed is not None:
            summary.checkpoint = CheckpointView(committed.step, committed.uri, _age(line.time, now), "rank-0 log")


def warnings(summary: Summary, kube: Kube, namespace: str, hang_after_s: float) -> list[str]:
    found: list[str] = _workload_warnings(summary.job)
    current = [v for v in summary.pods if v.current]
    for view in summary.pods:
        if view.last_exit_reason == "OOMKilled":
            found.append(f"{view.name}: OOMKilled (exit {view.last_exit_code}): raise the pod's memory limit "
                         "(resources.limits.memory) or lower data.batch_size / data.workers")
        if view.last_exit_code == 2:
            found.append(f"{view.name}: exit 2, bad config or input: kubectl logs -n {namespace} {view.name}")
    for view in current:
        reason = view.state.split(": ", 1)[-1]
        if reason in IMAGE_PULL_REASONS:
            hint = view.message or "check image and pull secret"
            found.append(f"{view.name}: cannot pull the image ({reason}): {hint}")
        elif reason == "CrashLoopBackOff":
            found.append(f"{view.name}: CrashLoopBackOff: {view.message}")
        elif view.phase == "Pending" and view.state.startswith("unschedulable"):
            events = [e for e in kube.events(namespace, view.name) if e.reason == "FailedScheduling"]
            latest = max(events, key=lambda e: _event_time(e), default=None)
            message = (latest.message if latest is not None else "") or view.message
            found.append(f"{view.name}: Pending, cannot be scheduled: {message}")
    by_index: dict[int | None, list[PodView]] = {}
    for view in summary.pods:
        by_index.setdefault(view.index, []).append(view)
    for index, views in by_index.items():
        replaced = len(views) - 1 + sum(v.restarts for v in views)
        if replaced >= 2:
            last = next((v for v in reversed(views) if v.last_exit_code not in (None, 0)), views[-1])
            found.append(f"pod index {index}: restarted {replaced} times "
                         f"(last exit {last.last_exit_code}: {last.last_exit_meaning or 'unknown'})")
    running = [v for v in current if v.phase == "Running" and v.last_log_age_s is not None]
    if running:
        lively = [v for v in running if v.last_log_age_s is not None and v.last_log_age_s < hang_after_s]
        silent = [v for v in running if v.last_log_age_s is not None and v.last_log_age_s >= hang_after_s]
        for view in silent:
            if lively:
                found.append(f"{view.name}: no log line for {format_duration(view.last_log_age_s or 0)} while "
                             f"{lively[0].name} logged {format_duration(lively[0].last_log_age_s or 0)} ago "
                             "(a hung rank?)")
        if silent and not lively:
            found.append(f"no pod has logged for {format_duration(min(v.last_log_age_s or 0 for v in silent))} "
                         "(every rank hung, or a very slow step)")
    return found


def _workload_warnings(job: dict[str, Any] | None) -> list[str]:
    """What a JobSet's or PyTorchJob's own status says needs a person: restarts used up, restarting, failed."""
    if job is None or job["kind"] == "Job":
        return []
    found = []
    where = f"{job['kind']} {job['name']}"
    by_type = {c["type"]: c for c in job["conditions"]}
    restarts, limit = job["restarts"], job["max_restarts"]
    if job["finished"] is None and restarts and limit is not None:
        left = max(0, int(limit) - restarts)
        found.append(f"{where}: restarted {restarts} of {limit} allowed times" +
                     (" (none left: the next failure fails the run)" if left == 0 else f" ({left} left)"))
    if "Restarting" in by_type and job["finished"] is None:
        condition = by_type["Restarting"]
        reason = condition["reason"] or "Restarting"
        found.append(f"{where}: restarting ({reason}): {condition['message']}".rstrip(": "))
    if job["finished"] == "Failed" and "Failed" in by_type:
        condition = by_type["Failed"]
        found.append(f"{where} failed ({condition['reason'] or 'Failed'}): {condition['message']}".rstrip(": "))
    return found


def _event_time(event: Any) -> datetime:
    when = event.last_timestamp or event.event_time or event.first_timestamp
    return when if isinstance(when, datetime) else _NEVER


# ----------------------------------------------------------------------------------------- render
def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{format_duration(seconds)} ago"


def render(summary: Summary) -> str:
    job = summary.job
    if job is None:
        head = "Job: not found (pods only)"
    else:
        restarting = any(c["type"] == "Restarting" for c in job["conditions"])
        status = job["finished"] or ("Suspended (waiting for admission)" if job["suspended"] else
                                     "Restarting" if restarting else "Running")
        restarts = "" if job["restarts"] is None else f", restarts {job['restarts']}" + (
            "" if job["max_restarts"] is None else f" of {job['max_restarts']}")
        head = (f"{job['kind']} {job['name']}: {status}{restarts}, {job['active']} active, {job['succeeded']} "
                f"succeeded, {job['failed']} failed {job['unit']}" + (f" ({job['reason']})" if job["reason"] else ""))
    lines = [f"release {summary.release} (namespace {summary.namespace}) · {head}"]
    if job is not None and job["conditions"]:
        lines.append("conditions  " + " · ".join(
            f"{c['type']}" + (f" ({c['reason']})" if c["reason"] else "") + (f" {_ago(c['age_s'])}")
            + (f": {c['message']}" if c["message"] and c["type"] in ("Failed", "Restarting", "Suspended") else "")
            for c in job["conditions"]))
    p = summary.progress
    if p is not None:
        done = ((p.epoch - 1) * p.steps + p.step) / max(1, p.epochs * p.steps)
        terms = ", ".join(f"{k} {v:.4f}" for k, v in p.terms.items())
        memory = f" · mem {p.max_mem_gb:.2f}G" if p.max_mem_gb is not None else ""
        lines.append(f"progress    epoch {p.epoch}/{p.epochs} step {p.step}/{p.steps} ({done:.1%} of the run) · "
                     f"loss {p.loss:.4f} ({terms}) · lr {p.lr:.6g} · {p.images_per_s:.1f} img/s · "
                     f"ETA {format_duration(p.eta_s)}{memory} · {_ago(summary.progress_age_s)}")
    else:
        lines.append("progress    no progress line yet")
    e = summary.last_eval
    lines.append(f"last eval   epoch {e.epoch}: AP {e.ap:.4f} AP50 {e.ap50:.4f} AP75 {e.ap75:.4f}" if e else
                 "last eval   none yet")
    c = summary.checkpoint
    lines.append(f"checkpoint  step {c.step}, {_ago(c.age_s)} ({c.uri}, from {c.source})" if c else
                 "checkpoint  none seen yet")
    lines.append("")
    header = ("POD", "IDX", "PHASE", "NODE", "RESTARTS", "STATE", "LAST EXIT", "AGE", "LAST LOG")
    rows = [header]
    for v in summary.pods:
        last_exit = "-" if v.last_exit_code is None else f"{v.last_exit_code} {v.last_exit_meaning}".strip()
        rows.append((v.name + ("" if v.current else " (replaced)"), "-" if v.index is None else str(v.index),
                     v.phase, v.node or "-", str(v.restarts), v.state, last_exit, format_duration(v.age_s),
                     _ago(v.last_log_age_s)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if summary.warnings:
        lines += ["", "warnings"] + [f"  ! {text}" for text in summary.warnings]
    return "\n".join(lines)


def merged(logs: dict[str, list[LogLine]], only_rank0: bool) -> list[str]:
    """Every pod's lines in time order, each prefixed with [pod/rank N] (kubectl logs --prefix over all pods)."""
    lines = [line for pod_lines in logs.values() for line in pod_lines if not only_rank0 or line.rank == 0]
    lines.sort(key=lambda line: line.time or _NEVER)
    return [line.prefixed() for line in lines]


# ----------------------------------------------------------------------------------------- follow
class LogFollower:
    """One thread per current pod, streaming its log; a pod replaced by a new one gets a new stream."""

    MAX_REOPEN = 1000  # per pod: a stream that ends while the pod still runs is reopened, within reason

    def __init__(self, kube: Kube, namespace: str, only_rank0: bool, seen: dict[str, datetime | None]) -> None:
        self.kube, self.namespace, self.only_rank0 = kube, namespace, only_rank0
        self.lines: queue.Queue[LogLine] = queue.Queue()
        self.seen = seen  # pod -> time of the last line already shown
        self.threads: dict[str, threading.Thread] = {}
        self.running: set[str] = set()  # pods whose stream is reopened when it ends
        self.stop = threading.Event()

    def track(self, pods: Iterable[PodView]) -> None:
        self.running = {view.name for view in pods if view.current and view.phase == "Running"}
        for view in pods:
            if view.current and view.phase in ("Running", "Succeeded", "Failed") and view.name not in self.threads:
                thread = threading.Thread(target=self._stream, args=(view.name, view.container), daemon=True)
                self.threads[view.name] = thread
                thread.start()

    def _stream(self, pod: str, container: str) -> None:
        for _ in range(self.MAX_REOPEN):
            if self.stop.is_set():
                return
            try:
                for raw in self.kube.follow_log(self.namespace, pod, container):
                    when, text = split_stamp(raw)
                    last = self.seen.get(pod)
                    if when is not None and last is not None and when <= last:
                        continue  # already shown (a reopened stream starts from the beginning)
                    self.seen[pod] = when or last
                    line = LogLine(pod, when, text)
                    if not self.only_rank0 or line.rank == 0:
                        self.lines.put(line)
                    if self.stop.is_set():
                        return
            except KubeError:
                return  # the pod is gone
            if pod not in self.running:
                return  # it ended (or was replaced): its log is complete
            self.stop.wait(2.0)

    def drain(self) -> list[LogLine]:
        out = []
        while True:
            try:
                out.append(self.lines.get_nowait())
            except queue.Empty:
                return out


def watch(kube: Kube, namespace: str, release: str, *, follow: bool, logs_mode: str, as_json: bool,
          interval_s: float, hang_after_s: float, out: TextIO = sys.stdout, max_seconds: float | None = None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Print one summary (or refresh it until the Job ends with --follow). Exit 0, or 1 if the Job failed."""
    summary, logs = collect(kube, namespace, release, hang_after_s=hang_after_s)
    if logs_mode != "none" and not as_json:
        for line in merged(logs, logs_mode == "rank0"):
            print(line, file=out)
    _emit(summary, as_json, out)
    if not follow:
        return 1 if summary.finished == "Failed" else 0
    seen = {pod: max((entry.time for entry in lines if entry.time), default=None) for pod, lines in logs.items()}
    follower = LogFollower(kube, namespace, logs_mode == "rank0", seen) if logs_mode != "none" else None
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    try:
        while summary.finished is None and (deadline is None or time.monotonic() < deadline):
            if follower is not None:
                follower.track(summary.pods)
            sleep(interval_s)
            if follower is not None:
                for entry in follower.drain():
                    print(entry.prefixed(), file=out, flush=True)
            summary, _ = collect(kube, namespace, release, hang_after_s=hang_after_s, tail=50)
            _emit(summary, as_json, out, brief=follower is not None)
    finally:
        if follower is not None:
            follower.stop.set()
    return 1 if summary.finished == "Failed" else 0


def _emit(summary: Summary, as_json: bool, out: TextIO, brief: bool = False) -> None:
    if as_json:
        print(json.dumps(summary.to_json(), default=str), file=out, flush=True)
    elif brief:
        p = summary.progress
        where = f"epoch {p.epoch}/{p.epochs} step {p.step}/{p.steps} · ETA {format_duration(p.eta_s)}" if p else "-"
        running = sum(1 for v in summary.pods if v.current and v.phase == "Running")
        current = sum(1 for v in summary.pods if v.current)
        print(f"── {summary.release}: {where} · {running}/{current} pods running"
              + (f" · {len(summary.warnings)} warning(s): {summary.warnings[0]}" if summary.warnings else ""),
              file=out, flush=True)
    else:
        print(render(summary), file=out, flush=True)
        print("", file=out, flush=True)
