"""Steady-state training speed of ``trainer.train`` versus a bare DDP loop, measured in the same run.

Both run under ``torchrun --nproc-per-node=N`` (gloo on loopback) with the same model, options, optimizer, batch
and images (the generated shapes set):

* **trainer**: ``python -m trainer.train`` for one epoch (evaluation off), images/s read from its
  ``metrics.jsonl`` windows, the first window (warm-up) left out;
* **bare DDP loop**: the batches pre-decoded into memory once, then forward, backward, clip, optimizer and
  schedule step, nothing else (``bench/_bare_ddp.py``), timed after the same warm-up.

Rounds alternate (trainer, bare, trainer, bare...) so drift on a shared machine hits both; the medians are
compared. Target: trainer / bare >= 0.97. Run: ``.venv/bin/python bench/train_overhead.py [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.local_s3 import free_port  # noqa: E402
from trainer.synth import make_shapes_dataset  # noqa: E402

# The shapes recipe of configs/shapes.yaml (bench/learning.py is the proof of learning).
RECIPE = ["schedule.epochs=1", "eval.every_epochs=0", "log.every_steps=5", "data.aspect_ratio_groups=0"]


def torchrun(nproc: int, *command: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--local-addr=127.0.0.1", *command],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=1800, check=False)


def trainer_rate(nproc: int, overrides: list[str], run_dir: Path, name: str) -> float:
    args = [x for o in [*overrides, f"run.dir={run_dir}", f"run.name={name}"] for x in ("--set", o)]
    result = torchrun(nproc, "-m", "trainer.train", "--config", "configs/shapes.yaml", *args)
    if result.returncode != 0:
        raise SystemExit(f"trainer run failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if r["kind"] == "train"][1:]  # first window: warm-up
    return statistics.median(rates)


def bare_rate(nproc: int, overrides: list[str], warmup: int) -> float:
    args = [x for o in overrides for x in ("--set", o)]
    result = torchrun(nproc, "bench/_bare_ddp.py", "--config", "configs/shapes.yaml", "--warmup", str(warmup), *args)
    if result.returncode != 0:
        raise SystemExit(f"bare loop failed:\n{result.stderr[-3000:]}")
    return float(next(line for line in result.stdout.splitlines() if line.startswith("images/s ")).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--n", type=int, default=240, help="generated images (80%% train: one epoch per round)")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides for both")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = make_shapes_dataset(str(Path(tmp) / "shapes"), n=args.n, size=192, seed=0)
        overrides = [*RECIPE, f"data.train.coco={data.train_uri}", f"data.train.images={data.images_uri}",
                     "data.val.coco=", *args.set]
        ours, bare = [], []
        for round_index in range(args.rounds):
            ours.append(trainer_rate(args.nproc, overrides, Path(tmp) / "runs", f"r{round_index}"))
            bare.append(bare_rate(args.nproc, overrides, warmup=5))
            print(f"round {round_index + 1}: trainer {ours[-1]:.2f} img/s, bare DDP loop {bare[-1]:.2f} img/s",
                  flush=True)
    ratio = statistics.median(ours) / statistics.median(bare)
    print(f"\n| loop | images/s (median of {args.rounds}) |\n|---|---|")
    print(f"| trainer.train | {statistics.median(ours):.2f} |\n| bare DDP loop | {statistics.median(bare):.2f} |")
    print(f"ratio trainer / bare: {ratio:.3f} (target >= 0.97) on {args.nproc} processes, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
