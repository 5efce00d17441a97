"""The torchrun entry point: ``torchrun --nproc-per-node=N -m trainer.train --config run.yaml [--set k=v ...]``.

``python -m trainer.train`` without torchrun is a single process. This module stays light on purpose: it reads
the config, installs the stop handler and starts downloading the checkpoint a restarted run resumes from, and only
then imports torch and the training run (trainer/loop.py) — the download overlaps the import, so a resumed start
costs little more than a fresh one. It also turns what went wrong into the documented exit codes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from trainer import storage
from trainer.checkpoint import LatestPrefetch, checkpoints_uri
from trainer.config import Config, load_config
from trainer.errors import InputError, first_line
from trainer.exit_codes import EXIT_CONFIG_ERROR, EXIT_FAILURE
from trainer.logs import setup_logging
from trainer.stop_signal import StopSignal

log = logging.getLogger("trainer.train")


def start_prefetch(config: Config) -> LatestPrefetch | None:
    """Fetch and verify the checkpoint ``latest.json`` names, in the background (``checkpoint.resume: auto``)."""
    return LatestPrefetch(checkpoints_uri(config.run_uri)) if config.checkpoint.resume == "auto" else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (local or s3://)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--force", action="store_true",
                        help="resume even though the model or data settings differ from the checkpoint's")
    parser.add_argument("--log-level", default=os.environ.get("TRAINER_LOG_LEVEL", "INFO"),
                        help="verbosity of the log lines (default INFO, or $TRAINER_LOG_LEVEL: the chart sets it)")
    args = parser.parse_args(argv)
    try:
        setup_logging(args.log_level)
    except ValueError as exc:  # e.g. a mistyped TRAINER_LOG_LEVEL: a usage error, said in one line
        sys.stderr.write(f"trainer: error: --log-level/TRAINER_LOG_LEVEL: {exc}\n")
        return EXIT_CONFIG_ERROR
    stop = StopSignal().install()  # from the first moment: a stop during start-up is honoured too
    try:
        config = load_config(args.config, args.set)
    except InputError as exc:
        # One write: every rank reports the same error at once, and under PYTHONUNBUFFERED (the image sets it)
        # print() would send the text and its newline separately, so the ranks' lines could interleave.
        sys.stderr.write(f"trainer: error: {exc}\n")
        return EXIT_CONFIG_ERROR
    prefetch = start_prefetch(config)

    import torch

    from trainer.distributed import init_distributed
    from trainer.engine import NonFiniteLossError
    from trainer.loop import train

    env = init_distributed(config.train.timeout_minutes)
    if env.is_main:
        log.info("resolved configuration:\n%s", config.to_yaml().rstrip())
    try:
        return train(config, env, force=args.force, stop=stop, prefetch=prefetch)
    except InputError as exc:  # config, data, checkpoint or another job's run: a retry would fail the same way
        log.error("%s", exc)
        return EXIT_CONFIG_ERROR
    except NonFiniteLossError as exc:  # the same data and settings diverge again: a restart cannot fix it
        log.error("%s", exc)
        return EXIT_CONFIG_ERROR
    except storage.StorageError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    except torch.distributed.DistError as exc:  # a peer died or was stopped as stalled: the group re-forms
        log.error("lost contact with another rank (it crashed, was killed, or was stopped as stalled by the hang "
                  "watchdog: see its pod's log): %s", first_line(exc))
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
