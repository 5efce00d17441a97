"""Proof of learning: the generated shapes set, 2 torchrun processes on this machine's CPU, mAP over time.

Runs ``configs/shapes.yaml`` (overridable with ``--set``) on a fresh ``trainer synth`` set and prints, for every
evaluation, the wall time since the start and AP / AP50; then when AP50 first reached ``--target`` (0.9) and
whether that was within ``--minutes`` (10). Run: ``.venv/bin/python bench/learning.py [--n 400]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.local_s3 import free_port  # noqa: E402
from trainer.synth import make_shapes_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="generated images (20%% validation)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.9, help="AP50 to reach")
    parser.add_argument("--minutes", type=float, default=10.0, help="time budget for the target")
    parser.add_argument("--set", action="append", default=[], help="config overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
        data = make_shapes_dataset(str(Path(tmp) / "shapes"), n=args.n, size=192, seed=0)
        settings = [f"data.train.coco={data.train_uri}", f"data.train.images={data.images_uri}",
                    f"data.val.coco={data.val_uri}", f"data.val.images={data.images_uri}",
                    f"run.dir={tmp}/runs", "run.name=learning", "checkpoint.resume=never", *args.set]
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        started = time.time()
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={args.nproc}",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--local-addr=127.0.0.1",
             "-m", "trainer.train", "--config", "configs/shapes.yaml", *[x for s in settings for x in ("--set", s)]],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=7200, check=False)
        if result.returncode != 0:
            raise SystemExit(f"training failed:\n{result.stderr[-3000:]}")
        records = [json.loads(line) for line in (Path(tmp) / "runs" / "learning" / "metrics.jsonl").open()]
    evals = [r for r in records if r["kind"] == "eval"]
    print(f"shapes set: {args.n} images of 192 px, {args.nproc} processes, {os.cpu_count()} cores; "
          f"total {(time.time() - started) / 60:.1f} min")
    print("| minutes | epoch | AP | AP50 |\n|---|---|---|---|")
    reached = None
    for record in evals:
        minutes = (record["time"] - started) / 60
        print(f"| {minutes:.1f} | {record['epoch']} | {record['AP']:.3f} | {record['AP50']:.3f} |")
        if reached is None and record["AP50"] >= args.target:
            reached = minutes
    if reached is None:
        print(f"AP50 {args.target} not reached (best {max(r['AP50'] for r in evals):.3f})")
    else:
        verdict = "within" if reached <= args.minutes else "over"
        print(f"AP50 >= {args.target} after {reached:.1f} min ({verdict} the {args.minutes:g}-minute target)")


if __name__ == "__main__":
    main()
