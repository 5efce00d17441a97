"""No chart value can inject YAML: every string leaf of values.schema.json, set to an injection payload.

For each string in the schema (properties, array items, map values and map keys, enums included) and each payload
(a newline and a new key, a new `---` document, YAML flow syntax, `key: value`, a broken-out double quote), the
chart either refuses the values at install (the schema, or the chart's own `fail` naming the key) or renders
objects with exactly the keys of a render with a harmless sample in the same place: the payload stayed inside its
string. Checked for every workload (Job, JobSet, PyTorchJob) in both convert modes (hook Job, init container), and
inside the trainer's config.yaml that the ConfigMap carries.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.chart import CHART, tool

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VARIANTS = {f"{workload}/{mode}": {"workload": workload, "convert": {"mode": mode}}
            for workload in ("Job", "JobSet", "PyTorchJob") for mode in ("hook", "initContainer")}
# every optional part of the chart switched on, so that each value lands somewhere
BASE: dict[str, Any] = {
    "nodes": 2, "gpusPerNode": 1,
    "s3": {"bucket": "my-bucket", "existingSecret": "s3-keys", "endpoint": "http://minio.storage:9000"},
    "serviceAccount": {"create": True, "name": "trainer", "annotations": {"example.com/role": "r"}},
    "networkPolicy": {"enabled": True, "s3Cidrs": ["10.0.0.0/8"]},
    "kueue": {"queueName": "team-a"}, "priorityClassName": "high",
    "imagePullSecrets": [{"name": "regcred"}], "extraEnv": [{"name": "NCCL_DEBUG", "value": "WARN"}],
    "extraArgs": ["--set", "optim.lr=0.01"], "convert": {"extraArgs": ["--voc-offset"]},
    "nodeSelector": {"pool": "gpu"}, "podLabels": {"team": "vision"}, "podAnnotations": {"example.com/a": "b"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
    "affinity": {"nodeAffinity": {}}, "config": {"run": {"dir": "s3://my-bucket/elsewhere"}},
}
# a valid value for leaves whose pattern "sample" does not satisfy (path with [] for items, * for map values)
SAMPLES = {
    "image.repository": "registry.example.com/ml/trainer", "image.tag": "1.0.0",
    "image.digest": "sha256:" + "0" * 64, "s3.bucket": "my-bucket", "s3.endpoint": "https://s3.example.com",
    "networkPolicy.s3Cidrs[]": "10.0.0.0/8", "extraEnv[].name": "NCCL_DEBUG", "config.run.dir": "s3://b/runs",
    "resources.requests.*": "1", "resources.limits.*": "1", "convert.resources.requests.*": "1",
    "convert.resources.limits.*": "1", "shmSize": "1Gi",
}
MAP_KEY = "example.com/key"  # a key every map accepts (label, annotation and resource names)
KEY = "<key>"  # a path step: the key of a map rather than a value
PAYLOADS = {
    "newline+key": "{s}\nhostPID: true",
    "new document": "{s}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: injected}}\nstringData: {{a: b}}",
    "flow mapping": "{{hostPID: true, privileged: true}}",
    "flow sequence": "[injected, {{privileged: true}}]",
    "key: value": "{s}: {{hostPID: true}}",
    "quote break": '{s}", hostPID: true, x: "',
}
SCHEMA_REFUSED = "values don't meet the specifications of the schema"
HELM_HOME = tempfile.TemporaryDirectory(prefix="helm-home-")
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the test parses thousands of objects


@dataclass(frozen=True)
class Leaf:
    path: tuple[str | int, ...]  # property names; 0 for an array item; "*" for a map value; KEY for a map key
    schema: dict[str, Any]

    @property
    def name(self) -> str:
        return path_name(self.path)

    def sample(self) -> Any:
        return sample_of(self.schema, self.name)


def path_name(path: tuple[str | int, ...]) -> str:
    """`extraEnv[].value`, `podLabels.*`, `podLabels.<key>`."""
    name = ""
    for step in path:
        name += "[]" if step == 0 else f".{step}" if name else str(step)
    return name


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        target: Any = SCHEMA
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def is_string(schema: dict[str, Any]) -> bool:
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    return "string" in kinds or any(isinstance(v, str) for v in schema.get("enum", []))


def leaves(schema: dict[str, Any], path: tuple[str | int, ...] = ()) -> Iterator[Leaf]:
    """Every place a string can go: typed strings, string enums, map keys, and the values of free-form maps."""
    schema = resolve(schema)
    if is_string(schema):
        yield Leaf(path, schema)
    for name, sub in schema.get("properties", {}).items():
        yield from leaves(sub, (*path, name))
    if "items" in schema:
        yield from leaves(schema["items"], (*path, 0))
    extra = schema.get("additionalProperties")
    if path and "object" in str(schema.get("type", "")) and extra is not False:
        # a map: its keys are strings too; a free-form object takes any value under any key
        yield Leaf((*path, KEY), resolve(schema.get("propertyNames", {"type": "string"})))
        if isinstance(extra, dict):
            yield from leaves(extra, (*path, "*"))
        else:
            yield Leaf((*path, "*"), {"type": "string"})


def sample_of(schema: dict[str, Any], name: str) -> Any:
    schema = resolve(schema)
    if name in SAMPLES:
        return SAMPLES[name]
    if "enum" in schema:
        return schema["enum"][0]
    if "properties" in schema or "object" in str(schema.get("type", "")):
        return {req: sample_of(schema["properties"][req], f"{name}.{req}") for req in schema.get("required", [])}
    return "sample"


def set_leaf(values: dict[str, Any], leaf: Leaf, text: str) -> dict[str, Any]:
    """A copy of values with the leaf set to text (arrays get one item, maps one key, required siblings filled)."""
    values = copy.deepcopy(values)
    node: Any = values
    schema: dict[str, Any] = SCHEMA
    for i, step in enumerate(leaf.path):
        schema = resolve(schema)
        where = path_name(leaf.path[:i + 1])
        last = i == len(leaf.path) - 1
        if step == KEY:  # the key of a map: the only key, with a valid value
            value_schema = schema.get("additionalProperties")
            node.clear()
            node[text] = sample_of(value_schema, f"{path_name(leaf.path[:i])}.*") if isinstance(
                value_schema, dict) else "v"
            return values
        if step == 0:
            sub = resolve(schema["items"])
            node[:] = [text if last else sample_of(sub, where)]
            node, schema = node[0], sub
            continue
        if step == "*":  # the value of a map: under one valid key
            extra = schema.get("additionalProperties")
            sub = extra if isinstance(extra, dict) else {"type": "string"}
            node.clear()
            key = MAP_KEY
        else:
            sub, key = schema["properties"][step], str(step)
        if last:
            node[key] = text
        else:
            if not isinstance(node.get(key), (dict, list)):
                node[key] = [] if "items" in resolve(sub) else sample_of(sub, where)
            node = node[key]
        schema = sub
    return values


def key_paths(obj: Any, rename: dict[str, str], prefix: str = "") -> set[str]:
    """Every key path of a document, list positions included; the trainer's config.yaml is read as YAML too.
    Keys in `rename` count as their replacement (a payload that is itself a key, compared with the sample key)."""
    out = {prefix}
    if isinstance(obj, dict):
        for key, value in obj.items():
            name = rename.get(str(key), str(key))
            out |= key_paths(value, rename, f"{prefix}.{name}")
            if key == "config.yaml" and isinstance(value, str):
                out |= key_paths(yaml.load(value, Loader=LOADER), rename, f"{prefix}.{name}>")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out |= key_paths(value, rename, f"{prefix}[{i}]")
    return out


@dataclass
class Render:
    refused: str | None  # the install's error when the values were refused
    documents: list[tuple[str, Any]]  # (kind, object) per rendered object


_UMBRELLAS: dict[int, Path] = {}


def _umbrella(count: int) -> Path:
    """A parent chart holding this chart `count` times (aliases v0, v1, ...): one `helm template` renders many
    values files, each validated by the chart's own schema and reported under its alias."""
    if count not in _UMBRELLAS:
        root = Path(HELM_HOME.name) / f"umbrella-{count}"
        shutil.copytree(CHART, root / "charts" / "train")
        (root / "Chart.yaml").write_text(yaml.safe_dump({
            "apiVersion": "v2", "name": "umbrella", "version": "0.0.1",
            "dependencies": [{"name": "train", "version": "0.1.0", "alias": f"v{i}"} for i in range(count)]}))
        _UMBRELLAS[count] = root
    return _UMBRELLAS[count]


