"""The chart, the kustomize base and the Dockerfile, checked with the real tools.

helm lint/template over a matrix of values files (tests/e2e/values/*.yaml); every bad values file
(tests/e2e/values/bad/, each naming what its error must mention) rejected by values.schema.json; the rendered
objects validated against the Kubernetes 1.30 schemas (kubernetes-validate, strict), scanned by checkov and
yamllint; the Dockerfile linted by hadolint and checkov. Tools come from .tools/bin (`make tools`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.chart import CHART, REPO, helm, render, render_text, run_tool
from trainer.config import SUPPORTED_MODELS, load_config
from trainer.exit_codes import EXIT_CONFIG_ERROR, EXIT_PREEMPTED

VALUES = REPO / "tests" / "e2e" / "values"
GOOD = sorted(VALUES.glob("*.yaml"))
BAD = sorted((VALUES / "bad").glob("*.yaml"))
K8S_VERSIONS = ("1.30.0", "1.33.0")
# checkov must not phone home: no update check, no platform download, and any stray request goes to a closed
# port on loopback.
CHECKOV_ENV = {"CKV_SKIP_PACKAGE_UPDATE_CHECK": "true", "BC_SKIP_MAPPING": "TRUE", "HTTPS_PROXY": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
YAMLLINT_CONFIG = "{extends: default, rules: {line-length: {max: 130}, document-start: disable}}"
# Helm's toYaml writes nested lists of user values (affinity, tolerations) without indenting them under their key
YAMLLINT_RENDERED = ("{extends: default, rules: {line-length: {max: 130}, document-start: disable, "
                     "indentation: {spaces: consistent, indent-sequences: whatever}}}")


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def workers(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The workers' Job (no hook annotation)."""
    return next(job for job in by_kind(objects, "Job") if "helm.sh/hook" not in job["metadata"].get("annotations", {}))


