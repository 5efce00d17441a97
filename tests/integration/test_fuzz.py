"""A fuzz pass of our own (issue 14): mutate our sample inputs (COCO JSON, VOC XML, YAML configs, images,
checkpoint manifests, kubeconfigs) and run every CLI entry point on them. Whatever the input, each run must end
with exit 0, 1 or 2, print no traceback, keep its error lines short, and stay within a bounded address space.

The mutations are seeded, so a failure reproduces; the cases run in batches inside one child process each
(tests/support/fuzz_runner.py), so the imports are paid once and the whole pass takes well under a minute.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BCCD, REPO
from tests.support.images import image_with_rectangles, simple_dataset

SEED = 14
ADDRESS_SPACE = 8 << 30  # torch alone maps ~3.5 GB of address space; a decoded bomb would need tens of GB
WEIRD_JSON: list[Any] = [None, -1, 0, 1e308, float("nan"), float("inf"), "x" * 300, [], {}, True, 2**70, -0.0, "../.."]
WEIRD_YAML = [".nan", ".inf", "-.inf", "-1", "0", "1.0e+999", "[]", "{}", "null", "''", "*undefined", "&a [*a]",
              "'" + "y" * 500 + "'", "[1, [2, [3]]]", "!!python/object:os.system ls", "1e5", "true", "'..'"]


def run_cases(cases: list[dict[str, Any]], workdir: Path, timeout: float = 240) -> list[dict[str, Any]]:
    cases_path, results_path = workdir / "cases.json", workdir / "results.json"
    cases_path.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-m", "tests.support.fuzz_runner", str(cases_path), str(results_path),
                           str(ADDRESS_SPACE)], cwd=workdir, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    running = workdir / "results.json.running"
    assert proc.returncode == 0, (f"the fuzz runner died ({proc.returncode}) in case "
                                  f"{running.read_text() if running.exists() else '?'}: {proc.stderr[-3000:]}")
    return json.loads(results_path.read_text())


def assert_clean(results: list[dict[str, Any]]) -> None:
    problems = []
    for r in results:
        if r["code"] not in (0, 1, 2) or r["traceback"] or r["crash"] or r["longest_line"] > 1000:
            problems.append(f"{r['argv']}: exit {r['code']}, longest line {r['longest_line']}\n"
                            f"{r['crash'] or r['stderr_tail']}")
    assert not problems, f"{len(problems)} of {len(results)} cases failed:\n" + "\n\n".join(problems[:5])


# ------------------------------------------------------------------------------------------ mutations
def _leaves(node: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        return [path] + [leaf for k, v in node.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(node, list):
        return [path] + [leaf for i, v in enumerate(node) for leaf in _leaves(v, (*path, i))]
    return [path]


def _get(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


def mutate_json(doc: dict, rng: random.Random) -> str:
    """One structural mutation of a COCO document, as text (sometimes no longer JSON at all)."""
    doc = json.loads(json.dumps(doc))
    kind = rng.randrange(7)
    paths = [p for p in _leaves(doc) if p]
    path = rng.choice(paths)
    parent, key = _get(doc, path[:-1]), path[-1]
    if kind <= 2:
        parent[key] = rng.choice(WEIRD_JSON)
    elif kind == 3 and isinstance(parent, dict):
        del parent[key]
    elif kind == 4 and isinstance(parent, list):
        parent.append(json.loads(json.dumps(parent[key])))
    elif kind == 5:
        text = json.dumps(doc)
        return text[: rng.randrange(len(text))]
    else:
        return rng.choice(["[" * 100_000, "[]", '"text"', "7", '{"images": 1, "annotations": [], "categories": []}'])
    return json.dumps(doc)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return data[: rng.randrange(1, len(data))]
    if kind == 1:
        buf = bytearray(data)
        for _ in range(rng.randrange(1, 20)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf)
    if kind == 2:
        cut = rng.randrange(len(data))
        return data[:cut] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) + data[cut:]
    return data * rng.randrange(2, 4)


def mutate_xml(text: str, rng: random.Random) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:
        return mutate_bytes(text.encode(), rng)
    if kind == 1:
        return ('<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY x "RBC">]>' + text.replace("RBC", "&x;")).encode()
    if kind == 2:
        return text.encode(rng.choice(["utf-16-le", "utf-16-be", "utf-32-le", "utf-16"]))
    if kind == 3:
        return text.replace("<filename>", "<filename>caf\xe9").encode("latin-1")
    if kind == 4:
        return text.replace("<xmin>", "<xmin>" + rng.choice(["-", "1e999", "nan", "9" * 400, "0x", ""])).encode()
    if kind == 5:
        return text.replace("<width>", "<width>" + rng.choice(["-", "0", "1e9", "x", "99999999999"])).encode()
    if kind == 6:
        return ("<annotation>" + "<a>" * 50_000 + "</a>" * 50_000 + "</annotation>").encode()
    if kind == 7:
        prefix = rng.choice(["<filename>../../", "<filename>/etc/", "<filename>\\..\\"])
        return text.replace("<filename>", prefix).encode()
    lol = '<!DOCTYPE a [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
    return ('<?xml version="1.0"?>' + lol + text.replace("RBC", "&b;")).encode()


def mutate_yaml(text: str, rng: random.Random) -> bytes:
    lines = text.splitlines()
    kind = rng.randrange(6)
    n = rng.randrange(len(lines))
    if kind <= 1 and ":" in lines[n]:
        head, _, _ = lines[n].partition(":")
        lines[n] = f"{head}: {rng.choice(WEIRD_YAML)}"
    elif kind == 2:
        lines.insert(n, lines[rng.randrange(len(lines))])
    elif kind == 3:
        del lines[n]
    elif kind == 4:
        return mutate_bytes(text.encode(), rng)
    else:
        bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + \
               [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
        lines = bomb + ["optim: {lr: *a8}"] + lines
    return ("\n".join(lines) + "\n").encode()


def png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` (the pixel data is a few bytes: a lying header)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------ the pass
@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from trainer.config import ModelConfig
    from trainer.data.coco_index import load_coco_index
    from trainer.models import build_model
    from trainer.weights import save_weights

    root = tmp_path_factory.mktemp("weights")
    coco, _ = simple_dataset(root, count=2)
    small = ModelConfig(name="fasterrcnn_mobilenet_v3_large_320_fpn", min_size=64, max_size=64)
    torch.manual_seed(0)
    save_weights(str(root / "model.pt"), build_model(small, 3).state_dict(), small, load_coco_index(str(coco)))
    return root / "model.pt"


def test_every_entry_point_survives_mutated_inputs(tmp_path: Path, weights: Path) -> None:
    rng = random.Random(SEED)
    cases: list[dict[str, Any]] = []

    def cli(*argv: str) -> None:
        cases.append({"entry": "cli", "argv": [str(a) for a in argv]})

    # COCO JSON → show (in-process) and a few stats runs (loader workers)
    coco, images = simple_dataset(tmp_path / "data", count=4)
    doc = json.loads(coco.read_text())
    for n in range(40):
        path = tmp_path / f"coco_{n}.json"
        path.write_text(mutate_json(doc, rng))
        cli("show", "--coco", path, "--images", images, "--out", tmp_path / f"show_{n}", "--n", "2")
        if n < 3:
            cli("stats", "--coco", path, "--images", images, "--workers", "1")

    # images (decode, header limits) → predict and stats over one folder of mutated files
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = image_with_rectangles(64, 48, [(4, 4, 30, 30)])
    jpeg = (BCCD / "JPEGImages" / "BloodImage_00000.jpg").read_bytes()
    entries = []
    for n in range(24):
        name = f"m_{n:02d}.{'png' if n % 2 else 'jpg'}"
        data = mutate_bytes(good if n % 2 else jpeg, rng)
        if n in (5, 11):
            data = png_with_header(60000, 60000)
        if n == 7:
            data = png_with_header(0, 10)
        (folder / name).write_bytes(data)
        entries.append({"id": n + 1, "file_name": name, "width": 64, "height": 48})
    (folder / "fine.png").write_bytes(good)
    (tmp_path / "imgs.json").write_text(json.dumps({
        "images": entries, "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": e["id"], "image_id": e["id"], "category_id": 1, "bbox": [4, 4, 26, 26]}
                        for e in entries]}))
    cli("predict", "--weights", weights, "--images", folder, "--out", tmp_path / "pred", "--score-thr", "0",
        "--no-pictures")
    cli("stats", "--coco", tmp_path / "imgs.json", "--images", folder, "--workers", "1")
    cli("show", "--coco", tmp_path / "imgs.json", "--images", folder, "--out", tmp_path / "show_imgs", "--n", "8")

    # VOC XML → convert, with and without JPEGImages
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    sources = sorted((BCCD / "Annotations").glob("*.xml"))[:30]
    for source in sources:
        (voc / "Annotations" / source.name).write_bytes(mutate_xml(source.read_text(), rng))
        image = BCCD / "JPEGImages" / (source.stem + ".jpg")
        if image.exists():
            shutil.copyfile(image, voc / "JPEGImages" / image.name)
    cli("convert", "--voc-root", voc, "--out", tmp_path / "conv", "--all", "--workers", "1",
        "--report", tmp_path / "report.json")
    cli("convert", "--voc-root", voc, "--out", tmp_path / "conv2", "--annotations-only", "--workers", "1")

    # YAML configs → eval (config, then data) and checkpoint manifests → ckpt ls / export
    base = (REPO / "configs" / "shapes.yaml").read_text()
    for n in range(30):
        path = tmp_path / f"config_{n}.yaml"
        path.write_bytes(mutate_yaml(base, rng))
        cli("eval", "--config", path, "--weights", tmp_path / "none.pt")
    run = tmp_path / "run" / "checkpoints"
    (run / "step-000000002").mkdir(parents=True)
    for n in range(6):
        (run / "latest.json").write_bytes(mutate_bytes(b'{"step": 2, "uri": "step-000000002"}', rng))
        (run / "step-000000002" / "manifest.json").write_text(mutate_json(
            {"step": 2, "objects": {"model.pt": {"size": 10, "sha256": "0" * 64}}}, rng))
        cli("ckpt", "ls", tmp_path / "run", "--verify")
        cli("ckpt", "export", tmp_path / "run", "--out", tmp_path / f"export_{n}.pt")

    # kubeconfigs → watch (a server on a closed loopback port when one is named at all)
    for n, text in enumerate(["garbage: [", "{}", "clusters: 5\ncontexts: x\n", "\x00\x01\x02",
                              "apiVersion: v1\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:9'}}]\n"
                              "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
                              "users: [{name: u, user: {token: t}}]\n"]):
        path = tmp_path / f"kubeconfig_{n}"
        path.write_text(text)
        cli("watch", "rel", "--kubeconfig", path)

    results = run_cases(cases, tmp_path)
    assert len(results) == len(cases)
    assert_clean(results)
    codes = {r["code"] for r in results}
    assert codes >= {0, 1}  # the pass reaches both working and failing paths


def test_trainer_train_survives_mutated_configs(tmp_path: Path) -> None:
    """Configs that pass validation go on to a missing data file (exit 1); the rest stop at the config (2)."""
    rng = random.Random(SEED + 1)
    base = (REPO / "configs" / "shapes.yaml").read_text()
    cases = []
    for n in range(25):
        path = tmp_path / f"config_{n}.yaml"
        path.write_bytes(mutate_yaml(base, rng))
        cases.append({"entry": "train", "argv": ["--config", str(path), "--set", f"run.dir={tmp_path / 'runs'}",
                                                 "--set", "checkpoint.resume=never"]})
    for override in ("optim.lr=.inf", "schedule.gamma=-1", "data.tiles.overlap=700", "data.cache_gb=.inf",
                     "run.name=..", "data.mean=[.nan, 0, 0]"):
        cases.append({"entry": "train", "argv": ["--config", str(REPO / "configs" / "shapes.yaml"), "--set",
                                                 override]})
    cases.append({"entry": "train", "argv": ["--config", str(tmp_path / "missing.yaml")]})
    results = run_cases(cases, tmp_path)
    assert_clean(results)
    assert all(r["code"] == 2 for r in results[-7:]), [(r["argv"], r["code"]) for r in results[-7:]]
