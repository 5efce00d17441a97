"""Training progress: the sample clock and meter that measure it, and the log lines that report it (one formatter
and, beside it, the one parser of each line: ``trainer watch`` reads logs back).

Example (the rank tag and time come from the logging setup)::

    epoch 3/24 step 120/500 loss 0.8123 [loss_classifier 0.2100 loss_box_reg 0.3000] lr 0.0200 img/s 45.2
    data 12% eta 1:23:45 mem 3.21G
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

Item = TypeVar("Item")


class SampleClock:
    """The run's samples consumed (epochs done x data set size + the position in this epoch): what the LR
    schedule, the progress line and the ETA follow, so they do not bend when the world size changes."""

    def __init__(self, epoch_samples: int, epochs: int, samples_per_step: int) -> None:
        self.epoch_samples, self.total = epoch_samples, epoch_samples * epochs
        self.samples_per_step = samples_per_step  # global batch x accumulate: one optimizer step
        self.position = 0  # samples into the current epoch
        self.samples = 0

    def set(self, epoch: int, position: int) -> None:
        self.position = position
        self.samples = epoch * self.epoch_samples + position

    @property
    def done(self) -> float:
        return self.samples / max(1, self.total)

    def step_in_epoch(self) -> tuple[int, int]:
        """(optimizer steps into this epoch, steps per epoch) at this world size, from the data position."""
        return (math.ceil(self.position / self.samples_per_step),
                math.ceil(self.epoch_samples / self.samples_per_step))


@dataclass
class MeterReading:
    images_per_s: float  # every rank's images, since the last reading
    data_wait: float  # share of that time spent waiting for the loader, 0..1
    eta_s: float  # to the end of the run, extrapolated from this process's progress so far


class ProgressMeter:
    """Rate, data wait and ETA for the progress line: it times the window since the last reading and the run
    since this process started (a resumed run's ETA extrapolates only what this process did)."""

    def __init__(self, done_at_start: float) -> None:
        self.started = time.perf_counter()
        self.done_at_start = done_at_start
        self.restart_window()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def restart_window(self) -> None:
        self.window_start, self.wait, self.images = time.perf_counter(), 0.0, 0

    def fetched(self, batches: Iterable[Item]) -> Iterator[Item]:
        """The batches, with the time spent waiting for each counted as data wait."""
        iterator = iter(batches)
        while True:
            asked = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.wait += time.perf_counter() - asked
            yield item

    def count(self, images: int) -> None:
        self.images += images

    def read(self, done: float) -> MeterReading:
        """The window's rate and wait and the ETA at ``done`` (the run's fraction of samples); starts a new window."""
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        progress = (done - self.done_at_start) / max(1e-12, 1 - self.done_at_start)
        reading = MeterReading(self.images / elapsed, self.wait / elapsed,
                               self.elapsed * (1 - progress) / max(progress, 1e-9))
        self.restart_window()
        return reading


@dataclass
class ProgressLine:
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    terms: dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    images_per_s: float = 0.0
    data_wait: float = 0.0  # share of step time spent waiting for the loader, 0..1
    eta_s: float = 0.0
    max_mem_gb: float | None = None


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d{text}" if days else text


def format_progress(line: ProgressLine) -> str:
    terms = " ".join(f"{name} {value:.4f}" for name, value in line.terms.items())
    memory = f" mem {line.max_mem_gb:.2f}G" if line.max_mem_gb is not None else ""
    return (f"epoch {line.epoch}/{line.epochs} step {line.step}/{line.steps} loss {line.loss:.4f} [{terms}] "
            f"lr {line.lr:.6g} img/s {line.images_per_s:.1f} data {line.data_wait * 100:.0f}% "
            f"eta {format_duration(line.eta_s)}{memory}")


_PATTERN = re.compile(
    r"epoch (?P<epoch>\d+)/(?P<epochs>\d+) step (?P<step>\d+)/(?P<steps>\d+) loss (?P<loss>\S+) "
    r"\[(?P<terms>[^\]]*)\] lr (?P<lr>\S+) img/s (?P<ips>\S+) data (?P<data>\d+)% "
    r"eta (?:(?P<days>\d+)d)?(?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d)(?: mem (?P<mem>[\d.]+)G)?")


def parse_progress(text: str) -> ProgressLine | None:
    """The progress line inside a log line (any prefix, e.g. a timestamp or rank tag), or None."""
    match = _PATTERN.search(text)
    if match is None:
        return None
    parts = match["terms"].split()
    terms = {parts[i]: float(parts[i + 1]) for i in range(0, len(parts) - 1, 2)}
    eta = int(match["days"] or 0) * 86400 + int(match["h"]) * 3600 + int(match["m"]) * 60 + int(match["s"])
    return ProgressLine(int(match["epoch"]), int(match["epochs"]), int(match["step"]), int(match["steps"]),
                        float(match["loss"]), terms, float(match["lr"]), float(match["ips"]),
                        int(match["data"]) / 100, float(eta), float(match["mem"]) if match["mem"] else None)


# ------------------------------------------------------------------------------- evaluation line
@dataclass
class EvalLine:
    epoch: int
    ap: float
    ap50: float
    ap75: float


def format_eval(epoch: int, stats: dict[str, float], note: str, per_class: dict[str, float]) -> str:
    """``eval epoch 3: AP 0.3120 AP50 0.5750 AP75 0.3010 (best AP so far) | RBC 0.376 WBC 0.615``."""
    classes = " ".join(f"{name} {value:.3f}" for name, value in per_class.items())
    return (f"eval epoch {epoch}: AP {stats['AP']:.4f} AP50 {stats['AP50']:.4f} AP75 {stats['AP75']:.4f}"
            f"{f' ({note})' if note else ''} | {classes}")


_EVAL = re.compile(r"eval epoch (?P<epoch>\d+): AP (?P<ap>[\d.]+) AP50 (?P<ap50>[\d.]+) AP75 (?P<ap75>[\d.]+)")


def parse_eval(text: str) -> EvalLine | None:
    match = _EVAL.search(text)
    if match is None:
        return None
    return EvalLine(int(match["epoch"]), float(match["ap"]), float(match["ap50"]), float(match["ap75"]))


# ------------------------------------------------------------------------------- checkpoint line
@dataclass
class CheckpointLine:
    uri: str  # the step-<N> folder
    step: int
    megabytes: float
    seconds: float


def format_checkpoint(uri: str, megabytes: float, seconds: float) -> str:
    """``checkpoint committed: s3://b/runs/r/checkpoints/step-000000120 (331.2 MB in 2.4 s)``."""
    return f"checkpoint committed: {uri} ({megabytes:.1f} MB in {seconds:.1f} s)"


_CHECKPOINT = re.compile(
    r"checkpoint committed: (?P<uri>\S*step-(?P<step>\d+)) \((?P<mb>[\d.]+) MB in (?P<s>[\d.]+) s\)")


def parse_checkpoint(text: str) -> CheckpointLine | None:
    match = _CHECKPOINT.search(text)
    if match is None:
        return None
    return CheckpointLine(match["uri"], int(match["step"]), float(match["mb"]), float(match["s"]))
