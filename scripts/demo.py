"""`make demo`: the main job on its embedded default, end to end on this machine.

It starts a local S3-compatible server on loopback, uploads the bundled BCCD sample into a bucket, converts its
VOC annotations to COCO in S3, trains a small detector with 2 CPU processes under torchrun reading the images
from S3 and checkpointing to S3, evaluates it, writes predictions and plots to S3, and copies the run back. Each
command is printed so you can repeat it against your own bucket. The server is stopped on exit, including Ctrl-C
and SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.local_s3 import LocalS3Server, free_port  # noqa: E402

SAMPLE = REPO / "examples" / "data" / "bccd"
BUCKET = "demo"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def trainer(env: dict[str, str], *args: str) -> str:
    """Run one `trainer` command as a user would, echoing it and its output."""
    print(f"$ trainer {shlex.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "trainer", *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    sys.stdout.write(result.stdout)
    sys.stdout.write(result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"demo: `trainer {shlex.join(args)}` failed with exit code {result.returncode}")
    return result.stdout


def torchrun(env: dict[str, str], nproc: int, *args: str) -> None:
    """`torchrun --nproc-per-node=N -m trainer.train ...` on loopback, its log streamed as it comes."""
    command = ["torchrun", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--local-addr=127.0.0.1", "-m", "trainer.train", *args]
    print(f"$ {shlex.join(command)}", flush=True)
    run_env = {**env, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    code = subprocess.run([sys.executable, "-m", "torch.distributed.run", *command[1:]], env=run_env, cwd=REPO,
                          timeout=3600).returncode
    if code != 0:
        raise SystemExit(f"demo: training failed with exit code {code}")


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo-output", help="local folder for the outputs")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs (about a minute each on 2 cores)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a training config override, as for trainer.train (repeatable), e.g. model.min_size=160")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on `kill`

    started = time.monotonic()
    out: Path = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    say("Starting a local S3-compatible server (moto) on loopback")
    with LocalS3Server("127.0.0.1") as server:
        env = dict(os.environ)
        server.apply_env(env)
        print(f"endpoint: {server.endpoint_url}  (AWS_ENDPOINT_URL for every command below)")
        import boto3  # only the bucket creation bypasses the trainer: creating buckets is not its job

        boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                     aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=BUCKET)
        print(f"created bucket s3://{BUCKET}")

        say("Uploading the bundled BCCD sample (Pascal VOC: JPEGs + XML) to the bucket")
        trainer(env, "cp", "--recursive", str(SAMPLE.relative_to(REPO)), f"s3://{BUCKET}/bccd")

        say("Listing what is in the bucket")
        trainer(env, "ls", f"s3://{BUCKET}/bccd/")
        trainer(env, "ls", "--recursive", "--summary", f"s3://{BUCKET}/bccd/ImageSets/")

        say("Converting the VOC annotations in S3 to COCO JSON, one file per split")
        trainer(env, "convert", "--voc-root", f"s3://{BUCKET}/bccd", "--out", f"s3://{BUCKET}/bccd/coco",
                "--report", f"s3://{BUCKET}/bccd/coco/report.json")
        trainer(env, "ls", f"s3://{BUCKET}/bccd/coco/")

        say("Copying the data set back from S3 and verifying every file")
        trainer(env, "cp", "--recursive", f"s3://{BUCKET}/bccd", str(out / "bccd"))
        coco = out / "bccd" / "coco"
        shutil.move(coco, out / "coco")
        expected, got = digests(SAMPLE), digests(out / "bccd")
        if expected != got:
            raise SystemExit(f"demo: {len(set(expected.items()) ^ set(got.items()))} files differ after the round trip")
        print(f"verified: {len(got)} files identical (sha256) after the local → S3 → local round trip")

        run = f"s3://{BUCKET}/runs/bccd-demo"
        say(f"Training on 2 CPU processes under torchrun: images read from S3, checkpoints and metrics to {run}")
        settings = [f"data.train.coco=s3://{BUCKET}/bccd/coco/train.json", f"data.train.images=s3://{BUCKET}/bccd/JPEGImages",
                    f"data.val.coco=s3://{BUCKET}/bccd/coco/val.json", f"data.val.images=s3://{BUCKET}/bccd/JPEGImages",
                    f"run.dir=s3://{BUCKET}/runs", f"schedule.epochs={args.epochs}", *args.overrides]
        torchrun(env, 2, "--config", "configs/demo_cpu.yaml", *[x for s in settings for x in ("--set", s)])

        say("The run's checkpoints (the latest is what a restarted job resumes from)")
        trainer(env, "ckpt", "ls", run)

        say("Evaluating the best weights again, alone, and predicting on a few images")
        trainer(env, "eval", "--config", f"{run}/config.yaml", "--weights", f"{run}/model_best.pt",
                "--out", f"{run}/eval.json")
        trainer(env, "predict", "--weights", f"{run}/model_best.pt",
                "--images", f"s3://{BUCKET}/bccd/JPEGImages/BloodImage_0000*.jpg", "--out", f"{run}/predictions",
                "--score-thr", "0.5")
        trainer(env, "ls", f"{run}/plots/")

        say("Copying the run back from S3")
        trainer(env, "cp", "--recursive", run, str(out / "run"))
        evaluated = json.loads((out / "run" / "eval.json").read_text())
        print(f"demo mAP on BCCD val after {args.epochs} epochs: AP {evaluated['AP']:.3f}, AP50 "
              f"{evaluated['AP50']:.3f} (per class: "
              + ", ".join(f"{k} {v:.3f}" for k, v in evaluated["per_class_ap"].items()) + ")")

        say("Stopping the local S3 server")
    print(f"\nDemo finished in {time.monotonic() - started:.1f} s.")
    print(f"Outputs: {out}/bccd (the data set as read back from S3)")
    print(f"         {out}/coco (COCO JSON per split + report.json, made by `trainer convert` in S3)")
    print(f"         {out}/run (config.yaml, metrics.jsonl, plots/, checkpoints/, model_best.pt, model_final.pt, "
          "predictions/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
