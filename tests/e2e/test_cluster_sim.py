"""The chart, installed on a simulated cluster (tests/e2e/cluster_sim.py): its rendered pods run as real processes.

One S3 server on 127.0.0.1 holds a small VOC data set. Each scenario installs a release of the chart (2 pods x 1
CPU process): the pre-install convert hook, then the workers' Indexed Job, each pod a process tree with its own
hostname, /etc/hosts and address 127.0.1.x, joining the rendezvous at pod 0 by its Service DNS name.

(a) the group trains to the end and the model is in S3;
(b) kill -9 of a whole pod mid-run: the Job replaces it, the group re-forms, resumes from S3 and finishes with
    weights bitwise equal to (a)'s;
(c) preemption of every pod (DisruptionTarget + SIGTERM): a checkpoint is committed, the pods exit 75, are
    replaced without using the restart budget, and the run finishes equal to (a);
(d) one pod's worker stalls (SIGSTOP): the hang watchdog names it, every pod exits within the hang timeout + 60 s,
    the group re-forms and finishes equal to (a).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
import yaml

from tests.e2e.chart import render
from tests.e2e.cluster_sim import Cluster, JobResult
from tests.support.torchrun import global_step_of
from tests.support.voc import voc_xml
from trainer.local_s3 import LocalS3Server, free_port
from trainer.synth import make_shapes_dataset

pytestmark = pytest.mark.slow
NAMESPACE = "sim"
BUCKET = "sim-data"
JOB_TIMEOUT_S = 420
HANG_TIMEOUT_S = 30  # every scenario runs with the hang watchdog armed: none of them may trip it


@pytest.fixture(scope="module")
def bucket(s3_server: LocalS3Server, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A VOC copy of a tiny shapes set (25 images of 96 px) in s3://sim-data/datasets/shapes."""
    local = tmp_path_factory.mktemp("shapes")
    data = make_shapes_dataset(str(local), n=25, size=96, seed=5)
    keys = s3_server.client_env()
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=BUCKET)
    prefix = "datasets/shapes"
    for split, uri in (("train", data.train_uri), ("val", data.val_uri)):
        coco = json.loads(Path(uri).read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        ids = []
        for image in coco["images"]:
            stem = Path(image["file_name"]).stem
            objects = [(names[a["category_id"]], a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                        a["bbox"][1] + a["bbox"][3]) for a in coco["annotations"] if a["image_id"] == image["id"]]
            xml = voc_xml(image["file_name"], objects, size=(image["width"], image["height"]))
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/Annotations/{stem}.xml", Body=xml.encode())
            client.upload_file(str(Path(data.images_uri) / image["file_name"]), BUCKET,
                               f"{prefix}/JPEGImages/{image['file_name']}")
            ids.append(stem)
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/ImageSets/Main/{split}.txt", Body="\n".join(ids).encode())
    return client


def values(s3_server: LocalS3Server) -> dict[str, Any]:
    """2 pods x 1 CPU process, the tiny deterministic recipe of tests/integration/test_resume.py."""
    return {
        "nodes": 2, "gpusPerNode": 0, "cpuProcsPerNode": 1,
        "image": {"repository": "local/detection-trainer", "tag": "sim", "pullPolicy": "IfNotPresent"},
        "s3": {"bucket": BUCKET, "endpoint": s3_server.endpoint_url, "existingSecret": "s3-keys"},
        "dataset": {"voc": "datasets/shapes", "coco": "datasets/shapes/coco", "images": "datasets/shapes/JPEGImages"},
        "restarts": 2, "terminationGracePeriodSeconds": 30, "shmSize": "256Mi",
        "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "1"}],  # 2 pods share this machine's 2 cores
        "rendezvous": {"port": free_port(), "joinTimeoutSeconds": 120},
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "4Gi"}},
        "config": {
            "data": {"batch_size": 2, "workers": 1, "aspect_ratio_groups": 0},
            "model": {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "min_size": 96, "max_size": 96,
                      "options": {"box_batch_size_per_image": 32, "rpn_post_nms_top_n_train": 100}},
            "schedule": {"epochs": 2, "warmup_iters": 2},
            "optim": {"lr": 0.01},
            "train": {"deterministic": True, "hang_timeout_seconds": HANG_TIMEOUT_S},
            "eval": {"every_epochs": 0},
            "checkpoint": {"every_steps": 2, "keep_last": 2},
            "log": {"every_steps": 1},
        },
    }