def pod_spec_of(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "JobSet":
        return obj["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    if obj["kind"] == "PyTorchJob":
        return obj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def validatable(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Objects with a Kubernetes schema; a JobSet's Job template and a PyTorchJob's pod template are wrapped in the
    built-in kinds they are made of, so that their contents are validated as well."""
    out = []
    for obj in objects:
        if obj["kind"] == "JobSet":
            job = obj["spec"]["replicatedJobs"][0]["template"]
            out.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "jobset-node"}, **job})
        elif obj["kind"] == "PyTorchJob":
            template = obj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
            out.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "worker"},
                        "template": template})
        else:
            out.append(obj)
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every good values file rendered once (release `train`, namespace `training`), as files for the linters."""
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for values in GOOD:
        files[values.stem] = out / f"{values.stem}.yaml"
        files[values.stem].write_text(render_text("train", values))
    return files


@pytest.mark.parametrize("values", GOOD, ids=lambda p: p.stem)
def test_helm_lint_strict_passes(values: Path) -> None:
    result = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", BAD, ids=lambda p: p.stem)
def test_bad_values_are_rejected_naming_the_key(values: Path) -> None:
    expected = re.match(r"# expect: (.+)", values.read_text()).group(1)  # type: ignore[union-attr]
    result = helm("template", "train", str(CHART), "-f", str(values))
    assert result.returncode != 0, f"{values.name} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert expected in result.stderr, result.stderr


def test_rendered_objects_are_valid_kubernetes(rendered: dict[str, Path], tmp_path: Path) -> None:
    checked = tmp_path / "validatable.yaml"
    objects = [obj for path in rendered.values() for obj in validatable(list(yaml.safe_load_all(path.read_text())))
               if obj]
    checked.write_text(yaml.safe_dump_all(objects))
    assert {"ConfigMap", "Service", "Job", "PodTemplate", "ServiceAccount", "NetworkPolicy", "Pod"} <= {
        obj["kind"] for obj in objects}
    for version in K8S_VERSIONS:
        result = run_tool("kubernetes-validate", "--strict", "--quiet", "-k", version, str(checked))
        assert result.returncode == 0 and "ERROR" not in result.stdout, result.stdout + result.stderr


def test_checkov_finds_nothing_unjustified(rendered: dict[str, Path]) -> None:
    folder = next(iter(rendered.values())).parent
    result = run_tool("checkov", "-d", str(folder), "--framework", "kubernetes", "--skip-download",
                      "--compact", "-o", "json", env=CHECKOV_ENV)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(f["check_id"], f["resource"]) for report in reports for f in report["results"]["failed_checks"]]
    assert not failed, failed
    assert sum(report["summary"]["passed"] for report in reports) > 500
    # every skipped check is skipped by one of our annotations, which says why
    reasons = {}
    for path in rendered.values():
        for obj in filter(None, yaml.safe_load_all(path.read_text())):
            for key, text in (obj["metadata"].get("annotations") or {}).items():
                if key.startswith("checkov.io/skip"):
                    check, _, reason = text.partition("=")
                    reasons[check] = reason
    skipped = {s["check_id"] for report in reports for s in report["results"]["skipped_checks"]}
    assert skipped and skipped <= reasons.keys(), skipped - reasons.keys()
    assert all(len(reasons[check].split()) >= 5 for check in skipped), reasons


def test_yamllint_is_clean(rendered: dict[str, Path]) -> None:
    sources = [CHART / "values.yaml", CHART / "Chart.yaml", *GOOD, *(REPO / "k8s").rglob("*.yaml")]
    result = run_tool("yamllint", "-s", "-d", YAMLLINT_CONFIG, *map(str, sources))
    assert result.returncode == 0, result.stdout
    result = run_tool("yamllint", "-s", "-d", YAMLLINT_RENDERED, *map(str, rendered.values()))
    assert result.returncode == 0, result.stdout


def test_dockerfile_passes_hadolint_and_checkov() -> None:
    lint = run_tool("hadolint", str(REPO / "Dockerfile"))
    assert lint.returncode == 0, lint.stdout
    scan = run_tool("checkov", "-f", str(REPO / "Dockerfile"), "--framework", "dockerfile", "--skip-download",
                    "--compact", "-o", "json", env=CHECKOV_ENV)
    report = json.loads(scan.stdout)
    assert report["summary"]["failed"] == 0, report["results"]["failed_checks"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M) and "PYTHONUNBUFFERED=1" in dockerfile
    assert re.search(r'^ENTRYPOINT \["trainer-launch"\]$', dockerfile, re.M)
    # the base is pinned to a version (tests/e2e/test_image.py checks that it matches the tested environment)
    assert re.search(r"^ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+$", dockerfile, re.M)


@pytest.mark.parametrize("values", GOOD, ids=lambda p: p.stem)
def test_the_config_map_is_a_valid_trainer_config(values: Path, tmp_path: Path) -> None:
    objects = render("train", values)
    (config_map,) = by_kind(objects, "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    config = load_config(str(path))  # raises ConfigError on any unknown key or bad value
    chart_values = yaml.safe_load(values.read_text())
    bucket = chart_values["s3"]["bucket"]
    assert config.run.dir == f"s3://{bucket}/runs" and config.run.name == "train"
    assert config.data.train.coco == f"s3://{bucket}/datasets/voc/coco/train.json"
    worker_kinds = [obj for obj in objects if obj["kind"] in ("Job", "JobSet", "PyTorchJob")
                    and "helm.sh/hook" not in obj["metadata"].get("annotations", {})]
    spec = pod_spec_of(worker_kinds[0])
    assert config.checkpoint.grace_seconds == spec["terminationGracePeriodSeconds"]


def test_schema_knows_exactly_the_trainers_models() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert tuple(schema["properties"]["config"]["properties"]["model"]["properties"]["name"]["enum"]) == \
        SUPPORTED_MODELS


def test_four_nodes_of_eight_gpus() -> None:
    objects = render("train", VALUES / "four-by-eight.yaml")
    job = workers(objects)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert job["spec"]["backoffLimit"] == 5 * 4
    assert job["spec"]["podReplacementPolicy"] == "Failed" and "ttlSecondsAfterFinished" not in job["spec"]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    args = container["args"]
    assert container["command"] == ["trainer-launch"]
    assert {"--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=train-0.train-nodes:29400",
            "--rdzv-id=train", "--max-restarts=0", "--local-addr=$(TRAINER_POD_HOST)"} <= set(args)
    assert args[args.index("-m") + 1] == "trainer.train" and args[-2:] == ["--set", "data.workers=8"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["image"].startswith("registry.example.com/ml/trainer@sha256:")
    assert spec["subdomain"] == "train-nodes" and spec["restartPolicy"] == "Never"
    assert spec["priorityClassName"] == "training-high" and spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu" and "podAntiAffinity" in spec["affinity"]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [EXIT_CONFIG_ERROR]
    assert rules[1]["action"] == "Ignore" and rules[1]["onExitCodes"]["values"] == [EXIT_PREEMPTED]
    assert rules[2] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    (service,) = by_kind(objects, "Service")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    (policy,) = by_kind(objects, "NetworkPolicy")
    assert policy["spec"]["egress"][-1]["to"] == [{"ipBlock": {"cidr": "52.218.0.0/17"}}]


def test_pods_are_locked_down() -> None:
    for values in GOOD:
        for obj in render("train", values):
            if obj["kind"] not in ("Job", "JobSet", "PyTorchJob", "Pod"):
                continue
            spec = pod_spec_of(obj) if obj["kind"] != "Pod" else obj["spec"]
            assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert spec["automountServiceAccountToken"] is False
            for container in spec["containers"] + spec.get("initContainers", []):
                context = container["securityContext"]
                assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
                assert context["capabilities"] == {"drop": ["ALL"]}
                mounts = {m["mountPath"] for m in container["volumeMounts"]}
                assert "/tmp" in mounts, f"{values.name}: {obj['kind']} {container['name']} has no writable /tmp"


def test_credentials_come_from_a_secret_or_the_service_account() -> None:
    keyed = workers(render("train", VALUES / "minio.yaml"))["spec"]["template"]["spec"]["containers"][0]["env"]
    env = {item["name"]: item for item in keyed}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.storage.svc.cluster.local:9000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "minio-creds", "key": "rootPassword"}
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    irsa = render("train", VALUES / "irsa.yaml")
    (account,) = by_kind(irsa, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("role/detection-trainer")
    for obj in by_kind(irsa, "Job"):
        spec = obj["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == "trainer"
        assert not any(e["name"].startswith("AWS_ACCESS") for e in spec["containers"][0]["env"])


@pytest.mark.parametrize("name", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"])
def test_extra_env_refuses_plain_aws_credentials_naming_the_key(name: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"s3": {"bucket": "my-bucket"}, "extraEnv": [
        {"name": "NCCL_DEBUG", "value": "WARN"}, {"name": name, "value": "wJalrXUtnFEMI-secret"}]}))
    result = helm("template", "train", str(CHART), "-f", str(values))
    assert result.returncode != 0, f"a plain {name} was rendered into the pod spec"
    assert f"extraEnv: {name} has a plain value" in result.stderr and "valueFrom" in result.stderr
    assert "wJalrXUtnFEMI" not in result.stderr + result.stdout  # the error does not echo the key
    # the same variable from a Secret is fine, and reaches the workers as a secretKeyRef
    reference = {"secretKeyRef": {"name": "other-keys", "key": name}}
    values.write_text(yaml.safe_dump({"s3": {"bucket": "my-bucket"}, "extraEnv": [
        {"name": name, "valueFrom": reference}]}))
    env = workers(render("train", values))["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": name, "valueFrom": reference} in env and not any("value" in e for e in env if e["name"] == name)


def test_convert_runs_as_an_idempotent_hook_or_an_init_container() -> None:
    hook = next(job for job in by_kind(render("train", VALUES / "cpu.yaml"), "Job")
                if job["metadata"]["name"] == "train-convert")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    args = hook["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "convert" and "--skip-if-done" in args
    assert "--voc-root=s3://my-bucket/datasets/voc" in args and "--out=s3://my-bucket/datasets/voc/coco" in args
    forced = render("train", VALUES / "cpu.yaml", extra=("--set", "convert.force=true"))
    assert "--skip-if-done" not in next(j for j in by_kind(forced, "Job") if j["metadata"]["name"] == "train-convert")[
        "spec"]["template"]["spec"]["containers"][0]["args"]
    inline = render("train", VALUES / "one-node.yaml")
    assert [j["metadata"]["name"] for j in by_kind(inline, "Job")] == ["train"]
    job = workers(inline)
    assert job["spec"]["template"]["spec"]["initContainers"][0]["args"][0] == "convert"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and job["spec"]["suspend"] is True


def test_jobset_and_pytorchjob_variants() -> None:
    (jobset,) = by_kind(render("train", VALUES / "jobset.yaml"), "JobSet")
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 3
    assert jobset["spec"]["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True,
                                         "subdomain": "train-nodes"}
    args = pod_spec_of(jobset)["containers"][0]["args"]
    assert "--rdzv-endpoint=train-node-0-0.train-nodes:29400" in args and "--nproc-per-node=4" in args
    (pytorchjob,) = by_kind(render("train", VALUES / "pytorchjob.yaml"), "PyTorchJob")
    assert pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    container = pod_spec_of(pytorchjob)["containers"][0]
    assert container["name"] == "pytorch"  # the operator's required container name
    assert "--rdzv-endpoint=train-worker-0:29400" in container["args"]


def test_notes_print_the_log_commands_that_select_the_worker_pods() -> None:
    result = helm("install", "--dry-run=client", "train", str(CHART), "-n", "ml", "-f", str(VALUES / "cpu.yaml"))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    job = workers(render("train", VALUES / "cpu.yaml", namespace="ml"))
    labels = {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-completion-index": "0"}
    commands = [line.strip() for line in notes.splitlines() if line.strip().startswith("kubectl logs")]
    assert any("--prefix" in c for c in commands) and len(commands) >= 2
    for command in commands:
        match = re.search(r"-l (\S+)", command)
        if match:
            wanted = dict(pair.split("=") for pair in match.group(1).split(","))
            assert wanted.items() <= labels.items(), command
    assert "trainer ckpt ls s3://my-bucket/runs/train" in notes and "helm test train" in notes


def test_k8s_base_matches_the_chart_and_the_overlay_renders(tmp_path: Path) -> None:
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "render_k8s_base.py"), "--check"],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    for folder in ("k8s/base", "k8s/overlays/example"):
        out = run_tool("kubectl", "kustomize", str(REPO / folder))
        assert out.returncode == 0, out.stderr
        path = tmp_path / f"{Path(folder).name}.yaml"
        path.write_text(out.stdout)
        result = run_tool("kubernetes-validate", "--strict", "--quiet", "-k", "1.30.0", str(path))
        assert result.returncode == 0, result.stdout
    overlay = list(yaml.safe_load_all((tmp_path / "example.yaml").read_text()))
    job = workers(overlay)
    assert job["metadata"]["namespace"] == "ml-training" and job["spec"]["completions"] == 4
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["--nnodes=4", "--nproc-per-node=8"]
    config = yaml.safe_load(by_kind(overlay, "ConfigMap")[0]["data"]["config.yaml"])
    assert config["model"]["name"] == "fasterrcnn_resnet50_fpn_v2"
