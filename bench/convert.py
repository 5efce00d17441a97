"""`trainer convert` against a straightforward sequential ElementTree converter, in the same run.

Generates a seeded synthetic Pascal VOC set (default 20,000 XML files, 1-30 objects each, 20 classes, train/val
splits), then runs both converters as separate processes, from local disk and from the local S3 server, and
prints wall time, CPU time (user + system, workers included) and peak memory (summed over the process tree: RSS
and PSS, sampled every 10 ms in a separate run, as the sampler shares the cores) with ratios,
for each ``--workers`` count against the same baseline run. Both outputs are checked to hold the same boxes, and
every worker count to write the same bytes.
``--phases`` also prints the main process's serial work per file, phase by phase (taking the workers' folder
listings, gathering and resolving, classes, ids, writing), timed in this process on results listed and parsed
beforehand: past a few workers that work, not the workers, bounds the wall time.
``--reads`` also measures the client CPU per object of reading and parsing the annotations from an S3 endpoint that
costs little CPU itself (nginx, bench/_static_s3.py; moto spends as much CPU per request as the client, and its slow
answers inflate the client's too): a converter worker's ``parse_chunk`` against the baseline's sequential boto3
``get_object`` and ElementTree parse, each in its own process. nginx cannot list, so this row reads a known list of
keys instead of converting.
Run: ``.venv/bin/python bench/convert.py [--files N] [--workers 1,2] [--repeat N] [--no-s3] [--phases] [--reads]``.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer import storage  # noqa: E402
from trainer.local_s3 import LocalS3Server  # noqa: E402

CLASSES = [f"class_{i:02d}" for i in range(20)]

# The baseline: what a user writes in an afternoon (and what public voc2coco scripts do), reading through
# plain boto3 when the data is in S3. Kept inside the bench so the comparison is visible and fixed.
BASELINE = textwrap.dedent('''
    import json, os, sys, xml.etree.ElementTree as ET
    root, out = sys.argv[1], sys.argv[2]
    s3 = None
    if root.startswith("s3://"):
        import boto3
        s3 = boto3.client("s3")
        bucket, _, prefix = root[5:].partition("/")
    def read(rel):
        if s3 is None:
            with open(os.path.join(root, rel), "rb") as f:
                return f.read()
        return s3.get_object(Bucket=bucket, Key=prefix + "/" + rel)["Body"].read()
    for split in ("train", "val"):
        ids = read(f"ImageSets/Main/{split}.txt").decode().split()
        output = {"images": [], "type": "instances", "annotations": [], "categories": []}
        label2id = {}
        bnd_id = 1
        for img_id, stem in enumerate(ids, start=1):
            tree = ET.ElementTree(ET.fromstring(read(f"Annotations/{stem}.xml")))
            ann_root = tree.getroot()
            size = ann_root.find("size")
            output["images"].append({"file_name": ann_root.findtext("filename"), "height": int(size.findtext("height")),
                                     "width": int(size.findtext("width")), "id": img_id})
            for obj in ann_root.findall("object"):
                label = obj.findtext("name")
                if label not in label2id:
                    label2id[label] = len(label2id) + 1
                bndbox = obj.find("bndbox")
                xmin = float(bndbox.findtext("xmin"))
                ymin = float(bndbox.findtext("ymin"))
                xmax = float(bndbox.findtext("xmax"))
                ymax = float(bndbox.findtext("ymax"))
                w, h = xmax - xmin, ymax - ymin
                output["annotations"].append({"area": w * h, "iscrowd": 0, "bbox": [xmin, ymin, w, h],
                                              "category_id": label2id[label], "ignore": 0, "segmentation": [],
                                              "image_id": img_id, "id": bnd_id})
                bnd_id += 1
        for label, label_id in label2id.items():
            output["categories"].append({"supercategory": "none", "id": label_id, "name": label})
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{split}.json"), "w") as f:
            f.write(json.dumps(output))
''')


def generate(root: Path, files: int, seed: int) -> None:
    rng = random.Random(seed)
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    stems = [f"img_{i:06d}" for i in range(files)]
    for stem in stems:
        width, height = rng.choice([(640, 480), (1024, 768), (800, 600)])
        objects = []
        for _ in range(rng.randint(1, 30)):
            x0, y0 = rng.uniform(0, width - 20), rng.uniform(0, height - 20)
            x1, y1 = rng.uniform(x0 + 2, width), rng.uniform(y0 + 2, height)
            objects.append(
                f"\t<object>\n\t\t<name>{rng.choice(CLASSES)}</name>\n\t\t<pose>Unspecified</pose>\n"
                f"\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n"
                f"\t\t\t<xmin>{x0:.1f}</xmin>\n\t\t\t<ymin>{y0:.1f}</ymin>\n"
                f"\t\t\t<xmax>{x1:.1f}</xmax>\n\t\t\t<ymax>{y1:.1f}</ymax>\n\t\t</bndbox>\n\t</object>\n")
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation>\n\t<folder>JPEGImages</folder>\n\t<filename>{stem}.jpg</filename>\n"
            f"\t<source>\n\t\t<database>synthetic</database>\n\t</source>\n\t<size>\n\t\t<width>{width}</width>\n"
            f"\t\t<height>{height}</height>\n\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n"
            + "".join(objects) + "</annotation>\n")
        (root / "JPEGImages" / f"{stem}.jpg").write_bytes(b"")  # listed only: sizes come from the XML
    cut = files * 4 // 5
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(stems[:cut]) + "\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(stems[cut:]) + "\n")


def _tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            pids += _tree(int(child))
    except OSError:
        pass
    return pids


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over a process and its descendants."""
    rss = pss = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def measure(command: list[str], env: dict[str, str], sample_memory: bool) -> dict[str, float]:
    """Wall and CPU time of one run; with ``sample_memory``, also the peak memory of its process tree (the 10 ms
    sampler reads /proc for every process of the tree, so timed runs go without it: it shares the cores)."""
    peak = [0, 0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, pss = _memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    _, stderr = proc.communicate(timeout=1800)
    wall = time.perf_counter() - start
    done.set()
    if sample_memory:
        sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the converter and its workers, once waited for
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if proc.returncode not in (0,):
        raise SystemExit(f"{command[:4]} failed ({proc.returncode}):\n{stderr.decode()[-2000:]}")
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": peak[0] / 1e6, "peak_pss_mb": peak[1] / 1e6}


def same_boxes(ours: Path | str, base: Path) -> bool:
    for split in ("train", "val"):
        a = json.loads(storage.read_text(storage.join(str(ours), f"{split}.json")))
        b = json.loads((base / f"{split}.json").read_text())
        names_a = {c["id"]: c["name"] for c in a["categories"]}
        names_b = {c["id"]: c["name"] for c in b["categories"]}
        files_a = {i["id"]: i["file_name"] for i in a["images"]}
        files_b = {i["id"]: i["file_name"] for i in b["images"]}
        boxes_a = sorted((files_a[x["image_id"]], names_a[x["category_id"]], *[round(v, 4) for v in x["bbox"]])
                         for x in a["annotations"])
        boxes_b = sorted((files_b[x["image_id"]], names_b[x["category_id"]], *[round(v, 4) for v in x["bbox"]])
                         for x in b["annotations"])
        if boxes_a != boxes_b:
            return False
    return True


def best_of(command: list[str], env: dict[str, str], repeat: int) -> dict[str, float]:
    """The fastest of ``repeat`` timed runs, and the peak memory of one more run made to sample it."""
    runs = [measure(command, env, sample_memory=False) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["wall_s"])
    memory = measure(command, env, sample_memory=True)
    return {**best, "cpu_s": min(r["cpu_s"] for r in runs), "peak_rss_mb": memory["peak_rss_mb"],
            "peak_pss_mb": memory["peak_pss_mb"]}


def compare(label: str, root: str, out_ours: str, out_base: Path, env: dict[str, str], workers: list[int],
            baseline_py: Path, repeat: int) -> list[dict[str, object]]:
    base = best_of([sys.executable, str(baseline_py), root, str(out_base)], env, repeat)
    print(f"  {label:<11} baseline (sequential ElementTree) {base['wall_s']:6.2f} s  CPU {base['cpu_s']:6.2f} s"
          f"  RSS {base['peak_rss_mb']:6.0f} MB"
          f"  PSS {base['peak_pss_mb']:6.0f} MB", flush=True)
    rows: list[dict[str, object]] = []
    for count in workers:
        out = storage.join(out_ours, f"w{count}")
        ours = best_of([sys.executable, "-m", "trainer", "convert", "--voc-root", root, "--out", out,
                        "--workers", str(count), "--log-level", "WARNING"], env, repeat)
        row = {"case": label, "workers": count, "ours": ours, "baseline": base,
               "speedup": base["wall_s"] / ours["wall_s"], "cpu_ratio": ours["cpu_s"] / base["cpu_s"],
               "rss_ratio": ours["peak_rss_mb"] / base["peak_rss_mb"],
               "pss_ratio": ours["peak_pss_mb"] / base["peak_pss_mb"], "same_boxes": same_boxes(out, out_base),
               "same_bytes_as_first": _read_outputs(out) == _read_outputs(storage.join(out_ours, f"w{workers[0]}"))}
        print(f"  {label:<11} --workers {count}  {ours['wall_s']:6.2f} s  CPU {ours['cpu_s']:6.2f} s"
              f"  RSS {ours['peak_rss_mb']:6.0f} MB  PSS {ours['peak_pss_mb']:6.0f} MB | {row['speedup']:.2f}x faster"
              f" (CPU time x{row['cpu_ratio']:.2f}), whole-tree peak RSS"
              f" x{row['rss_ratio']:.2f} (PSS x{row['pss_ratio']:.2f}), same boxes: {row['same_boxes']},"
              f" same bytes as --workers {workers[0]}: {row['same_bytes_as_first']}", flush=True)
        rows.append(row)
    return rows


def _read_outputs(out: str) -> list[bytes]:
    return [storage.read_bytes(storage.join(out, f"{split}.json")) for split in ("train", "val")]


def parent_phases(root: Path, repeat: int = 7) -> dict[str, float]:
    """Microseconds per file of each serial phase of the main process (median of ``repeat``), on worker results
    (listings and parsed files) pickled beforehand, as the workers send them."""
    import io
    import pickle
    import statistics

    from trainer.annotations import convert as c
    from trainer.annotations.coco import write_coco

    options = c.ConvertOptions(str(root), str(root / "unused"), workers=1)
    rules = c.BoxRules(options.voc_offset, options.difficult)
    tree = c._list_voc_tree(options)
    uris = [tree.xmls[name] for name in sorted(tree.xmls)]
    chunks = [pickle.dumps(c.parse_chunk_packed(uris[i : i + 500], rules)) for i in range(0, len(uris), 500)]
    listings = [pickle.dumps(c._list_xmls(tree.ann_dir)), pickle.dumps(c._list_images(str(root / "JPEGImages")))]
    times: dict[str, list[float]] = {}

    def timed(name: str, start: float) -> float:
        now = time.perf_counter()
        times.setdefault(name, []).append(now - start)
        return now

    for _ in range(repeat):
        with c._collector_paused():  # as convert() runs
            problems = c._Problems()
            t = time.perf_counter()
            xmls, (images, by_stem) = pickle.loads(listings[0]), pickle.loads(listings[1])  # listed by two workers
            splits = c.read_splits(str(root / "ImageSets" / "Main"), None)
            tree = c._VocTree(tree.ann_dir, xmls, images, by_stem, splits)
            t = timed("take the listings, read splits", t)
            gathered = (c._unpack(item) for chunk in chunks for item in pickle.loads(chunk))
            kept = c._keep_annotated(gathered, tree, options, problems, rules)
            t = timed("unpickle, unpack, resolve images", t)
            categories, mapping, _ = c._classes(kept, None, problems)
            t = timed("classes", t)
            entries = c._entries(kept, mapping, problems)
            members = c._split_members(tree, entries, kept, problems)
            t = timed("ids and splits", t)
            for chosen in members.values():
                write_coco(io.BytesIO(), chosen, categories, "bench")
            timed("write the JSON (to memory)", t)
    return {name: statistics.median(values) * 1e6 / len(uris) for name, values in times.items()}


# The two readers of the --reads row, each run in its own process: the key list comes on stdin, the client CPU
# (user + system) per object of the timed pass goes to stdout. Both read every key once untimed first (connections,
# the client's set-up), then once timed.
_READS_OURS = """
import resource, sys
from trainer import storage
from trainer.annotations.convert import BoxRules, parse_chunk
uris = sys.stdin.read().split()
storage.forks_no_readers()  # as a converter worker declares
chunks = [uris[i : i + 500] for i in range(0, len(uris), 500)]
for chunk in chunks:
    parse_chunk(chunk, BoxRules())
before = resource.getrusage(resource.RUSAGE_SELF)
for chunk in chunks:
    parse_chunk(chunk, BoxRules())
after = resource.getrusage(resource.RUSAGE_SELF)
print((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / len(uris))
"""
_READS_BASELINE = """
import resource, sys, xml.etree.ElementTree as ET
import boto3
keys = [uri[len("s3://bench/"):] for uri in sys.stdin.read().split()]
s3 = boto3.client("s3")
def convert_all():
    for key in keys:
        root = ET.fromstring(s3.get_object(Bucket="bench", Key=key)["Body"].read())
        [(o.findtext("name"), [float(o.find("bndbox").findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")])
         for o in root.findall("object")]
convert_all()
before = resource.getrusage(resource.RUSAGE_SELF)
convert_all()
after = resource.getrusage(resource.RUSAGE_SELF)
print((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / len(keys))
"""


def s3_reads(root: Path, work: Path, count: int) -> dict[str, float]:
    """Client CPU ms per object, reading and parsing ``count`` annotations from nginx: ours and the baseline's."""
    from _static_s3 import StaticS3, missing_tools

    problem = missing_tools()
    if problem:
        print(f"  S3 reads row skipped: {problem}")
        return {}
    (work / "s3root" / "bench").mkdir(parents=True)
    (work / "s3root" / "bench" / "Annotations").symlink_to(root / "Annotations")
    keys = sorted(path.name for path in (root / "Annotations").iterdir())[:count]
    uris = "\n".join(f"s3://bench/Annotations/{name}" for name in keys)
    with StaticS3(work / "s3root") as server:
        env = server.client_env()
        ms = {}
        for name, script in (("baseline", _READS_BASELINE), ("ours", _READS_OURS)):
            done = subprocess.run([sys.executable, "-c", script], input=uris, env=env, cwd=REPO, text=True,
                                  capture_output=True, timeout=1800)
            if done.returncode:
                raise SystemExit(f"the {name} reader failed:\n{done.stderr[-2000:]}")
            ms[name] = float(done.stdout) * 1000
    print(f"  S3 (nginx) reads and parsing, client CPU per object ({len(keys)} objects): baseline (boto3, "
          f"sequential) {ms['baseline']:.3f} ms, ours (a converter worker's parse_chunk) {ms['ours']:.3f} ms: "
          f"x{ms['ours'] / ms['baseline']:.2f}")
    return ms


def main() -> int:
    parser = argparse.ArgumentParser(description="trainer convert vs a sequential ElementTree converter")
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", default=f"1,{os.cpu_count() or 2}",
                        help="comma-separated worker counts, each compared with the same baseline run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per command: the fastest is reported")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 case")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--phases", action="store_true", help="also time the main process's serial phases")
    parser.add_argument("--reads", action="store_true",
                        help="also measure client CPU per object reading the annotations from nginx")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    # Installed packages run from compiled bytecode (pip and the image's compileall write it); a checkout run with
    # PYTHONDONTWRITEBYTECODE=1 would compile every edited module again in every timed run (30 to 50 ms of a
    # 1.4 s conversion), a cost the one-file baseline hardly pays.
    compileall.compile_dir(REPO / "trainer", quiet=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        baseline_py = work / "baseline_convert.py"
        baseline_py.write_text(BASELINE)
        started = time.perf_counter()
        generate(work / "voc", args.files, args.seed)
        print(f"convert bench: {args.files} synthetic VOC files (seed {args.seed}) generated in "
              f"{time.perf_counter() - started:.1f} s; {os.cpu_count()} CPUs, --workers {args.workers}, "
              f"best of {args.repeat}")
        env = dict(os.environ)
        rows += compare("local disk", str(work / "voc"), str(work / "ours"), work / "base", env, workers,
                        baseline_py, args.repeat)
        if args.phases:
            phases = parent_phases(work / "voc")
            print("  main process, serial work per file (median of 7, in this process):")
            for name, micros in phases.items():
                print(f"    {name:<34}{micros:7.1f} us")
            print(f"    {'total':<34}{sum(phases.values()):7.1f} us")
            rows.append({"case": "main process phases (us per file)", **phases})
        if args.reads:
            rows.append({"case": "S3 (nginx) reads, client CPU ms per object",
                         **s3_reads(work / "voc", work, min(args.files, 5000))})
        if not args.no_s3:
            with LocalS3Server("127.0.0.1") as server:
                server.apply_env(env)
                server.apply_env()
                import boto3

                boto3.client("s3", endpoint_url=server.endpoint_url).create_bucket(Bucket="bench")
                storage.copy_tree(work / "voc" / "Annotations", "s3://bench/voc/Annotations")
                storage.copy_tree(work / "voc" / "ImageSets", "s3://bench/voc/ImageSets")
                storage.copy_tree(work / "voc" / "JPEGImages", "s3://bench/voc/JPEGImages")
                rows += compare("S3 (moto)", "s3://bench/voc", "s3://bench/ours", work / "base-s3", env, workers,
                                baseline_py, args.repeat)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