@dataclass
class Installed:
    cluster: Cluster
    workers: dict[str, Any]  # the workers' Job
    convert: JobResult  # the pre-install hook's run
    result: JobResult | None = None  # the workers' run, once it ended


def install(release: str, s3_server: LocalS3Server, tmp_path: Path) -> Installed:
    """`helm template` the release and run its pre-install hooks on a fresh simulated cluster."""
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values(s3_server)))
    manifests = render(release, values_file, namespace=NAMESPACE)
    env = s3_server.client_env()
    cluster = Cluster(manifests, tmp_path / "cluster", NAMESPACE, secrets_data={"s3-keys": {
        "AWS_ACCESS_KEY_ID": env["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": env["AWS_SECRET_ACCESS_KEY"]}})
    hooks = cluster.hooks("pre-install")
    assert [hook["metadata"]["name"] for hook in hooks] == [f"{release}-convert"]
    converted = cluster.run_job(hooks[0], timeout=180)
    assert converted.status == "Complete", converted.log()
    return Installed(cluster, cluster.get("Job", release), converted)


@pytest.fixture
def installed(s3_server: LocalS3Server, bucket: Any, tmp_path: Path) -> Iterator[Callable[[str], Installed]]:
    made: list[Installed] = []

    def make(release: str) -> Installed:
        made.append(install(release, s3_server, tmp_path))
        return made[-1]
    yield make
    for release in made:
        release.cluster.shutdown()


def final_weights(client: Any, release: str) -> dict[str, torch.Tensor]:
    body = client.get_object(Bucket=BUCKET, Key=f"runs/{release}/model_final.pt")["Body"].read()
    return torch.load(io.BytesIO(body), weights_only=True)["model"]


def assert_equal_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(s3_server: LocalS3Server, bucket: Any, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """(a): the release `train-a` installed and run to the end, untouched."""
    release = install("train-a", s3_server, tmp_path_factory.mktemp("train-a"))
    try:
        release.result = release.cluster.run_job(release.workers, timeout=JOB_TIMEOUT_S)
    finally:
        release.cluster.shutdown()
    return release


def test_a_install_converts_once_and_two_pods_train_to_the_end(reference: Installed, bucket: Any) -> None:
    assert "skipped" not in reference.convert.log() and "images converted: 25" in reference.convert.log()
    reference = reference.result
    assert reference.status == "Complete", reference.log()[-6000:]
    assert reference.counted_failures == 0 and len(reference.pods) == 2
    assert sorted(pod.index for pod in reference.pods) == [0, 1]
    assert all(pod.exit_code == 0 for pod in reference.pods)
    report = json.loads(bucket.get_object(Bucket=BUCKET, Key="datasets/shapes/coco/report.json")["Body"].read())
    assert report["ok"] and report["splits"]["train"]["images"] == 20
    log = reference.log()
    # each pod ran its own agent; the two formed one group of 2 ranks that met at pod 0's DNS name
    assert "[rank 0]" in reference.log(index=0) and "[rank 1]" in reference.log(index=1)
    assert "epoch 2/2 step 5/5" in log
    assert "exit 0: completed" in reference.log(index=0) and "exit 0: completed" in reference.log(index=1)
    objects = {o["Key"] for o in bucket.list_objects_v2(Bucket=BUCKET, Prefix="runs/train-a/")["Contents"]}
    assert {"runs/train-a/model_final.pt", "runs/train-a/config.yaml", "runs/train-a/metrics.jsonl",
            "runs/train-a/checkpoints/latest.json"} <= objects
    assert final_weights(bucket, "train-a")


def test_b_kill_9_of_a_pod_reforms_the_group_and_finishes_equal(installed: Callable[[str], Installed], bucket: Any,
                                                                  reference: Installed) -> None:
    release = installed("train-b")
    cluster, job = release.cluster, release.workers
    assert "skipped" in release.convert.log()  # the data set was converted by (a): the hook is idempotent
    run = cluster.start_job(job, timeout=JOB_TIMEOUT_S)
    cluster.wait_for_line(lambda pod, line: "checkpoint committed" in line and "step-000000004" in line,
                          timeout=JOB_TIMEOUT_S)
    victim = next(pod for pod in cluster.running_pods("train-b") if pod.index == 1)
    cluster.kill(victim, signal.SIGKILL)
    result = run.wait(JOB_TIMEOUT_S + 60)
    assert result.status == "Complete", result.log()[-6000:]
    assert victim.exit_code == 137
    assert result.counted_failures >= 1 and len(result.pods) >= 3
    replacement = [pod for pod in result.pods if pod.index == 1 and pod is not victim]
    assert replacement and replacement[-1].exit_code == 0 and replacement[-1].ip != victim.ip
    assert "resumed from s3://sim-data/runs/train-b/checkpoints/step-" in result.log()
    assert_equal_weights(final_weights(bucket, "train-b"), final_weights(bucket, "train-a"))


def test_c_preemption_of_every_pod_checkpoints_and_resumes_without_using_the_budget(
        installed: Callable[[str], Installed], bucket: Any, reference: Installed) -> None:
    release = installed("train-c")
    cluster, job = release.cluster, release.workers
    run = cluster.start_job(job, timeout=JOB_TIMEOUT_S)
    cluster.wait_for_line(lambda pod, line: (global_step_of(line) or 0) >= 3, timeout=JOB_TIMEOUT_S)
    first = cluster.running_pods("train-c")
    assert len(first) == 2
    for pod in first:
        cluster.evict(pod)
    result = run.wait(JOB_TIMEOUT_S + 60)
    assert result.status == "Complete", result.log()[-6000:]
    assert [pod.exit_code for pod in first] == [75, 75], result.log()[-4000:]
    assert result.counted_failures == 0 and len(result.pods) == 4
    stopped = "\n".join(line for pod in first for line in pod.lines)
    assert "SIGTERM received" in stopped and "checkpoint committed" in stopped
    assert "resumed from s3://sim-data/runs/train-c/checkpoints/step-" in result.log()
    assert_equal_weights(final_weights(bucket, "train-c"), final_weights(bucket, "train-a"))


def _worker_pid(pod: Any) -> int:
    """The training worker of a pod: the descendant of its main process running ``-m trainer.train`` that is not
    the launcher (trainer-launch) itself."""
    pending = [pod.main_pid()]
    while pending:
        pid = pending.pop()
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        if b"trainer.train" in argv and not any(b"trainer-launch" in arg for arg in argv):
            return pid
        pending += [int(child) for child in children]
    raise AssertionError(f"no training worker under pod {pod.name}")


def test_d_a_stalled_rank_is_named_every_pod_exits_fast_and_the_group_reforms_equal(
        installed: Callable[[str], Installed], bucket: Any, reference: Installed) -> None:
    release = installed("train-h")
    cluster, job = release.cluster, release.workers
    run = cluster.start_job(job, timeout=JOB_TIMEOUT_S)
    cluster.wait_for_line(lambda pod, line: "checkpoint committed" in line and "step-000000004" in line,
                          timeout=JOB_TIMEOUT_S)
    first = cluster.running_pods("train-h")
    stalled = next(pod for pod in first if pod.index == 1)
    os.kill(_worker_pid(stalled), signal.SIGSTOP)  # frozen: it holds its sockets open and answers nothing
    stopped_at = time.monotonic()
    while any(pod.running for pod in first) and time.monotonic() - stopped_at < HANG_TIMEOUT_S + 90:
        time.sleep(0.5)
    assert not any(pod.running for pod in first), "a pod of the stalled group is still running"
    assert time.monotonic() - stopped_at < HANG_TIMEOUT_S + 60
    assert "rank 1 stalled" in "\n".join(stalled.lines), "\n".join(stalled.lines[-40:])
    result = run.wait(JOB_TIMEOUT_S + 60)
    assert result.status == "Complete", result.log()[-6000:]
    assert "resumed from s3://sim-data/runs/train-h/checkpoints/step-" in result.log()
    assert_equal_weights(final_weights(bucket, "train-h"), final_weights(bucket, "train-a"))


def test_a_bad_config_fails_the_job_at_once(installed: Callable[[str], Installed]) -> None:
    """Exit 2 (bad config) on any pod: the pod failure policy fails the Job without a single retry."""
    release = installed("train-d")
    cluster, job = release.cluster, release.workers
    job["spec"]["template"]["spec"]["containers"][0]["args"].append("--set=optim.name=adamm")
    result = cluster.run_job(job, timeout=JOB_TIMEOUT_S)
    assert result.status == "Failed" and result.reason.startswith("PodFailurePolicy"), result.log()[-3000:]
    assert result.counted_failures == 0 and len(result.pods) == 2
    assert "optim.name" in result.log()


def test_the_pods_really_are_isolated(installed: Callable[[str], Installed]) -> None:
    """What the scenarios rely on, checked directly: hostname, DNS, read-only root, user, volumes."""
    release = installed("train-e")
    cluster, job = release.cluster, release.workers
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["command"] = ["sh", "-c"]
    container["args"] = ["sleep 2; hostname; getent hosts train-e-0.train-e-nodes; id -u; "
                         "awk '$2 == \"/\" {split($4, o, \",\"); print o[1]}' /proc/mounts; "
                         "touch /tmp/x && echo tmp-writable; grep -c '^  grace_seconds: 30$' /etc/trainer/config.yaml; "
                         "df --output=fstype /dev/shm | tail -1; echo $TRAINER_POD_HOST; sleep 1"]
    result = cluster.run_job(job, timeout=60)
    assert result.status == "Complete", result.log()
    lines = {pod.index: pod.lines for pod in result.pods}
    pod0 = next(p for p in result.pods if p.index == 0)
    assert lines[1][0] == "train-e-1"
    assert lines[1][1].split()[0] == pod0.ip  # pod 1 finds pod 0 by its Service name
    assert lines[1][2:] == ["10001", "ro", "tmp-writable", "1", "tmpfs", "train-e-1.train-e-nodes"]
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() not in ("train-e-0", "train-e-1")


def test_helm_test_lists_the_data_set_with_the_pods_credentials(installed: Callable[[str], Installed],
                                                                  tmp_path: Path) -> None:
    def helm_test(cluster: Cluster) -> JobResult:
        (pod,) = [p for p in cluster.objects("Pod") if p["metadata"]["annotations"].get("helm.sh/hook") == "test"]
        as_job = {"metadata": {"name": pod["metadata"]["name"]},
                  "spec": {"backoffLimit": 0, "template": {"metadata": pod["metadata"], "spec": pod["spec"]}}}
        return cluster.run_job(as_job, timeout=60)

    release = installed("train-f")
    result = helm_test(release.cluster)
    assert result.status == "Complete", result.log()
    assert "ImageSets/" in result.log() and "Annotations/" in result.log()
    # the same release pointed at a bucket it cannot read: `helm test` fails
    wrong = render("train-f", tmp_path / "values.yaml", namespace=NAMESPACE,
                   extra=("--set", "s3.bucket=no-such-bucket"))
    broken = Cluster(wrong, tmp_path / "wrong", NAMESPACE, secrets_data=release.cluster.secrets)
    failed = helm_test(broken)
    assert failed.status == "Failed" and "no-such-bucket" in failed.log(), failed.log()
