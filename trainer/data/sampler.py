"""A resumable, deterministic, distributed batch sampler for detection training under DDP.

Why a batch sampler of our own: DDP needs every rank to run the same number of steps, a resumed run must
continue exactly where the checkpoint stopped (even on another number of GPUs), and detection batches train
faster when their images share an aspect ratio. Every rank derives everything from ``(seed, epoch)`` and the
checkpointed position alone, so no communication is needed.

The epoch sequence
    Each epoch has one global order: a permutation of ``range(num_samples)`` drawn with a
    ``torch.Generator`` seeded by a hash of ``(seed, epoch)`` (the identity order when ``shuffle=False``).
    Without ``group_ids`` the epoch sequence *is* that order. With ``group_ids`` the order is rearranged into
    single-group batches (see "Aspect-ratio grouping" below). The sequence is cut into global batches of
    ``batch_size`` entries.

Dealing to ranks (contiguous blocks)
    Global step ``k`` takes the next ``W * B`` entries of the sequence (``W = num_replicas``,
    ``B = batch_size``), i.e. global batches ``k*W .. k*W + W - 1``; rank ``r`` gets global batch
    ``k*W + r``, a contiguous block of the step's chunk. Contiguous blocks rather than ``[r::W]`` slices so
    that a single-group batch reaches one rank whole; ranks still interleave batch by batch.

Position
    The number of entries of the epoch sequence consumed globally so far in this epoch: a multiple of
    ``W * B`` except at the end of the epoch, where it is capped at ``num_samples``.

Equal batch counts (DDP hangs otherwise)
    ``drop_last=False`` (default): the last, incomplete step is padded so that every rank gets a full batch.
    A partial last batch is filled with entries from the start of the epoch sequence, and any missing whole
    batches repeat the sequence's first batches (batch-aligned, so with grouping they stay single-group).
    At most ``W * B - 1`` entries are repeated per epoch (per resumed part of an epoch when a run resumes on
    another world or batch size). ``drop_last=True``: the incomplete tail (fewer than ``W * B`` entries) is
    dropped instead, so no entry repeats. Either way ``len(sampler)`` is the same on every rank.

Exact resume
    ``state_dict()`` holds plain ints/bools/lists (see :meth:`ResumableDistributedBatchSampler.state_dict`).
    With the same world and batch size the resumed run yields exactly the batches the uninterrupted run
    would have yielded. With another world size or batch size it continues the *same* epoch sequence from
    the saved position, re-dealt over the new ranks: the not-yet-consumed entries are each yielded exactly
    once (plus the documented padding). A state with another ``num_samples``, ``seed``, ``shuffle`` or
    ``group_ids`` is refused with a ``ValueError`` naming the field.

    DataLoader workers prefetch batches from the batch sampler ahead of training, so the position counted
    while yielding runs ahead of what training consumed. The training loop must therefore save
    ``state_dict(consumed_batches=steps_done_in_this_pass)`` (or use :meth:`position_after`).

Aspect-ratio grouping (``group_ids``)
    Grouping inside each global step's chunk would make resume depend on the world size, so grouping is done
    once per epoch on the whole order, independently of the world size: walk the permutation with a buffer
    per group and emit a batch whenever a group's buffer holds ``B`` entries (torchvision's
    ``GroupedBatchSampler`` idea); at the end, the leftovers (fewer than ``B`` per group) follow, sorted by
    group, forming the only mixed batches (at most one per group). The emitted batches, flattened, are the
    epoch sequence, which is dealt exactly as above. The sequence depends on ``B``: when a run resumes with
    another batch size, the entries consumed under the old one are recorded in the state's ``history`` as
    ``[old_batch_size, consumed]`` and the remaining entries are regrouped with the new batch size, so the
    consumed set can always be rebuilt from ``(seed, epoch, history)``.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["ResumableDistributedBatchSampler", "aspect_ratio_group_ids"]

_NO_GROUPS = -1  # the state's group_digest when no grouping is used
_REQUIRED_KEYS = ("epoch", "position", "seed", "num_samples", "shuffle", "batch_size", "group_digest")


def aspect_ratio_group_ids(widths: Sequence[float], heights: Sequence[float], k: int = 3) -> list[int]:
    """Aspect-ratio bins (width / height) exactly like torchvision's detection reference (``_quantize``).

    Bin edges are ``2 ** np.linspace(-1, 1, 2*k + 1)`` (``[1.0]`` when ``k == 0``) and a ratio equal to an
    edge goes to the upper bin (``bisect_right``), giving ids ``0 .. 2*k + 1``.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    w = np.asarray(widths, dtype=np.float64)
    h = np.asarray(heights, dtype=np.float64)
    if w.ndim != 1 or w.shape != h.shape:
        raise ValueError(f"widths and heights must be 1-D and of equal length, got {w.shape} and {h.shape}")
    if np.any(~(w > 0)) or np.any(~(h > 0)):
        raise ValueError("widths and heights must all be positive")
    bins = 2.0 ** np.linspace(-1, 1, 2 * k + 1) if k > 0 else np.array([1.0])
    return np.searchsorted(bins, w / h, side="right").astype(int).tolist()


