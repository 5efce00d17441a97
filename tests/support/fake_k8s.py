"""A small stand-in for the Kubernetes API on 127.0.0.1: the calls `trainer watch` makes, with bodies shaped like
the API's documented JSON (PodList, JobList, EventList, ConfigMap, pod logs as text, followed logs streamed).

A scenario describes pods (phase, container state, restarts, log lines as seconds-ago + text), the Job, or a
JobSet (jobset.x-k8s.io/v1alpha2) or PyTorchJob (kubeflow.org/v1) served as custom objects, and the events;
times are rendered relative to the moment of each request (log lines: to when the scenario was made),
so the tests do not depend on the clock.
The kubernetes client deserialises every body into its typed models, which checks their shape.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

TOKEN = "test-token"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def stamp(now: datetime, seconds_ago: float) -> str:
    return (now - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def log_stamp(now: datetime, seconds_ago: float) -> str:
    return (now - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


@dataclass
class FakePod:
    name: str
    index: int
    phase: str = "Running"
    node: str | None = "gpu-node-a"
    age_s: float = 3600
    state: dict[str, Any] | None = None  # e.g. {"running": {}} | {"waiting": {...}} | {"terminated": {...}}
    last_state: dict[str, Any] | None = None
    restarts: int = 0
    logs: list[tuple[float, str]] = field(default_factory=list)  # (seconds ago, line)
    live: list[str] = field(default_factory=list)  # lines a followed log sends, one every 0.05 s
    unschedulable: str | None = None  # the PodScheduled=False message
    index_label: str = INDEX_LABEL  # a PyTorchJob's pods: training.kubeflow.org/replica-index
    container: str = "trainer"  # a PyTorchJob's container: pytorch

    def to_json(self, release: str, namespace: str, now: datetime) -> dict[str, Any]:
        state = self.state if self.state is not None else (
            {"running": {"startedAt": stamp(now, self.age_s)}} if self.phase == "Running" else
            {"waiting": {"reason": "ContainerCreating"}})
        statuses = [] if self.unschedulable else [{
            "name": self.container, "state": state, "lastState": self.last_state or {},
            "ready": self.phase == "Running",
            "restartCount": self.restarts, "image": "registry.example.com/ml/trainer:0.1.0",
            "imageID": "", "containerID": "containerd://abc" if self.phase != "Pending" else None,
            "started": self.phase == "Running"}]
        conditions = [{"type": "PodScheduled", "status": "False" if self.unschedulable else "True",
                       "reason": "Unschedulable" if self.unschedulable else None, "message": self.unschedulable,
                       "lastProbeTime": None, "lastTransitionTime": stamp(now, self.age_s)}]
        return {
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": self.name, "namespace": namespace, "uid": f"uid-{self.name}", "resourceVersion": "7",
                         "creationTimestamp": stamp(now, self.age_s),
                         "labels": {"app.kubernetes.io/instance": release, "app.kubernetes.io/name": "train",
                                    "app.kubernetes.io/component": "worker", self.index_label: str(self.index),
                                    "job-name": release}},
            "spec": {"containers": [{"name": self.container, "image": "registry.example.com/ml/trainer:0.1.0"}],
                     "nodeName": None if self.unschedulable else self.node, "restartPolicy": "Never",
                     "volumes": [{"name": "config", "configMap": {"name": f"{release}-config"}}]},
            "status": {"phase": self.phase, "conditions": conditions, "containerStatuses": statuses,
                       "podIP": None if self.phase == "Pending" else f"10.0.0.{self.index + 10}",
                       "startTime": stamp(now, self.age_s), "qosClass": "Burstable"},
        }


@dataclass
class Scenario:
    release: str = "train"
    namespace: str = "ml"
    pods: list[FakePod] = field(default_factory=list)
    job: dict[str, Any] | None = field(default_factory=lambda: {"active": 2})  # status fields; None: no Job
    events: list[dict[str, Any]] = field(default_factory=list)  # {"pod", "reason", "message", "seconds_ago"}
    # a JobSet or PyTorchJob release (set job=None): {"spec": {...}, "status": {...}}, condition times given as
    # "seconds_ago"; None: the cluster does not serve the kind (404, as without its CRD)
    jobset: dict[str, Any] | None = None
    pytorchjob: dict[str, Any] | None = None
    config_yaml: str = "run: {name: train, dir: s3://bucket/runs}\n"
    # called before each request: lets a test change the scenario as "time" passes (pods recreated, Job ends)
    on_request: Callable[[Scenario, str], None] | None = None
    requests: list[str] = field(default_factory=list)
    # log lines are stamped relative to this moment, once, as a kubelet stamps each line when it is written
    logs_written: datetime = field(default_factory=lambda: datetime.now(UTC))


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # http.server's naming
        scenario = self.server.scenario
        scenario.requests.append(self.path)
        if scenario.on_request is not None:
            scenario.on_request(scenario, self.path)
        token = self.headers.get("Authorization", "")
        if token != f"Bearer {TOKEN}":
            status = 403 if token == "Bearer read-nothing" else 401
            return self._failure(status, "Forbidden" if status == 403 else "Unauthorized",
                                 "forbidden" if status == 403 else "Unauthorized")
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = url.path.strip("/").split("/")
        now = datetime.now(UTC)
        ns = scenario.namespace
        if parts[:4] == ["api", "v1", "namespaces", ns] and parts[4:] == ["pods"]:
            items = [p.to_json(scenario.release, ns, now) for p in scenario.pods]
            items = [i for i in items if _matches(i["metadata"]["labels"], query.get("labelSelector", ""))]
            return self._json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
                                    "items": items})
        if (parts[:4] == ["api", "v1", "namespaces", ns] and len(parts) == 7 and parts[4] == "pods"
                and parts[6] == "log"):
            pod = next((p for p in scenario.pods if p.name == parts[5]), None)
            if pod is None:
                return self._failure(404, "NotFound", f'pods "{parts[5]}" not found')
            return self._log(pod, query, scenario.logs_written)
        if parts[:4] == ["apis", "batch", "v1", "namespaces"] and parts[4:] == [ns, "jobs"]:
            items = [] if scenario.job is None else [_job(scenario, now)]
            items = [i for i in items if _matches(i["metadata"]["labels"], query.get("labelSelector", ""))]
            return self._json(200, {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {"resourceVersion": "7"},
                                    "items": items})
        for group, version, plural, kind, obj in (("jobset.x-k8s.io", "v1alpha2", "jobsets", "JobSet", scenario.jobset),
                                                  ("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob",
                                                   scenario.pytorchjob)):
            if parts[:3] == ["apis", group, version] and parts[3:] == ["namespaces", ns, plural] and obj is not None:
                items = [_custom(scenario, kind, f"{group}/{version}", obj, now)]
                items = [i for i in items if _matches(i["metadata"]["labels"], query.get("labelSelector", ""))]
                return self._json(200, {"kind": f"{kind}List", "apiVersion": f"{group}/{version}",
                                        "metadata": {"resourceVersion": "7"}, "items": items})
        if parts[:4] == ["api", "v1", "namespaces", ns] and parts[4:] == ["events"]:
            wanted = query.get("fieldSelector", "").removeprefix("involvedObject.name=")
            items = [_event(e, ns, now) for e in scenario.events if e["pod"] == wanted]
            return self._json(200, {"kind": "EventList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
                                    "items": items})
        if parts[:4] == ["api", "v1", "namespaces", ns] and parts[4] == "configmaps" and len(parts) == 6:
            if parts[5] != f"{scenario.release}-config":
                return self._failure(404, "NotFound", f'configmaps "{parts[5]}" not found')
            return self._json(200, {"kind": "ConfigMap", "apiVersion": "v1",
                                    "metadata": {"name": parts[5], "namespace": ns},
                                    "data": {"config.yaml": scenario.config_yaml}})
        if parts[:3] == ["api", "v1", "namespaces"] and parts[3] != ns:
            # another namespace: empty lists, as a real cluster answers for a namespace without the release
            kind = {"pods": "PodList", "events": "EventList"}.get(parts[-1], "List")
            return self._json(200, {"kind": kind, "apiVersion": "v1", "metadata": {}, "items": []})
        if parts[:4] == ["apis", "batch", "v1", "namespaces"]:
            return self._json(200, {"kind": "JobList", "apiVersion": "batch/v1", "metadata": {}, "items": []})
        return self._failure(404, "NotFound", "the server could not find the requested resource")

    def _failure(self, code: int, reason: str, message: str) -> None:
        """A failed request, as the API server answers it: a Status object."""
        self._json(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                          "message": message, "reason": reason, "code": code})

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _log(self, pod: FakePod, query: dict[str, str], now: datetime) -> None:
        with_stamps = query.get("timestamps", "").lower() == "true"  # the API server parses booleans like Go
        lines = [f"{log_stamp(now, ago)} {text}" if with_stamps else text for ago, text in pod.logs]
        if "tailLines" in query:
            lines = lines[-int(query["tailLines"]):] if int(query["tailLines"]) else []
        if query.get("follow", "").lower() != "true":
            data = "".join(line + "\n" for line in lines).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        # a followed log: what is there, then the live lines as they "happen", then the stream ends
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in lines + [f"{log_stamp(datetime.now(UTC), 0)} {text}" if with_stamps else text
                             for text in pod.live]:
            chunk = (line + "\n").encode()
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()
            time.sleep(0.05)
        self.wfile.write(b"0\r\n\r\n")


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _job(scenario: Scenario, now: datetime) -> dict[str, Any]:
    status = dict(scenario.job or {})
    conditions = status.pop("conditions", [])
    return {
        "kind": "Job", "apiVersion": "batch/v1",
        "metadata": {"name": scenario.release, "namespace": scenario.namespace, "uid": "job-uid",
                     "creationTimestamp": stamp(now, 7200),
                     "labels": {"app.kubernetes.io/instance": scenario.release, "app.kubernetes.io/name": "train"}},
        "spec": {"completions": 2, "parallelism": 2, "completionMode": "Indexed", "backoffLimit": 6,
                 "template": {"metadata": {}, "spec": {"containers": [{"name": "trainer"}]}}},
        "status": {"startTime": stamp(now, 7200), "conditions": [
            {"type": c["type"], "status": "True", "reason": c.get("reason"), "message": c.get("message"),
             "lastProbeTime": stamp(now, 1), "lastTransitionTime": stamp(now, 1)} for c in conditions], **status},
    }


def _custom(scenario: Scenario, kind: str, api_version: str, obj: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A JobSet or PyTorchJob as the API returns it; each condition's seconds_ago becomes its transition time."""
    status = dict(obj.get("status") or {})
    status["conditions"] = [
        {"status": "True", "lastTransitionTime": stamp(now, c.get("seconds_ago", 60)),
         "lastUpdateTime": stamp(now, c.get("seconds_ago", 60)), **{k: v for k, v in c.items() if k != "seconds_ago"}}
        for c in status.get("conditions", [])]
    return {"kind": kind, "apiVersion": api_version,
            "metadata": {"name": scenario.release, "namespace": scenario.namespace, "uid": f"{kind.lower()}-uid",
                         "creationTimestamp": stamp(now, 7200),
                         "labels": {"app.kubernetes.io/instance": scenario.release, "app.kubernetes.io/name": "train"}},
            "spec": obj.get("spec") or {}, "status": status}


def _event(event: dict[str, Any], namespace: str, now: datetime) -> dict[str, Any]:
    return {"kind": "Event", "apiVersion": "v1",
            "metadata": {"name": f"{event['pod']}.{event['reason'].lower()}", "namespace": namespace},
            "involvedObject": {"kind": "Pod", "name": event["pod"], "namespace": namespace},
            "reason": event["reason"], "message": event["message"], "type": "Warning", "count": 3,
            "firstTimestamp": stamp(now, event.get("seconds_ago", 60) + 120),
            "lastTimestamp": stamp(now, event.get("seconds_ago", 60)), "source": {"component": "default-scheduler"}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, scenario: Scenario) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.scenario = scenario


@contextmanager
def fake_cluster(scenario: Scenario, kubeconfig: Path, token: str = TOKEN) -> Iterator[str]:
    """Serve the scenario on 127.0.0.1 and write a kubeconfig for it; yields the server URL."""
    server = _Server(scenario)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "tester", "user": {"token": token}}],
        "contexts": [{"name": "fake",
                      "context": {"cluster": "fake", "user": "tester", "namespace": scenario.namespace}},
                     {"name": "other", "context": {"cluster": "fake", "user": "tester", "namespace": "elsewhere"}}],
    }))
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
