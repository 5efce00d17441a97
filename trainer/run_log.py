"""The machine-readable record of a run, written by rank 0 under ``<run.dir>/<run.name>/``:

* ``metrics.jsonl``: one JSON object per train log step and per evaluation; S3 has no append, so the file is
  kept in memory and rewritten whole, at most every ``flush_seconds`` (and after every evaluation and at the end);
* ``plots/*.png``: loss, lr and mAP curves and per-class AP bars, redrawn after each evaluation;
* ``tensorboard/``: event files when ``log.tensorboard`` is on, written to a local folder and copied to the run
  (TensorBoard's writer cannot write to S3 itself);
* the MLflow run (``log.mlflow``): the same scalars, named as in TensorBoard, and the plots, through a tracker that
  never blocks (``trainer/tracking.py``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
import weakref
from typing import Any

from trainer import storage
from trainer.plots import render_plots
from trainer.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)


class MetricsLog:
    """``metrics.jsonl``: records kept in memory, the file rewritten whole every ``flush_seconds`` at most."""

    def __init__(self, uri: str, flush_seconds: float = 60.0) -> None:
        self.uri = uri
        self.records: list[dict[str, Any]] = []
        self.flush_seconds = flush_seconds
        self.last_flush = time.monotonic()
        if storage.exists(uri):  # a resumed run keeps its history
            for number, line in enumerate(storage.read_text(uri).splitlines(), 1):
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("%s line %d is not JSON; dropped from the rewritten file", uri, number)

    def write(self, record: dict[str, Any], force: bool = False) -> None:
        self.records.append(strict_json_values({"time": round(time.time(), 3), **record}))
        if force or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        storage.write_text(self.uri, "".join(json.dumps(strict_json_values(r), sort_keys=True, allow_nan=False)
                                             + "\n" for r in self.records))
        self.last_flush = time.monotonic()


def strict_json_values(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by None: JSON has no such numbers (Python's ``json`` would
    write ``NaN``/``Infinity``, which other readers refuse), and a record must stay readable by any of them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json_values(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json_values(v) for v in value]
    return value


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers as ``<kind>/<key>`` scalars (per-class AP as ``<kind>/AP_<class>``), for TensorBoard and
    MLflow alike; the step, epoch and time are the axes, not scalars."""
    kind = record.get("kind")
    values = {f"{kind}/{key}": value for key, value in record.items()
              if isinstance(value, int | float) and not isinstance(value, bool)
              and key not in ("step", "epoch", "time")}
    values.update({f"{kind}/AP_{name}": value for name, value in (record.get("per_class_ap") or {}).items()})
    return values


class TensorBoardLog:
    """Scalars of each record as TensorBoard events; ``sync`` copies the event files into the run."""

    def __init__(self, uri: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("log.tensorboard is on but the tensorboard package is not installed "
                               "(pip install 'detection-trainer[tensorboard]')") from exc
        self.uri = uri
        self.local = tempfile.mkdtemp(prefix="trainer-tensorboard-")
        # deleted by close(), or at exit when a failed run never gets there
        self._remove_local = weakref.finalize(self, shutil.rmtree, self.local, ignore_errors=True)
        self.writer = SummaryWriter(self.local)

    def write(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record.get("step", 0))

    def sync(self) -> None:
        self.writer.flush()
        if storage.join(self.local) != storage.join(self.uri):
            storage.copy_tree(self.local, self.uri)

    def close(self) -> None:
        """Copy the events into the run and delete the local staging folder (it would pile up in /tmp)."""
        try:
            self.sync()
        finally:
            self.writer.close()
            self._remove_local()


class RunLog:
    """Everything rank 0 records about a run; a no-op on other ranks (construct with ``active=False``)."""

    def __init__(self, run_uri: str, active: bool, tensorboard: bool = False, flush_seconds: float = 60.0,
                 tracker: Tracker | None = None) -> None:
        self.run_uri = run_uri
        self.tracker = tracker or NullTracker()
        self.metrics = MetricsLog(storage.join(run_uri, "metrics.jsonl"), flush_seconds) if active else None
        self.tensorboard = TensorBoardLog(storage.join(run_uri, "tensorboard")) if active and tensorboard else None

    def forget_after(self, step: int) -> None:
        """Drop records of steps after ``step``: a resumed run redoes them and writes them again."""
        if self.metrics is not None:
            kept = [r for r in self.metrics.records if not isinstance(r.get("step"), int) or r["step"] <= step]
            dropped = len(self.metrics.records) - len(kept)
            self.metrics.records = kept
            if dropped:
                log.info("metrics.jsonl: %d records after step %d dropped (those steps run again)", dropped, step)

    def train(self, record: dict[str, Any]) -> None:
        self._write({"kind": "train", **record}, force=False)

    def eval(self, record: dict[str, Any]) -> None:
        """An evaluation: flushed at once, and the plots are redrawn from the whole history."""
        self._write({"kind": "eval", **record}, force=True)
        if self.metrics is not None:
            for name, data in render_plots(self.metrics.records).items():
                self.tracker.log_artifact_bytes(f"plots/{name}", data)
                try:
                    storage.write_bytes(storage.join(self.run_uri, "plots", name), data)
                except storage.StorageError as exc:  # pictures are a convenience: never stop training for them
                    log.warning("plots not written: %s", exc)
                    break
        if self.tensorboard is not None:
            self.tensorboard.sync()

    def _write(self, record: dict[str, Any], force: bool) -> None:
        if self.metrics is not None:
            self.metrics.write(record, force=force)
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        if isinstance(record.get("step"), int):
            self.tracker.log_metrics(scalars(record), record["step"])

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.flush()
        if self.tensorboard is not None:
            self.tensorboard.close()