def render_many(values: list[dict[str, Any]]) -> list[Render]:
    """Each values set rendered (or refused) as `helm install` would, in one helm run when they all render."""
    if not values:
        return []
    values_file = Path(HELM_HOME.name) / f"values-{threading.get_ident()}.json"
    values_file.write_text(json.dumps({f"v{i}": v for i, v in enumerate(values)}))
    result = subprocess.run([tool("helm"), "template", "train", str(_umbrella(len(values))), "-n", "training",
                             "-f", str(values_file)], capture_output=True, text=True, timeout=120,
                            env={"HOME": HELM_HOME.name, "PATH": "/usr/bin:/bin"})
    error = result.stderr
    if result.returncode != 0:
        refused = set(re.findall(r"^v(\d+):$", error, re.M)) if SCHEMA_REFUSED in error else set()
        if refused:  # helm names each chart whose values its schema refused; render the others again
            rest = iter(render_many([v for i, v in enumerate(values) if str(i) not in refused]))
            sections = re.split(r"^v(\d+):$", error, flags=re.M)
            why = {sections[i]: sections[i + 1] for i in range(1, len(sections) - 1, 2)}
            return [Render(why[str(i)], []) if str(i) in refused else next(rest) for i in range(len(values))]
        if len(values) > 1:  # helm stops at the first failing template: one by one, to say which values failed
            return [render for v in values for render in render_many([v])]
        # a refusal names the value: the chart's fail() says `<key>: ...`
        if "execution error at (" in error and any(f"): {key}:" in error for key in SCHEMA["properties"]):
            return [Render(error, [])]
        raise AssertionError(f"the chart neither refused nor rendered these values:\n{error}\n{json.dumps(values)}")
    out: list[Render] = [Render(None, []) for _ in values]
    for text in result.stdout.split("\n---\n"):
        source = re.search(r"^# Source: umbrella/charts/v(\d+)/", text, re.M)
        document = yaml.load(text, Loader=LOADER)
        if document:
            assert source, text
            out[int(source[1])].documents.append((document["kind"], document))
    return out


