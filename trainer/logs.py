"""One logging setup for every command: human lines on stderr, tagged with the rank under torchrun.

``kubectl logs`` interleaves nothing within a pod, but a pod runs several ranks, and local ``torchrun`` mixes
all of them on one terminal; the ``[rank N]`` tag keeps each line attributable.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Libraries that are chatty at INFO/DEBUG; they speak only from WARNING unless we run at DEBUG.
_NOISY = ("botocore", "boto3", "s3transfer", "urllib3", "werkzeug", "moto", "matplotlib", "PIL", "mlflow")


def rank_from_env() -> int | None:
    """This process's global rank when it runs among several (torchrun sets RANK and WORLD_SIZE)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return int(os.environ["RANK"]) if world > 1 else None
    except (KeyError, ValueError):
        return None


class RankFormatter(logging.Formatter):
    """``2026-11-24 10:00:00 INFO  [rank 1] message`` (the rank tag only in multi-process runs)."""

    def __init__(self, rank: int | None) -> None:
        super().__init__(datefmt="%Y-%m-%d %H:%M:%S")
        self.tag = f"[rank {rank}] " if rank is not None else ""

    def format(self, record: logging.LogRecord) -> str:
        head = f"{self.formatTime(record, self.datefmt)} {record.levelname:<5} {self.tag}"
        text = head + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(level: str = "INFO", rank: int | None = None, stream: TextIO | None = None) -> None:
    """Configure the root logger once per process; calling it again replaces the previous setup."""
    name = (level or "INFO").upper()
    if name not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; choose one of {', '.join(LEVELS)}")
    numeric = getattr(logging, name)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(RankFormatter(rank if rank is not None else rank_from_env()))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)
