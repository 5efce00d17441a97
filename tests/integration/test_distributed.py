"""Real torchrun process groups (gloo, loopback): collectives work, and a group re-forms after a restart."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.support.torchrun import torchrun

WORKER = """
import os, sys, torch, torch.distributed as dist
from trainer.distributed import init_distributed, all_gather_objects, broadcast_object, barrier, shutdown
env = init_distributed(timeout_minutes=1)
if os.environ.get("FAIL_FIRST_ROUND") and env.rank == 1 and env.restart_count == 0:
    sys.exit(3)  # a worker crash: torchrun restarts the whole group
total = torch.ones(1) * (env.rank + 1)
dist.all_reduce(total)
ranks = all_gather_objects(env, env.rank)
word = broadcast_object(env, "hello" if env.is_main else None)
barrier(env)
print(f"RESULT rank={env.rank} world={env.world_size} sum={int(total.item())} ranks={ranks} word={word} "
      f"restart={env.restart_count} backend={env.backend}", flush=True)
shutdown(env)
"""


def results(output: str) -> list[str]:
    # The two processes share one pipe, so their lines can interleave without a newline between them.
    return sorted(re.findall(r"RESULT (rank=\d+ .*?backend=(?:gloo|nccl))", output))


def test_two_gloo_processes_run_collectives(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = torchrun(script)
    assert result.returncode == 0, result.stdout + result.stderr
    assert results(result.stdout) == [
        "rank=0 world=2 sum=3 ranks=[0, 1] word=hello restart=0 backend=gloo",
        "rank=1 world=2 sum=3 ranks=[0, 1] word=hello restart=0 backend=gloo",
    ]


def test_group_re_forms_after_torchrun_restarts_the_workers(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = torchrun(script, max_restarts=1, env={**os.environ, "FAIL_FIRST_ROUND": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert results(result.stdout) == [
        "rank=0 world=2 sum=3 ranks=[0, 1] word=hello restart=1 backend=gloo",
        "rank=1 world=2 sum=3 ranks=[0, 1] word=hello restart=1 backend=gloo",
    ]