ALL_LEAVES = list(leaves(SCHEMA))


def test_the_walk_covers_the_values_that_once_injected() -> None:
    names = {leaf.name for leaf in ALL_LEAVES}
    assert {"priorityClassName", "serviceAccount.name", "kueue.queueName", "s3.existingSecret", "image.repository",
            "image.tag", "image.digest", "extraEnv[].name", "extraEnv[].value", "resources.requests.<key>",
            "dataset.voc", "podLabels.<key>", "podAnnotations.*", "affinity.*", "config.data.*"} <= names, names
    assert len(ALL_LEAVES) > 50


@pytest.mark.parametrize("leaf", ALL_LEAVES, ids=lambda leaf: leaf.name)
def test_no_value_can_inject_yaml(leaf: Leaf) -> None:
    sample = leaf.sample()
    texts = {"sample": sample, **{label: pattern.format(s=sample) for label, pattern in PAYLOADS.items()}}
    cases = [(variant, label) for variant in VARIANTS for label in texts]
    renders = dict(zip(cases, render_many([set_leaf({**BASE, **VARIANTS[variant]}, leaf, texts[label])
                                           for variant, label in cases]), strict=True))
    for variant in VARIANTS:
        baseline = renders[(variant, "sample")]
        assert baseline.refused is None, f"{leaf.name}: the sample {sample!r} was refused (fix SAMPLES)"
        expected = [(kind, key_paths(doc, {})) for kind, doc in baseline.documents]
        for label, text in texts.items():
            got = renders[(variant, label)]
            # the schema and the chart's checks do not depend on the workload
            assert (got.refused is None) == (renders[(next(iter(VARIANTS)), label)].refused is None), (
                f"{leaf.name} ({label}): refused for some workloads only")
            if got.refused is not None:
                continue
            rename = {text: str(sample)} if leaf.path[-1] == KEY else {}
            found = [(kind, key_paths(doc, rename)) for kind, doc in got.documents]
            assert [kind for kind, _ in found] == [kind for kind, _ in expected], (
                f"{leaf.name} = {text!r} ({variant}) changed the rendered objects")
            for (kind, keys), (_, wanted) in zip(found, expected, strict=True):
                assert keys == wanted, (f"{leaf.name} = {text!r} ({variant}) injected into {kind}: "
                                        f"{sorted(keys ^ wanted)[:5]}")
