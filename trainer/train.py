"""The torchrun entry point: ``torchrun --nproc-per-node=N -m trainer.train --config run.yaml [--set k=v ...]``.

This module only wires the pieces together (config → process group → data → model → optimizer → loop);
each piece lives in its own module. ``python -m trainer.train`` without torchrun is a single process.
Rank 0 alone writes shared outputs under ``<run.dir>/<run.name>/``: config.yaml, metrics.jsonl, plots/, the
best and final weights (the checkpoint/resume protocol of DESIGN.md is built on top of this loop).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from trainer import storage
from trainer.config import Config, load_config
from trainer.data.cache import DiskCache
from trainer.data.coco_index import load_coco_index
from trainer.data.dataset import CocoDetection, ObjectSource
from trainer.data.loader import LoaderStats, build_loader
from trainer.data.sampler import ResumableDistributedBatchSampler, aspect_ratio_group_ids
from trainer.data.tiles import TileSpec
from trainer.data.transforms import build_transforms
from trainer.distributed import DistEnv, init_distributed, shutdown
from trainer.engine import ModelEma, TrainState, train_step
from trainer.errors import InputError
from trainer.evaluation import EvalResult
from trainer.inference import evaluate_split, save_weights
from trainer.logs import setup_logging
from trainer.optim import build_optimizer, build_scheduler
from trainer.progress import ProgressLine, format_progress
from trainer.run_log import RunLog

log = logging.getLogger("trainer.train")

EXIT_CONFIG_ERROR = 2


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def build_train_data(config: Config, env: DistEnv) -> tuple[CocoDetection, ResumableDistributedBatchSampler]:
    index = load_coco_index(config.data.train.coco)
    tiles = config.data.tiles
    dataset = CocoDetection(
        index, config.data.train.images,
        build_transforms(config.data.augment, train=True, mean=config.data.mean, std=config.data.std),
        seed=config.train.seed, strict=config.data.strict,
        tiles=TileSpec(tiles.size, tiles.overlap, tiles.min_visibility) if tiles.enabled else None,
        source=ObjectSource(DiskCache(config.data.cache_dir, int(config.data.cache_gb * 1e9)))
        if config.data.cache_dir else None)
    groups = None
    if config.data.aspect_ratio_groups > 0 and not tiles.enabled:
        groups = aspect_ratio_group_ids([r.width for r in dataset.records], [r.height for r in dataset.records],
                                        k=config.data.aspect_ratio_groups)
    sampler = ResumableDistributedBatchSampler(len(dataset), config.data.batch_size, env.world_size, env.rank,
                                               seed=config.train.seed, group_ids=groups)
    return dataset, sampler


def train(config: Config, env: DistEnv) -> EvalResult | None:
    from trainer.models import build_model

    seed_everything(config.train.seed, env.rank)
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    run_uri = config.run_uri
    if env.is_main:
        storage.write_text(storage.join(run_uri, "config.yaml"), config.to_yaml())
        log.info("run outputs under %s", run_uri)
    dataset, sampler = build_train_data(config, env)
    loader = build_loader(dataset, sampler, workers=config.data.workers)
    model: torch.nn.Module = build_model(config.model, dataset.index.num_classes).to(env.device)
    if config.train.sync_bn and env.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, config.optim)
    steps_per_epoch = max(1, len(sampler) // config.train.accumulate)
    scheduler = build_scheduler(optimizer, steps_per_epoch, config.schedule)
    cuda = env.device.type == "cuda"
    autocast_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
        if (cuda and config.train.amp) else None
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    ema = ModelEma(model, config.train.ema_decay) if config.train.ema else None
    ddp = DistributedDataParallel(model, device_ids=[env.device.index] if cuda else None) if env.distributed else model
    run_log = RunLog(run_uri, active=env.is_main, tensorboard=config.log.tensorboard)
    state = TrainState()
    stats = LoaderStats()
    result: EvalResult | None = None
    best: float | None = None
    total_steps = steps_per_epoch * config.schedule.epochs
    started = time.perf_counter()
    for epoch in range(config.schedule.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        window_start, wait, images_seen = time.perf_counter(), 0.0, 0
        fetch_start = time.perf_counter()
        for batch_index, (images, targets, metas) in enumerate(loader):
            wait += time.perf_counter() - fetch_start
            stats.update(metas)
            outcome = train_step(ddp, optimizer, scheduler, images, targets, env.device, state,
                                 accumulate=config.train.accumulate, clip_grad_norm=config.train.clip_grad_norm,
                                 scaler=scaler, autocast_dtype=autocast_dtype, ema=ema)
            images_seen += len(images) * env.world_size
            if outcome.optimizer_stepped and (state.step % config.log.every_steps == 0 or
                                              batch_index + 1 == len(loader)):
                elapsed = time.perf_counter() - window_start
                rate = images_seen / max(elapsed, 1e-9)
                done = state.step / max(1, total_steps)
                line = ProgressLine(
                    epoch + 1, config.schedule.epochs, state.step - epoch * steps_per_epoch, steps_per_epoch,
                    outcome.loss, outcome.terms, optimizer.param_groups[0]["lr"], rate,
                    wait / max(elapsed, 1e-9), (time.perf_counter() - started) * (1 - done) / max(done, 1e-9),
                    torch.cuda.max_memory_allocated(env.device) / 1e9 if cuda else None)
                if env.is_main:
                    log.info("%s", format_progress(line))
                run_log.train({"epoch": epoch + 1, "step": state.step, "loss": outcome.loss, **outcome.terms,
                               "lr": line.lr, "images_per_s": rate, "data_wait": line.data_wait,
                               **stats.snapshot().as_dict()})
                window_start, wait, images_seen = time.perf_counter(), 0.0, 0
            fetch_start = time.perf_counter()
        last = epoch + 1 == config.schedule.epochs
        if config.data.val.coco and config.eval.every_epochs and ((epoch + 1) % config.eval.every_epochs == 0
                                                                  or last):
            evaluated = ema.module if ema else model
            result = evaluate_split(evaluated, config.data.val, config, env, autocast_dtype)
            if result is not None:
                value = result.stats[config.eval.metric]
                improved = best is None or value > best
                best = value if improved else best
                log.info("eval epoch %d: AP %.4f AP50 %.4f AP75 %.4f%s | %s", epoch + 1, result.stats["AP"],
                         result.stats["AP50"], result.stats["AP75"],
                         f" (best {config.eval.metric} so far)" if improved else
                         f" (best {config.eval.metric} {best:.4f})",
                         " ".join(f"{k} {v:.3f}" for k, v in result.per_class.items()))
                run_log.eval({"epoch": epoch + 1, "step": state.step, **result.stats, "per_class_ap": result.per_class,
                              "best": best})
                if improved:
                    save_weights(storage.join(run_uri, "model_best.pt"), evaluated.state_dict(), config.model,
                                 dataset.index)
    if env.is_main:
        final_uri = storage.join(run_uri, "model_final.pt")
        save_weights(final_uri, (ema.module if ema else model).state_dict(), config.model, dataset.index)
        run_log.close()
        log.info("finished %d steps in %.1f s; final weights: %s", state.step, time.perf_counter() - started,
                 final_uri)
    shutdown(env, ddp, model, optimizer)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (local or s3://)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        config = load_config(args.config, args.set)
    except InputError as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    env = init_distributed(config.train.timeout_minutes)
    if env.is_main:
        log.info("resolved configuration:\n%s", config.to_yaml().rstrip())
    try:
        train(config, env)
    except (InputError, storage.StorageError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