def _epoch_seed(seed: int, epoch: int) -> int:
    """A generator seed per (seed, epoch); hashed so that (seed, epoch + 1) and (seed + 1, epoch) differ."""
    digest = hashlib.blake2b(f"resumable-batch-sampler:{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _group_layout(pool: np.ndarray, groups: np.ndarray, batch_size: int) -> np.ndarray:
    """Reorder ``pool`` into single-group batches of ``batch_size``, leftovers last (sorted by group).

    Equivalent to walking ``pool`` with one buffer per group and emitting a buffer when it is full, then
    appending what is left in the buffers group by group; vectorised so a 100k-image epoch costs milliseconds.
    """
    n = pool.size
    if n == 0:
        return pool
    g = groups[pool]
    by_group = np.argsort(g, kind="stable")  # pool positions, group by group, each group in pool order
    sorted_g = g[by_group]
    starts = np.concatenate(([0], np.flatnonzero(sorted_g[1:] != sorted_g[:-1]) + 1))
    counts = np.diff(np.concatenate((starts, [n])))
    rank_in_group = np.arange(n) - np.repeat(starts, counts)
    in_full_batch = rank_in_group < np.repeat((counts // batch_size) * batch_size, counts)
    full = np.flatnonzero(in_full_batch)
    # A buffer is emitted when its last member arrives: order full batches by that member's pool position.
    emitted_at = by_group[full - rank_in_group[full] % batch_size + (batch_size - 1)]
    full_positions = by_group[full][np.lexsort((rank_in_group[full], emitted_at))]
    leftover_positions = by_group[~in_full_batch]
    return pool[np.concatenate((full_positions, leftover_positions))]


class ResumableDistributedBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one DDP rank; deterministic per (seed, epoch) and resumable mid-epoch.

    Use as ``DataLoader(dataset, batch_sampler=sampler)``. Call :meth:`set_epoch` before each epoch; save
    ``state_dict(consumed_batches=n)`` in checkpoints and :meth:`load_state_dict` it on resume. See the module
    docstring for the ordering, dealing, padding and grouping rules.
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int, rank: int, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False, group_ids: Sequence[int] | None = None) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self._groups: np.ndarray | None = None
        self._group_digest = _NO_GROUPS
        if group_ids is not None:
            groups = np.asarray(group_ids, dtype=np.int64)
            if groups.shape != (self.num_samples,):
                raise ValueError(f"group_ids must hold one id per sample ({self.num_samples}), "
                                 f"got shape {groups.shape}")
            self._groups = groups
            self._group_digest = zlib.crc32(groups.astype("<i8").tobytes())
        self._epoch = 0
        # (batch_size, consumed) of earlier parts of this epoch laid out with another batch size (grouping only).
        self._history: list[tuple[int, int]] = []
        self._generation = 0  # invalidates iterators handed out before a restart
        self._restart_at(0)

    # --- public API ---------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Entries of the epoch sequence handed out so far (runs ahead of training when workers prefetch)."""
        return self._position

    @property
    def global_batch_size(self) -> int:
        """Entries consumed per global step: ``num_replicas * batch_size``."""
        return self.num_replicas * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch, starting from its beginning, unless it is already selected.

        Keeping the position for the current epoch lets a training loop call ``set_epoch(start_epoch)`` right
        after :meth:`load_state_dict` without losing the restored position. An epoch that was iterated to the
        end yields nothing more until another epoch is selected (that is what an exact resume needs).
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._epoch = int(epoch)
            self._history = []
            self._restart_at(0)

    def __len__(self) -> int:
        """Batches this rank yields in the current pass (or the next one, before iterating).

        Counted from where the pass starts: the full epoch on a fresh epoch, the remainder after
        :meth:`load_state_dict`. Constant while the pass runs; equal on every rank.
        """
        return self._pass_steps

    def __iter__(self) -> Iterator[list[int]]:
        """Yield this rank's batches from the current position to the end of the epoch."""
        start = self._position
        self._restart_at(start)
        batches = self._rank_batches(start)  # computed now, so later set_epoch/load calls cannot change it
        return self._yield(batches, start, self._generation)

    def position_after(self, steps: int) -> int:
        """The position once training has finished ``steps`` batches of the current pass.

        ``steps`` counts batches since the last ``__iter__`` (or since :meth:`load_state_dict` /
        :meth:`set_epoch` if not iterated since), i.e. the training loop's step index within this pass, *not*
        the batches the DataLoader has prefetched. The result is capped at the end of the epoch.
        """
        if not 0 <= steps <= self._pass_steps:
            raise ValueError(f"steps must be in [0, {self._pass_steps}] for this pass, got {steps}")
        return min(self._pass_start + steps * self.global_batch_size, self.num_samples)

    def state_dict(self, consumed_batches: int | None = None) -> dict[str, Any]:
        """What a checkpoint needs to resume exactly: plain ints/bools and a list of int pairs.

        Pass ``consumed_batches`` (steps finished in this pass) whenever a DataLoader may have prefetched; with
        ``None`` the position is the number of entries handed out, which is only right without prefetching.
        Keys: ``epoch``, ``position`` (entries of the epoch sequence consumed globally), ``seed``,
        ``num_samples``, ``shuffle``, ``batch_size`` and ``num_replicas`` (of the saving run),
        ``group_digest`` (crc32 of ``group_ids``; -1 without grouping) and ``history`` (``[batch_size,
        consumed]`` per earlier part of this epoch grouped with another batch size; usually empty).
        """
        position = self._position if consumed_batches is None else self.position_after(consumed_batches)
        return {
            "epoch": self._epoch,
            "position": position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "group_digest": self._group_digest,
            "history": [[bs, consumed] for bs, consumed in self._history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state; the world size and batch size may differ from the saving run's.

        Raises ``ValueError`` (naming the field) for a state of another dataset size, seed, shuffle setting or
        grouping, since its consumed entries would not be the ones this sampler would skip.
        """
        missing = [key for key in _REQUIRED_KEYS if key not in state]
        if missing:
            raise ValueError(f"sampler state lacks {', '.join(missing)}")
        mine = {"num_samples": self.num_samples, "seed": self.seed, "shuffle": self.shuffle,
                "group_digest": self._group_digest}
        for name, value in mine.items():
            if state[name] != value:
                raise ValueError(f"sampler state has {name}={state[name]!r} but this sampler has {name}={value!r}; "
                                 "it belongs to another dataset or data-order setting and cannot be resumed here")
        epoch, position, saved_bs = int(state["epoch"]), int(state["position"]), int(state["batch_size"])
        if epoch < 0:
            raise ValueError(f"sampler state has epoch={epoch}; it must be >= 0")
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"sampler state has position={position}; it must be in [0, {self.num_samples}]")
        if saved_bs < 1:
            raise ValueError(f"sampler state has batch_size={saved_bs}; it must be >= 1")
        history = [(int(bs), int(consumed)) for bs, consumed in state.get("history", [])]
        if any(bs < 1 or consumed < 0 for bs, consumed in history) or sum(c for _, c in history) > position:
            raise ValueError(f"sampler state has an inconsistent history={state.get('history')!r}")
        if self._groups is not None and saved_bs != self.batch_size:
            # The grouped sequence depends on the batch size: freeze the part consumed under the old one.
            done_in_part = position - sum(consumed for _, consumed in history)
            if done_in_part > 0:
                history.append((saved_bs, done_in_part))
        self._epoch = epoch
        self._history = history
        self._restart_at(position)

    # --- internals ----------------------------------------------------------------------------------------

    def _restart_at(self, position: int) -> None:
        """Start a new pass at ``position``: iterators handed out earlier stop updating the position."""
        self._generation += 1
        self._position = position
        self._pass_start = position
        self._pass_steps = self._steps_from(position)

    def _steps_from(self, position: int) -> int:
        remaining = self.num_samples - position
        g = self.global_batch_size
        return remaining // g if self.drop_last else math.ceil(remaining / g)

    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        generator = torch.Generator()
        generator.manual_seed(_epoch_seed(self.seed, self._epoch))
        return torch.randperm(self.num_samples, generator=generator).numpy()

    def _layout(self, pool: np.ndarray, batch_size: int) -> np.ndarray:
        return pool if self._groups is None else _group_layout(pool, self._groups, batch_size)

    def _sequence(self) -> tuple[np.ndarray, int]:
        """The current part of the epoch sequence and the epoch position where that part starts."""
        pool, start = self._epoch_order(), 0
        for batch_size, consumed in self._history:
            pool = self._layout(pool, batch_size)[consumed:]
            start += consumed
        return self._layout(pool, self.batch_size), start

    def _rank_batches(self, position: int) -> list[list[int]]:
        """This rank's batches from ``position`` to the end of the epoch, padded per the module docstring."""
        steps = self._steps_from(position)
        if steps == 0:
            return []
        sequence, part_start = self._sequence()
        rest = sequence[position - part_start:]
        b, w, n = self.batch_size, self.num_replicas, rest.size
        real_batches = math.ceil(n / b)
        batches = []
        for k in range(steps):
            j = k * w + self.rank  # global batch index within the rest of the epoch
            lo = j * b
            if lo + b <= n:
                batch = rest[lo:lo + b]
            elif lo < n:  # the partial last batch: fill from the start of the sequence
                batch = np.concatenate((rest[lo:], sequence[np.arange(lo + b - n) % sequence.size]))
            else:  # a whole padding batch: repeat the sequence's batches from its start, batch-aligned
                batch = sequence[((j - real_batches) * b + np.arange(b)) % sequence.size]
            batches.append(batch.tolist())
        return batches

    def _yield(self, batches: list[list[int]], start: int, generation: int) -> Iterator[list[int]]:
        step = self.global_batch_size
        for k, batch in enumerate(batches):
            if generation == self._generation:
                self._position = min(start + (k + 1) * step, self.num_samples)
            yield batch
