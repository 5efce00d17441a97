"""`trainer watch` against a stand-in Kubernetes API on 127.0.0.1 (tests/support/fake_k8s.py), driven by scenarios:
a healthy run, a restart, OOMKilled, a pending pod, a hung rank, an image pull error, a run that ends while it is
followed, and every way of not being able to ask the cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, S3Env
from tests.support.fake_k8s import FakePod, Scenario, fake_cluster
from trainer.progress import ProgressLine, format_checkpoint, format_eval, format_progress

CKPT = "s3://bucket/runs/train/checkpoints/step-000001100"


def line(rank: int | None, text: str, level: str = "INFO ") -> str:
    return f"2026-11-24 10:00:00 {level} {'' if rank is None else f'[rank {rank}] '}{text}"


def progress(step: int, rank: int = 0) -> str:
    return line(rank, format_progress(ProgressLine(3, 24, step, 500, 0.8123, {"loss_classifier": 0.21,
                                                                              "loss_box_reg": 0.3}, 0.02, 142.3,
                                                   0.04, 3 * 3600 + 25 * 60, 21.4)))


def training_logs(rank: int, newest_s: float = 3) -> list[tuple[float, str]]:
    """What a rank prints (rank 0: progress, evaluation, checkpoints), the newest line newest_s seconds ago."""
    if rank != 0:
        return [(newest_s + 600, line(rank, "joined process group: rank 1 of 2 (local 0 of 1), backend nccl")),
                (newest_s + 1, line(rank, "loader: 142.3 images/s"))]
    return [
        (newest_s + 900, line(None, "trainer-launch (node 0): starting")),
        (newest_s + 700, line(0, format_eval(2, {"AP": 0.312, "AP50": 0.575, "AP75": 0.301}, "best AP so far",
                                             {"RBC": 0.376, "WBC": 0.615}))),
        (newest_s + 300, line(0, format_checkpoint(CKPT, 331.2, 2.4))),
        (newest_s + 60, progress(100)),
        (newest_s, progress(120)),
    ]


def healthy() -> Scenario:
    return Scenario(pods=[FakePod("train-0-x7k2p", 0, node="gpu-node-a", logs=training_logs(0)),
                          FakePod("train-1-m9q4z", 1, node="gpu-node-b", logs=training_logs(1))])


def watch(kubeconfig: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "KUBECONFIG": str(kubeconfig), **(env or {})}
    return subprocess.run([sys.executable, "-m", "trainer", "watch", *args], capture_output=True, text=True,
                          cwd=REPO, env=full_env, timeout=timeout)


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    return tmp_path / "kubeconfig"


@pytest.fixture
def cluster(kubeconfig: Path) -> Iterator[Scenario]:
    """A healthy scenario served; tests may edit it before calling `trainer watch`."""
    scenario = healthy()
    with fake_cluster(scenario, kubeconfig):
        yield scenario


def test_healthy_run_shows_progress_eval_checkpoint_and_every_pod(cluster: Scenario, kubeconfig: Path) -> None:
    result = watch(kubeconfig, "train")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "release train (namespace ml) · Job train: Running, 2 active, 0 succeeded, 0 failed pods" in out
    # (ages: the log lines were stamped when the scenario was made, a second or two before the command ran)
    assert re.search(r"epoch 3/24 step 120/500 \(9\.3% of the run\) · loss 0\.8123 \(loss_classifier 0\.2100, "
                     r"loss_box_reg 0\.3000\) · lr 0\.02 · 142\.3 img/s · ETA 3:25:00 · mem 21\.40G · "
                     r"0:00:0\d ago", out)
    assert "last eval   epoch 2: AP 0.3120 AP50 0.5750 AP75 0.3010" in out
    assert re.search(rf"checkpoint  step 1100, 0:05:0\d ago \({CKPT}, from rank-0 log\)", out)
    rows = [row.split() for row in out.splitlines() if row.startswith("train-")]
    assert [row[:5] for row in rows] == [["train-0-x7k2p", "0", "Running", "gpu-node-a", "0"],
                                         ["train-1-m9q4z", "1", "Running", "gpu-node-b", "0"]]
    assert "warnings" not in out and "Traceback" not in result.stderr
    # the pods were found by the chart's labels, the same selector NOTES.txt gives kubectl logs
    assert any("labelSelector=app.kubernetes.io%2Finstance%3Dtrain%2Capp.kubernetes.io%2Fcomponent%3Dworker" in r
               for r in cluster.requests)
    print(out)  # docs/monitoring.md shows this output


def test_json_has_the_same_facts(cluster: Scenario, kubeconfig: Path) -> None:
    result = watch(kubeconfig, "train", "--json")
    data = json.loads(result.stdout)
    assert data["progress"]["step"] == 120 and data["progress"]["fraction"] == round(1120 / 12000, 4)
    assert data["last_eval"]["ap50"] == 0.575 and data["checkpoint"]["step"] == 1100
    assert [p["name"] for p in data["pods"]] == ["train-0-x7k2p", "train-1-m9q4z"] and data["warnings"] == []
    assert data["job"]["finished"] is None and 2.5 <= data["pods"][0]["last_log_age_s"] < 10


def test_logs_all_merges_the_pods_in_time_order_with_prefixes(cluster: Scenario, kubeconfig: Path) -> None:
    result = watch(kubeconfig, "train", "--logs", "all")
    merged = [row for row in result.stdout.splitlines() if row.startswith("[train-")]
    assert [row.split("] ", 1)[0] + "]" for row in merged] == [
        "[train-0-x7k2p]",  # no rank tag: the torchrun agent's own line
        "[train-0-x7k2p/rank 0]", "[train-1-m9q4z/rank 1]", "[train-0-x7k2p/rank 0]", "[train-0-x7k2p/rank 0]",
        "[train-1-m9q4z/rank 1]", "[train-0-x7k2p/rank 0]"]  # in time order across the pods
    assert "joined process group" in merged[2] and "step 120/500" in merged[-1]
    rank0 = watch(kubeconfig, "train", "--logs", "rank0")
    assert all("/rank 0]" in row for row in rank0.stdout.splitlines() if row.startswith("[train-"))


def test_a_replaced_pod_and_repeated_restarts(cluster: Scenario, kubeconfig: Path) -> None:
    failed = {"terminated": {"exitCode": 1, "reason": "Error", "startedAt": None, "finishedAt": None}}
    cluster.pods[1:] = [FakePod("train-1-aaaaa", 1, phase="Failed", age_s=5000, state=failed),
                        FakePod("train-1-bbbbb", 1, phase="Failed", age_s=3000, state=failed),
                        FakePod("train-1-ccccc", 1, age_s=600, logs=training_logs(1))]
    cluster.job = {"active": 2, "failed": 2}
    out = watch(kubeconfig, "train").stdout
    assert "train-1-aaaaa (replaced)" in out and "train-1-ccccc " in out
    assert "1 crashed" in out  # the last exit of a replaced pod, in the trainer's terms
    assert "pod index 1: restarted 2 times (last exit 1: crashed)" in out


def test_oom_killed(cluster: Scenario, kubeconfig: Path) -> None:
    cluster.pods[1:] = [FakePod("train-1-aaaaa", 1, phase="Failed", age_s=900, state={
        "terminated": {"exitCode": 137, "reason": "OOMKilled"}}), FakePod("train-1-bbbbb", 1, age_s=60,
                                                                        logs=training_logs(1))]
    out = watch(kubeconfig, "train").stdout
    assert "137 out of memory (OOMKilled)" in out
    assert "train-1-aaaaa: OOMKilled (exit 137): raise the pod's memory limit" in out


def test_pending_pod_shows_the_schedulers_reason(cluster: Scenario, kubeconfig: Path) -> None:
    message = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available."
    cluster.pods[1] = FakePod("train-1-m9q4z", 1, phase="Pending", age_s=300, unschedulable=message)
    cluster.events = [{"pod": "train-1-m9q4z", "reason": "FailedScheduling", "message": message}]
    out = watch(kubeconfig, "train").stdout
    assert f"train-1-m9q4z: Pending, cannot be scheduled: {message}" in out
    assert "unschedulable: Unschedulable" in out


def test_a_silent_rank_while_the_other_progresses_is_a_hang(cluster: Scenario, kubeconfig: Path) -> None:
    cluster.pods[1].logs = training_logs(1, newest_s=900)
    out = watch(kubeconfig, "train", "--hang-after", "300").stdout
    assert re.search(r"train-1-m9q4z: no log line for 0:15:0\d while train-0-x7k2p logged 0:00:0\d ago "
                     r"\(a hung rank\?\)", out)
    assert "hung" not in watch(kubeconfig, "train", "--hang-after", "1200").stdout


def test_image_pull_errors(cluster: Scenario, kubeconfig: Path) -> None:
    cluster.pods[1] = FakePod("train-1-m9q4z", 1, phase="Pending", age_s=120, state={"waiting": {
        "reason": "ImagePullBackOff", "message": 'Back-off pulling image "registry.example.com/ml/trainer:0.1.0"'}})
    out = watch(kubeconfig, "train").stdout
    assert ('train-1-m9q4z: cannot pull the image (ImagePullBackOff): Back-off pulling image '
            '"registry.example.com/ml/trainer:0.1.0"') in out


def test_follow_streams_logs_across_a_recreated_pod_until_the_job_ends(kubeconfig: Path) -> None:
    scenario = healthy()
    scenario.pods[0].live = [line(0, "checkpoint step 121: saved")]
    lists = {"count": 0}

    def as_time_passes(s: Scenario, path: str) -> None:
        if "/pods?" not in path:
            return
        lists["count"] += 1
        if lists["count"] == 3:  # pod 1 dies and is replaced
            s.pods[1] = FakePod("train-1-new01", 1, age_s=5, logs=[(1, line(1, "resumed from " + CKPT))],
                                live=[line(1, "replacement pod streaming")])
            s.job = {"active": 2, "failed": 1}
        if lists["count"] == 6:
            s.job = {"succeeded": 2, "conditions": [{"type": "Complete"}]}
    scenario.on_request = as_time_passes
    with fake_cluster(scenario, kubeconfig):
        result = watch(kubeconfig, "train", "--follow", "--logs", "all", "--interval", "0.3", timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[train-0-x7k2p/rank 0] 2026-11-24 10:00:00 INFO  [rank 0] checkpoint step 121: saved" in out
    assert "[train-1-new01/rank 1]" in out and "replacement pod streaming" in out
    shown = [row for row in out.splitlines() if row.startswith("[train-0-x7k2p/rank 0]")]
    assert sum("step 120/500" in row for row in shown) == 1  # the tail once, not again from the followed stream
    assert out.rstrip().splitlines()[-1].startswith("── train:")


def test_follow_exits_1_when_the_job_fails(kubeconfig: Path) -> None:
    scenario = healthy()
    scenario.job = {"failed": 3, "conditions": [{"type": "Failed", "reason": "PodFailurePolicy"}]}
    with fake_cluster(scenario, kubeconfig):
        result = watch(kubeconfig, "train", "--follow", "--interval", "0.2")
    assert result.returncode == 1 and "Job train: Failed" in result.stdout and "(PodFailurePolicy)" in result.stdout


def test_checkpoint_from_s3_when_credentials_work(kubeconfig: Path, s3: S3Env) -> None:
    scenario = healthy()
    scenario.config_yaml = f"run: {{name: train, dir: {s3.uri('runs')}}}\n"
    s3.client.put_object(Bucket=s3.bucket, Key="runs/train/checkpoints/latest.json",
                         Body=json.dumps({"step": 1700, "dir": "step-000001700"}).encode())
    with fake_cluster(scenario, kubeconfig):
        out = watch(kubeconfig, "train", env=s3.server.client_env()).stdout
    assert "checkpoint  step 1700, 0:00:0" in out and f"{s3.uri('runs/train/checkpoints/step-000001700')}" in out
    assert "from S3 latest.json" in out


@pytest.mark.parametrize("case", ["no kubeconfig", "unreachable", "forbidden", "unauthorized", "no release",
                                  "bad context"])
def test_errors_are_one_clear_line(case: str, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    token = {"forbidden": "read-nothing", "unauthorized": "stale"}.get(case, "test-token")
    with fake_cluster(healthy(), kubeconfig, token=token) as url:
        args = ["train"]
        if case == "no release":
            args = ["nothing-here"]
        if case == "bad context":
            args += ["--context", "prod"]
        if case == "unreachable":
            kubeconfig.write_text(kubeconfig.read_text().replace(url, "http://127.0.0.1:9"))
        if case == "no kubeconfig":
            kubeconfig = tmp_path / "missing"
        result = watch(kubeconfig, *args)
    expected = {"no kubeconfig": "no kubeconfig found", "unreachable": "cannot reach the Kubernetes API",
                "forbidden": "no permission to list pods in namespace ml (403 Forbidden)",
                "unauthorized": "rejected the credentials (401)", "no release": "no release 'nothing-here'",
                "bad context": "prod"}[case]
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("trainer: error: ") and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_namespace_from_the_context_and_from_the_flag(cluster: Scenario, kubeconfig: Path) -> None:
    assert watch(kubeconfig, "train").returncode == 0  # the context's namespace is ml
    elsewhere = watch(kubeconfig, "train", "--context", "other")
    assert elsewhere.returncode == 1 and "in namespace elsewhere" in elsewhere.stderr
    assert watch(kubeconfig, "train", "--context", "other", "-n", "ml").returncode == 0


def test_docs_show_this_output(cluster: Scenario, kubeconfig: Path) -> None:
    """docs/monitoring.md's example is the healthy scenario's real output (ages aside)."""
    page = (REPO / "docs" / "monitoring.md").read_text()
    block = page.split("$ trainer watch train -n ml\n", 1)[1].split("```", 1)[0].rstrip("\n")
    out = watch(kubeconfig, "train", "-n", "ml").stdout.rstrip("\n")

    def ages(text: str) -> str:  # ages and pod ages move with the clock; the rest must be identical
        return re.sub(r"1:00:0\d  ", "<pod age>  ", re.sub(r"\d+:\d\d:\d\d ago", "<age> ago", text))
    assert ages(block) == ages(out)


def test_several_kubeconfig_files_merge_like_kubectl(cluster: Scenario, kubeconfig: Path, tmp_path: Path) -> None:
    """KUBECONFIG=a:b: a missing file is skipped and contexts from every file are usable."""
    other = tmp_path / "other-kubeconfig"
    other.write_text(json.dumps({"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [],
                                 "contexts": [{"name": "staging", "context": {"cluster": "fake", "user": "tester",
                                                                              "namespace": "ml"}}]}))
    paths = os.pathsep.join([str(tmp_path / "missing"), str(kubeconfig), str(other)])
    assert watch(kubeconfig, "train", "--context", "staging", env={"KUBECONFIG": paths}).returncode == 0


# ------------------------------------------------------------------- JobSet and PyTorchJob: their own status
def jobset_release(status: dict[str, object]) -> Scenario:
    """The chart with workload: JobSet: pods <release>-node-0-<index>-xxxxx, no batch Job with the release's labels
    (the JobSet controller labels its child Jobs with its own names)."""
    return Scenario(job=None, jobset={"spec": {"failurePolicy": {"maxRestarts": 3}}, "status": status},
                    pods=[FakePod("train-node-0-0-x7k2p", 0, logs=training_logs(0)),
                          FakePod("train-node-0-1-m9q4z", 1, node="gpu-node-b", logs=training_logs(1))])


def pytorchjob_release(status: dict[str, object], restarts: int = 0) -> Scenario:
    """The chart with workload: PyTorchJob: pods <release>-worker-<index>, container `pytorch`, restarted in place."""
    index = "training.kubeflow.org/replica-index"
    return Scenario(job=None, pytorchjob={"spec": {"elasticPolicy": {"maxRestarts": 3},
                                                   "runPolicy": {"backoffLimit": 6}}, "status": status},
                    pods=[FakePod("train-worker-0", 0, logs=training_logs(0), index_label=index, container="pytorch",
                                  restarts=restarts),
                          FakePod("train-worker-1", 1, node="gpu-node-b", logs=training_logs(1), index_label=index,
                                  container="pytorch")])


def test_a_jobset_shows_its_restarts_and_conditions(kubeconfig: Path) -> None:
    scenario = jobset_release({
        "restarts": 2, "replicatedJobsStatus": [{"name": "node", "ready": 1, "active": 1, "succeeded": 0,
                                                 "failed": 0, "suspended": 0}],
        "conditions": [{"type": "StartupPolicyCompleted", "reason": "AllReplicatedJobsStarted",
                        "message": "all replicated jobs have started", "seconds_ago": 300}]})
    with fake_cluster(scenario, kubeconfig):
        result = watch(kubeconfig, "train")
        data = json.loads(watch(kubeconfig, "train", "--json").stdout)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "release train (namespace ml) · JobSet train: Running, restarts 2 of 3, 1 active, 0 succeeded, " \
           "0 failed jobs" in out
    assert re.search(r"conditions  StartupPolicyCompleted \(AllReplicatedJobsStarted\) 0:05:0\d ago", out)
    assert "JobSet train: restarted 2 of 3 allowed times (1 left)" in out
    assert "epoch 3/24 step 120/500" in out  # the pods' progress as for a Job
    assert data["job"]["kind"] == "JobSet" and data["job"]["restarts"] == 2 and data["job"]["max_restarts"] == 3
    assert any("/apis/jobset.x-k8s.io/v1alpha2/namespaces/ml/jobsets" in r for r in scenario.requests)


def test_a_failed_jobset_says_why_and_exits_1(kubeconfig: Path) -> None:
    scenario = jobset_release({
        "restarts": 3, "terminalState": "Failed",
        "replicatedJobsStatus": [{"name": "node", "active": 0, "succeeded": 0, "failed": 1}],
        "conditions": [{"type": "Failed", "reason": "FailedJobs", "seconds_ago": 20,
                        "message": "jobset failed due to reaching max number of restarts"}]})
    with fake_cluster(scenario, kubeconfig):
        result = watch(kubeconfig, "train", "--follow", "--interval", "0.2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "JobSet train: Failed, restarts 3 of 3, 0 active, 0 succeeded, 1 failed jobs (FailedJobs)" in result.stdout
    assert "JobSet train failed (FailedJobs): jobset failed due to reaching max number of restarts" in result.stdout


def test_a_pytorchjob_shows_its_conditions_and_restarts(kubeconfig: Path) -> None:
    message = "PyTorchJob train is restarting because 1 Worker replica(s) failed."
    scenario = pytorchjob_release({
        "replicaStatuses": {"Worker": {"active": 2, "failed": 0}},
        "conditions": [{"type": "Created", "reason": "PyTorchJobCreated", "seconds_ago": 7000},
                       {"type": "Restarting", "reason": "PyTorchJobRestarting", "message": message,
                        "seconds_ago": 30}]}, restarts=1)
    with fake_cluster(scenario, kubeconfig):
        result = watch(kubeconfig, "train")
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "PyTorchJob train: Restarting, restarts 1 of 3, 2 active, 0 succeeded, 0 failed workers" in out
    assert re.search(r"conditions  Created \(PyTorchJobCreated\) 1:56:4\d ago · Restarting \(PyTorchJobRestarting\) "
                     rf"0:00:3\d ago: {re.escape(message)}", out)
    assert f"PyTorchJob train: restarting (PyTorchJobRestarting): {message}" in out
    rows = [row.split() for row in out.splitlines() if row.startswith("train-worker-")]
    assert [row[:5] for row in rows] == [["train-worker-0", "0", "Running", "gpu-node-a", "1"],
                                         ["train-worker-1", "1", "Running", "gpu-node-b", "0"]]
    assert "epoch 3/24 step 120/500" in out  # read from the `pytorch` container


def test_following_a_pytorchjob_ends_when_it_succeeds(kubeconfig: Path) -> None:
    scenario = pytorchjob_release({"replicaStatuses": {"Worker": {"succeeded": 2}},
                                   "conditions": [{"type": "Succeeded", "reason": "PyTorchJobSucceeded",
                                                   "message": "PyTorchJob train successfully completed."}]})
    with fake_cluster(scenario, kubeconfig):
        result = watch(kubeconfig, "train", "--follow", "--interval", "0.2", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "PyTorchJob train: Complete, restarts 0 of 3, 0 active, 2 succeeded, 0 failed workers" in result.stdout
