"""Names and shapes shared by the writer and the readers of checkpoints: where they live, how folders are named,
and the error every unusable checkpoint becomes."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from trainer import storage
from trainer.errors import InputError

if TYPE_CHECKING:
    from trainer.checkpoint.store import LoadedCheckpoint

FORMAT = "detection-trainer/checkpoint-1"
LATEST = "latest.json"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step-(\d{9})")
# A manifest lists a checkpoint's few files and a pointer names one folder: a few KB. Larger ones are refused from
# their size, unread (a damaged or planted file must not take a resuming job's memory).
MAX_MANIFEST_BYTES = 16 << 20
MAX_POINTER_BYTES = 1 << 20


class CheckpointError(InputError):
    """A checkpoint that cannot be used: missing, partial, corrupt or not a checkpoint of ours."""


# Raises CheckpointError when a loaded checkpoint lacks what its user needs (resume, export); what it returns
# is ignored.
CheckpointCheck = Callable[["LoadedCheckpoint"], object]


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"  # zero-padded: listing order is step order


def checkpoints_uri(run_uri: str) -> str:
    return storage.join(run_uri, "checkpoints")
