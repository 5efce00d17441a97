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


DDP_WORKER = """
import hashlib, torch
from torch.nn.parallel import DistributedDataParallel
from trainer.config import ModelConfig, OptimConfig
from trainer.distributed import init_distributed, all_gather_objects, shutdown
from trainer.engine import TrainState, train_step
from trainer.models import build_model
from trainer.optim import build_optimizer
env = init_distributed(timeout_minutes=2)
torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts rank 0's)
model = build_model(ModelConfig(name="fasterrcnn_mobilenet_v3_large_320_fpn", min_size=96, max_size=96), 3)
initial = {k: v.clone() for k, v in model.state_dict().items()}
ddp = DistributedDataParallel(model)
optimizer = build_optimizer(model, OptimConfig(lr=0.01))
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
torch.manual_seed(100 + env.rank)  # different data on each rank
state = TrainState()
for _ in range(2):
    images = [torch.randint(0, 255, (3, 96, 96), dtype=torch.uint8) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[5.0, 5, 40, 40]]) + 30 * torch.rand(1), "labels": torch.tensor([1 + env.rank])}
               for _ in range(2)]
    train_step(ddp, optimizer, scheduler, images, targets, torch.device("cpu"), state)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
changed = sum(not torch.equal(initial[k], v) for k, v in model.state_dict().items())
print(f"RESULT rank={env.rank} digest={digest} changed={changed} digests={all_gather_objects(env, digest)}", flush=True)
del ddp, model, optimizer, scheduler  # what used the group goes first (see trainer.distributed.shutdown)
shutdown(env)
"""


def test_ddp_training_steps_keep_both_ranks_weights_identical(tmp_path: Path) -> None:
    """Each rank sees different images; identical weights afterwards mean the gradients were averaged."""
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    result = torchrun(script)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = re.findall(r"RESULT rank=(\d) digest=(\w+) changed=(\d+) digests=\['(\w+)', '(\w+)'\]", result.stdout)
    assert len(lines) == 2
    for _, digest, changed, first, second in lines:
        assert first == second == digest
        assert int(changed) > 100  # training did move the weights


NAN_WORKER = """
import torch
from torch.nn.parallel import DistributedDataParallel
from trainer.distributed import init_distributed, shutdown
from trainer.engine import TrainState, train_step
env = init_distributed(timeout_minutes=1)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))

    def forward(self, images, targets):
        loss = (self.w * images[0].float().mean()).sum()
        return {"loss": loss * float("nan") if targets[0]["poison"] else loss}


model = Tiny()
ddp = DistributedDataParallel(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
state = TrainState()
outcomes = []
for step in range(3):  # step 1: only rank 1 gets a NaN loss
    poison = step == 1 and env.rank == 1
    outcome = train_step(ddp, optimizer, scheduler, [torch.ones(3, 4, 4)], [{"poison": poison}],
                         torch.device("cpu"), state)
    outcomes.append(outcome.optimizer_stepped)
print(f"RESULT rank={env.rank} stepped={outcomes} steps={state.step} w={model.w.tolist()}", flush=True)
del ddp, model, optimizer, scheduler  # what used the group goes first (see trainer.distributed.shutdown)
shutdown(env)
"""


def test_a_nan_loss_on_one_rank_is_skipped_by_every_rank(tmp_path: Path) -> None:
    """Without agreeing, the clean rank would wait forever in DDP's gradient all-reduce."""
    script = tmp_path / "nan_worker.py"
    script.write_text(NAN_WORKER)
    result = torchrun(script, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = sorted(re.findall(r"RESULT (rank=\d stepped=\[.*?\] steps=\d w=\[.*?\])", result.stdout))
    assert len(lines) == 2
    for line in lines:
        assert "stepped=[True, False, True] steps=2" in line
    assert lines[0].split(" w=")[1] == lines[1].split(" w=")[1]
