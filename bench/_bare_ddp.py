"""The baseline of bench/train_overhead.py: the least a DDP training loop can do, under torchrun.

The same config (model, options, optimizer, batch) as the trainer; this rank's share of one epoch decoded into
memory before timing; then per batch: forward, backward, gradient clipping, optimizer and schedule step.
Prints ``images/s <value>`` (all ranks together) from rank 0, timed after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer.config import load_config
from trainer.data.coco_index import load_coco_index
from trainer.data.dataset import CocoDetection
from trainer.data.transforms import build_transforms
from trainer.models import build_model
from trainer.optim import SampleSchedule, build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(config.train.seed + rank)

    dataset = CocoDetection(load_coco_index(config.data.train.coco), config.data.train.images,
                            build_transforms(config.data.augment, train=True))
    batch = config.data.batch_size
    mine = list(range(rank, len(dataset), world))
    batches = []
    for start in range(0, len(mine) - batch + 1, batch):
        samples = [dataset[(0, i)] for i in mine[start:start + batch]]
        images = [image.as_subclass(torch.Tensor).float().div(255) for image, _, _ in samples]
        targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]} for _, t, _ in samples]
        batches.append((images, targets))

    model = DistributedDataParallel(build_model(config.model, dataset.index.num_classes))
    optimizer = build_optimizer(model.module, config.optim)
    samples_per_step = batch * world
    done = [0]
    scheduler = SampleSchedule(optimizer, config.schedule, len(batches) * samples_per_step, samples_per_step,
                               clock=lambda: done[0])
    model.train()
    started = None
    for step, (images, targets) in enumerate(batches):
        done[0] = (step + 1) * samples_per_step
        if step == args.warmup:
            dist.barrier()
            started = time.perf_counter()
        loss = sum(model(images, targets).values())
        loss.backward()
        if config.train.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    dist.barrier()
    if started is None:
        raise SystemExit("not enough batches for the warm-up")
    rate = (len(batches) - args.warmup) * batch * world / (time.perf_counter() - started)
    if rank == 0:
        print(f"images/s {rate:.3f}", flush=True)
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
