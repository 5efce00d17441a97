"""Run real torchrun process groups on loopback only (gloo on lo, rendezvous on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from trainer.local_s3 import free_port
from trainer.progress import parse_progress

REPO = Path(__file__).resolve().parents[2]


def _loopback_launch(nproc: int, max_restarts: int, env: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
    """The torchrun command prefix and environment: rendezvous, gloo and every socket on 127.0.0.1."""
    full_env = dict(os.environ if env is None else env)
    full_env.update({"GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
                     "PYTHONPATH": str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")})
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--local-addr=127.0.0.1",
               f"--max-restarts={max_restarts}", "--monitor-interval=0.5"]
    return command, full_env


def torchrun(script: Path | str, *args: str, nproc: int = 2, max_restarts: int = 0, timeout: float = 300,
             env: dict[str, str] | None = None, module: bool = False) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node=N`` on this machine, every socket on 127.0.0.1."""
    command, full_env = _loopback_launch(nproc, max_restarts, env)
    command += ["-m", str(script)] if module else [str(script)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=REPO)


def start_torchrun(*args: str, nproc: int = 2, max_restarts: int = 0,
                   env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``torchrun ... -m trainer.train ARGS`` started in the background, stdout and stderr merged into one pipe."""
    command, full_env = _loopback_launch(nproc, max_restarts, env)
    return subprocess.Popen([*command, "-m", "trainer.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=full_env, cwd=REPO)


def worker_pids(agent_pid: int) -> list[int]:
    """The worker processes torchrun started (its direct children), from /proc."""
    path = Path(f"/proc/{agent_pid}/task/{agent_pid}/children")
    try:
        return [int(pid) for pid in path.read_text().split()]
    except OSError:
        return []


def global_step_of(line: str) -> int | None:
    """The global step of a rank-0 progress line (``... [rank 0] epoch 2/3 step 3/5 ...``), else None."""
    progress = parse_progress(line.split("] ", 1)[-1]) if "[rank 0]" in line else None
    return None if progress is None else (progress.epoch - 1) * progress.steps + progress.step


def lr_by_samples(run_dir: Path) -> dict[int, tuple[int, float]]:
    """samples consumed → (epoch, lr) of every training record in ``<run_dir>/r/metrics.jsonl``."""
    out = {}
    for line in (run_dir / "r" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            out[record["samples"]] = (record["epoch"], record["lr"])
    return out


def assert_same_lr_curve(resumed: dict[int, tuple[int, float]], expected: dict[int, tuple[int, float]],
                         after_samples: int) -> None:
    """The LR at every sample count both runs logged is equal (1e-9 relative), in the same epoch; at least four
    such points lie after ``after_samples`` (the resume), and both runs end at the same LR."""
    common = [samples for samples in resumed if samples in expected]
    assert len([s for s in common if s > after_samples]) >= 4, (sorted(resumed), sorted(expected))
    for samples in common:
        (epoch, lr), (ref_epoch, ref_lr) = resumed[samples], expected[samples]
        assert epoch == ref_epoch and abs(lr - ref_lr) <= 1e-9 * abs(ref_lr), (samples, lr, ref_lr)
    assert max(resumed) == max(expected)
    last = max(expected)
    assert abs(resumed[last][1] - expected[last][1]) <= 1e-9 * abs(expected[last][1]) + 1e-15  # the final LR
