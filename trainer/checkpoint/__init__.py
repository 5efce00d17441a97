"""Checkpoints under ``<run>/checkpoints/`` (local or S3) with the commit protocol of DESIGN.md.

A checkpoint is a folder ``step-<N>/`` of payload objects (torch files and a JSON state), then a
``manifest.json`` with each object's size and sha256, then ``checkpoints/latest.json`` naming the folder (one
small PUT). Readers verify the checksums and fall back to the newest checkpoint that verifies. Retention deletes
old folders only after a newer commit, and never the best one.

The package keeps mechanism, state and policy apart:

- ``layout``, ``commit`` and ``store``: the mechanism (writing, reading, verifying); torch-free at import, so the
  entry point can prefetch a checkpoint while torch is being imported. Their public names are re-exported here.
- ``state``: what a training checkpoint holds (snapshot and restore of the trainables, config-change check).
- ``policy``: when a run saves (steps, minutes, epochs, stop signals) and where it resumes from.
"""

from trainer.checkpoint.commit import CheckpointWriter, CommitResult, Snapshot, cpu_copy
from trainer.checkpoint.layout import (
                                       FORMAT,
                                       LATEST,
                                       MANIFEST,
                                       STEP_DIR,
                                       CheckpointCheck,
                                       CheckpointError,
                                       checkpoints_uri,
                                       step_dir_name,
)
from trainer.checkpoint.store import (
                                       CheckpointInfo,
                                       LatestPrefetch,
                                       LoadedCheckpoint,
                                       Prefetched,
                                       fetch_verified,
                                       find_resumable,
                                       list_checkpoints,
                                       load_checkpoint,
                                       read_latest,
                                       read_manifest,
                                       resolve,
)

__all__ = [
    "FORMAT", "LATEST", "MANIFEST", "STEP_DIR", "CheckpointCheck", "CheckpointError", "CheckpointInfo",
    "CheckpointWriter", "CommitResult", "LatestPrefetch", "LoadedCheckpoint", "Prefetched", "Snapshot",
    "checkpoints_uri", "cpu_copy", "fetch_verified", "find_resumable", "list_checkpoints", "load_checkpoint",
    "read_latest", "read_manifest", "resolve", "step_dir_name",
]
