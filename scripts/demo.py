"""`make demo`: the main job on its embedded default, end to end on this machine.

It starts a local S3-compatible server on loopback, uploads the bundled BCCD sample into a bucket, and runs
what the trainer can do so far through its real command line, printing each command so you can repeat it
against your own bucket. The server is stopped on exit, including Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
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

from trainer.local_s3 import LocalS3Server  # noqa: E402

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


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "demo-output", help="local folder for the outputs")
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

        say("Stopping the local S3 server")
    print(f"\nDemo finished in {time.monotonic() - started:.1f} s.")
    print(f"Outputs: {out}/bccd (the data set as read back from S3)")
    print(f"         {out}/coco (COCO JSON per split + report.json, made by `trainer convert` in S3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
