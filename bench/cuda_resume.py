"""Preemption and resume on a GPU, with the production recipe (configs/bccd_frcnn.yaml: Faster R-CNN ResNet-50
FPN v2, AMP, EMA, multiscale) on BCCD's real JPEGs from local disk.

Three runs of the same config under ``trainer-launch --nproc-per-node=1`` (torchrun with the trainer's exit codes):

* **reference** and **repeat**: uninterrupted. Their difference is the device's own run-to-run noise: on CUDA some
  kernels (roi_align's backward, index_put/scatter-add) add in a nondeterministic order even with
  ``train.deterministic``, so bitwise equality is not promised there (on the CPU it is, and
  tests/integration/test_resume.py checks it);
* **preempted**: SIGTERM once the rank-0 progress line passes ``--stop-at`` global steps (what Kubernetes sends on
  eviction), then the same command again, which must resume from the checkpoint the stop committed.

Prints the exit codes, the step the restart resumed at, the largest weight difference of each pair (the resumed
run must differ from the reference no more than the repeat does, within ``--slack``), the final AP of each run,
images/s and peak GPU memory. Exits 1 if a check fails. On the CPU it runs too (slowly): pass a small model.
Run: ``python bench/cuda_resume.py [--epochs 3] [--stop-at 40]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from trainer.annotations.convert import ConvertOptions, convert  # noqa: E402
from trainer.exit_codes import EXIT_OK, EXIT_PREEMPTED  # noqa: E402
from trainer.local_s3 import free_port  # noqa: E402
from trainer.progress import parse_progress  # noqa: E402

BCCD = REPO / "examples" / "data" / "bccd"
RUN_TIMEOUT_S = 600


def run_overrides(coco: Path, run_dir: Path, args: argparse.Namespace) -> list[str]:
    images = str(BCCD / "JPEGImages")
    settings = [
        f"data.train.coco={coco / 'train.json'}", f"data.train.images={images}",
        f"data.val.coco={coco / 'val.json'}", f"data.val.images={images}",
        f"run.dir={run_dir}", "run.name=r", "model.weights=null", f"model.name={args.model}",
        f"data.batch_size={args.batch_size}", f"data.workers={args.workers}", f"schedule.epochs={args.epochs}",
        "schedule.warmup_iters=20", "train.deterministic=true", "checkpoint.every_steps=10", "log.every_steps=5",
        *args.set,
    ]
    return [arg for setting in settings for arg in ("--set", setting)]


def start(overrides: list[str], log_path: Path) -> subprocess.Popen[str]:
    # trainer-launch, as the chart's pods run it: torchrun's own agent exits 1 on SIGTERM whatever its workers did.
    command = [sys.executable, "-m", "trainer.launch", "--nnodes=1", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--local-addr=127.0.0.1",
               "-m", "trainer.train", "--config", str(REPO / "configs" / "bccd_frcnn.yaml"), *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"  $ {log_path.stem}: trainer-launch ... trainer.train (log {log_path})", flush=True)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def run(name: str, run_dir: Path, coco: Path, logs: Path, args: argparse.Namespace,
        stop_at: int | None = None) -> tuple[int, list[str]]:
    """One run of the recipe into ``run_dir``, its output in ``logs/<name>.log``: (exit code, output lines)."""
    log_path = logs / f"{name}.log"
    return follow(start(run_overrides(coco, run_dir, args), log_path), log_path, stop_at)


def global_step(line: str) -> int | None:
    """The global step of a progress line (one process: no rank tag), else None."""
    progress = parse_progress(line)
    return None if progress is None else (progress.epoch - 1) * progress.steps + progress.step


def follow(proc: subprocess.Popen[str], log_path: Path, stop_at: int | None = None) -> tuple[int, list[str]]:
    """Copy the run's output to ``log_path`` until it exits; SIGTERM it once past ``stop_at`` global steps."""
    assert proc.stdout is not None
    lines: list[str] = []
    watchdog = threading.Timer(RUN_TIMEOUT_S, proc.kill)  # a hung run is killed; its output then ends
    watchdog.start()
    with log_path.open("w") as log:
        for line in proc.stdout:  # ends when the run exits
            log.write(line)
            log.flush()
            lines.append(line.rstrip("\n"))
            step = global_step(line)
            if stop_at is not None and step is not None and step >= stop_at:
                print(f"    SIGTERM at global step {step}", flush=True)
                proc.send_signal(signal.SIGTERM)
                stop_at = None
    watchdog.cancel()
    return proc.wait(timeout=60), lines


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "r" / "model_final.pt", map_location="cpu", weights_only=True)["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def summary(run_dir: Path) -> dict[str, float | None]:
    records = [json.loads(line) for line in (run_dir / "r" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    rates = sorted(r["images_per_s"] for r in train[2:]) or [0.0]  # the first windows are warm-up
    return {"images_per_s_median": rates[len(rates) // 2], "final_AP": evals[-1].get("AP") if evals else None,
            "final_AP50": evals[-1].get("AP50") if evals else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fasterrcnn_resnet50_fpn_v2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--stop-at", type=int, default=40, help="global step after which SIGTERM is sent")
    parser.add_argument("--slack", type=float, default=4.0,
                        help="resumed-vs-reference difference allowed, as a multiple of repeat-vs-reference")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    parser.add_argument("--out", type=Path, help="folder for the run logs (default: a temporary one)")
    args = parser.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no CUDA)"
    print(f"cuda resume check on {device}, torch {torch.__version__}, model {args.model}", flush=True)
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-cuda-resume-") as tmp:
        work = Path(tmp)
        logs = args.out or work
        logs.mkdir(parents=True, exist_ok=True)
        convert(ConvertOptions(str(BCCD), str(work / "coco"), splits=["train", "val"], workers=1),
                on_progress=lambda _: None)
        codes, outputs = {}, {}
        for name in ("reference", "repeat"):
            codes[name], outputs[name] = run(name, work / name, work / "coco", logs, args)
        stopped, _ = run("stopped", work / "preempted", work / "coco", logs, args, stop_at=args.stop_at)
        codes["resumed"], outputs["resumed"] = run("resumed", work / "preempted", work / "coco", logs, args)
        print(f"exit codes: reference {codes['reference']}, repeat {codes['repeat']}, stopped {stopped} "
              f"(expected {EXIT_PREEMPTED}), resumed {codes['resumed']}")
        if stopped != EXIT_PREEMPTED:
            failures.append(f"the SIGTERM-ed run exited {stopped}, not {EXIT_PREEMPTED}")
        for name, code in codes.items():
            if code != EXIT_OK:
                failures.append(f"{name} exited {code}: " + " | ".join(outputs[name][-5:]))
        resumed_at = [line for line in outputs["resumed"] if "resumed from" in line][:1]
        print("resume lines:", *resumed_at, sep="\n  ")
        if not resumed_at:
            failures.append("the restart printed no resume line")
        if not failures:
            reference = final_state(work / "reference")
            noise = max_difference(reference, final_state(work / "repeat"))
            resumed = max_difference(reference, final_state(work / "preempted"))
            print(f"largest weight difference: repeat vs reference {noise:.3g}, resumed vs reference {resumed:.3g}")
            if resumed > args.slack * max(noise, 1e-12):
                failures.append(f"the resumed run differs by {resumed:.3g}, more than {args.slack}x the device's "
                                f"run-to-run noise ({noise:.3g})")
            for name in ("reference", "repeat", "preempted"):
                print(f"{name}: {summary(work / name)}")
            last = [line for line in outputs["reference"] if " mem " in line][-1:]
            print("last progress line of the reference:", *last)
    print("RESULT:", "ok" if not failures else "FAILED\n  " + "\n  ".join(failures))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
