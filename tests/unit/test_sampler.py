"""The resumable distributed batch sampler: determinism, exact coverage, equal batch counts, exact resume
(same and other world/batch size, after prefetching), aspect-ratio grouping and DataLoader use."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from trainer.data.sampler import ResumableDistributedBatchSampler, _group_layout, aspect_ratio_group_ids

Batches = list[list[int]]


def make(n: int, b: int, w: int, rank: int, groups: list[int] | None = None, **kw: Any
         ) -> ResumableDistributedBatchSampler:
    return ResumableDistributedBatchSampler(n, b, w, rank, group_ids=groups, **kw)


def run_all_ranks(n: int, b: int, w: int, groups: list[int] | None = None, epoch: int = 0,
                  state: dict[str, Any] | None = None, **kw: Any) -> list[Batches]:
    """Each rank's batches for one (remaining) epoch."""
    out = []
    for rank in range(w):
        s = make(n, b, w, rank, groups, **kw)
        s.set_epoch(epoch)
        if state is not None:
            s.load_state_dict(state)
        batches = list(s)
        assert len(batches) == len(s)
        out.append(batches)
    assert len({len(batches) for batches in out}) == 1, "ranks must yield equal batch counts"
    return out


def global_flat(per_rank: list[Batches]) -> list[int]:
    """Entries in global order: step by step, rank by rank (the dealing rule)."""
    flat: list[int] = []
    for step in zip(*per_rank, strict=True):
        for batch in step:
            flat.extend(batch)
    return flat


def random_groups(n: int, num_groups: int = 3, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(num_groups) for _ in range(n)]


# --- determinism --------------------------------------------------------------------------------------------


def test_same_seed_same_batches_other_epoch_or_seed_other_order() -> None:
    a = list(make(50, 4, 2, 1, seed=7))
    assert a == list(make(50, 4, 2, 1, seed=7))
    assert a != list(make(50, 4, 2, 1, seed=8))
    other_epoch = make(50, 4, 2, 1, seed=7)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != a
    # (seed, epoch) is hashed, not added: seed 7 epoch 1 is not seed 8 epoch 0
    assert list(make(50, 4, 2, 1, seed=8)) != list(other_epoch)


def test_no_shuffle_is_identity_order_dealt_in_contiguous_blocks() -> None:
    per_rank = run_all_ranks(12, 3, 2, shuffle=False)
    assert per_rank == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9, 10, 11]]]


# --- coverage and equal batch counts -----------------------------------------------------------------------

COMBOS = [(10, 2, 2), (23, 4, 3), (5, 4, 2), (1, 3, 4), (64, 8, 4), (7, 1, 3), (30, 5, 1)]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize(("n", "b", "w"), COMBOS)
def test_each_index_once_per_epoch_plus_bounded_padding(n: int, b: int, w: int, grouped: bool) -> None:
    groups = random_groups(n) if grouped else None
    per_rank = run_all_ranks(n, b, w, groups, seed=3, epoch=2)
    assert all(len(batch) == b for batches in per_rank for batch in batches)
    flat = global_flat(per_rank)
    assert len(flat) == len(per_rank[0]) * w * b
    assert sorted(flat[:n]) == list(range(n))  # the real entries: every index exactly once
    assert len(flat) - n < w * b  # padding: at most W*B - 1 repeats
    assert set(flat[n:]) <= set(range(n))


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize(("n", "b", "w"), COMBOS)
def test_drop_last_drops_only_the_incomplete_tail(n: int, b: int, w: int, grouped: bool) -> None:
    groups = random_groups(n) if grouped else None
    per_rank = run_all_ranks(n, b, w, groups, drop_last=True)
    flat = global_flat(per_rank)
    assert len(flat) == (n // (w * b)) * w * b
    assert len(set(flat)) == len(flat)


# --- exact resume, same world size -------------------------------------------------------------------------


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(("n", "b", "w"), [(37, 3, 2), (50, 4, 3)])
def test_resume_at_every_step_boundary_continues_batch_for_batch(n: int, b: int, w: int, drop_last: bool,
                                                                 grouped: bool) -> None:
    groups = random_groups(n) if grouped else None
    full = run_all_ranks(n, b, w, groups, epoch=1, drop_last=drop_last, seed=5)
    steps = len(full[0])
    for stop in range(steps + 1):  # includes 0 and the last step
        states = []
        for rank in range(w):
            s = make(n, b, w, rank, groups, drop_last=drop_last, seed=5)
            s.set_epoch(1)
            it = iter(s)
            pre = [next(it) for _ in range(stop)]
            assert pre == full[rank][:stop]
            states.append(s.state_dict(consumed_batches=stop))
        assert all(state == states[0] for state in states), "every rank saves the same state"
        assert states[0]["position"] == min(stop * w * b, n)
        state = json.loads(json.dumps(states[0]))  # survives a JSON checkpoint
        resumed = run_all_ranks(n, b, w, groups, epoch=1, state=state, drop_last=drop_last, seed=5)
        for rank in range(w):
            assert full[rank][:stop] + resumed[rank] == full[rank]


# --- resume on another world size / batch size -------------------------------------------------------------

CHANGES = [((2, 3), (3, 3)), ((4, 2), (1, 2)), ((1, 4), (2, 4)), ((2, 4), (2, 3)), ((3, 2), (2, 5))]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize(("before", "after"), CHANGES)
def test_resume_on_another_world_or_batch_size_skips_and_repeats_nothing(
        before: tuple[int, int], after: tuple[int, int], grouped: bool) -> None:
    n = 41
    groups = random_groups(n, seed=4) if grouped else None
    (w1, b1), (w2, b2) = before, after
    steps1 = len(make(n, b1, w1, 0, groups))
    for stop in sorted({0, 1, steps1 // 2, steps1 - 1, steps1}):
        pre_per_rank = []
        for rank in range(w1):
            s = make(n, b1, w1, rank, groups)
            it = iter(s)
            pre_per_rank.append([next(it) for _ in range(stop)])
            state = s.state_dict(consumed_batches=stop)
        position = state["position"]
        post = global_flat(run_all_ranks(n, b2, w2, groups, state=state))
        real = global_flat(pre_per_rank)[:position] + post[:n - position]
        assert sorted(real) == list(range(n)), f"stop={stop}"
        assert len(post) - (n - position) < w2 * b2  # only the documented padding on top


@pytest.mark.parametrize("drop_last", [False, True])
def test_chained_resumes_with_grouping_and_changing_batch_sizes(drop_last: bool) -> None:
    """(W, B): (2, 3) -> (3, 2) -> (1, 4): the history keeps the consumed set rebuildable."""
    n = 60
    groups = random_groups(n, num_groups=4, seed=9)
    seen: list[int] = []
    state: dict[str, Any] | None = None
    for (w, b), stop in [((2, 3), 3), ((3, 2), 2), ((1, 4), None)]:
        per_rank = []
        for rank in range(w):
            s = make(n, b, w, rank, groups, seed=11, drop_last=drop_last)
            s.set_epoch(4)
            if state is not None:
                s.load_state_dict(state)
            it = iter(s)
            per_rank.append(list(it) if stop is None else [next(it) for _ in range(stop)])
            new_state = s.state_dict(consumed_batches=len(per_rank[-1]))
        flat = global_flat(per_rank)
        start = state["position"] if state else 0
        seen += flat[:new_state["position"] - start]
        state = json.loads(json.dumps(new_state))
    assert state is not None and len(state["history"]) == 2
    assert len(seen) == len(set(seen))
    if drop_last:
        assert n - len(seen) < 4
    else:
        assert sorted(seen) == list(range(n))


# --- position after N steps vs prefetching -----------------------------------------------------------------


@pytest.mark.parametrize("done", [0, 2, 5])
def test_state_after_prefetch_resumes_at_the_steps_training_finished(done: int) -> None:
    n, b, w, rank = 70, 3, 2, 1
    full = list(make(n, b, w, rank))
    s = make(n, b, w, rank)
    it = iter(s)
    pulled = [next(it) for _ in range(done + 3)]  # a DataLoader pulled 3 batches ahead of training
    assert pulled == full[:done + 3]
    assert s.position == (done + 3) * w * b  # the running count is ahead...
    state = s.state_dict(consumed_batches=done)  # ...so the loop records what training finished
    assert state["position"] == s.position_after(done) == done * w * b
    resumed = make(n, b, w, rank)
    resumed.load_state_dict(state)
    assert len(resumed) == len(full) - done
    assert list(resumed) == full[done:]


def test_position_after_counts_from_the_pass_start_and_caps_at_the_epoch_end() -> None:
    s = make(25, 4, 2, 0)
    s.load_state_dict({**s.state_dict(), "position": 8})
    assert len(s) == 3  # 17 entries left: 3 steps of 8, the last padded
    assert s.position_after(0) == 8 and s.position_after(1) == 16 and s.position_after(3) == 25
    with pytest.raises(ValueError, match="steps"):
        s.position_after(4)
    assert len(list(s)) == 3 and s.position == 25
    assert list(s) == []  # an epoch iterated to its end stays finished (exact resume after the last step)
    s.set_epoch(0)  # same epoch: nothing restarts
    assert list(s) == []
    s.set_epoch(1)
    assert len(s) == 4 and len(list(s)) == 4


def test_set_epoch_keeps_a_restored_position_of_the_same_epoch() -> None:
    a = make(30, 2, 3, 2)
    a.set_epoch(3)
    full = list(a)
    b = make(30, 2, 3, 2)
    b.load_state_dict({**a.state_dict(), "position": 12})
    b.set_epoch(3)  # what a training loop does at the top of the resumed epoch
    assert list(b) == full[2:]


# --- grouping ----------------------------------------------------------------------------------------------


def reference_layout(pool: list[int], groups: list[int], b: int) -> list[int]:
    """The plain buffer-per-group algorithm the vectorised layout must equal."""
    buffers: dict[int, list[int]] = {}
    out: list[int] = []
    for i in pool:
        buf = buffers.setdefault(groups[i], [])
        buf.append(i)
        if len(buf) == b:
            out += buf
            buf.clear()
    return out + [i for g in sorted(buffers) for i in buffers[g]]


@pytest.mark.parametrize("b", [1, 2, 3, 5, 8])
def test_group_layout_equals_the_buffer_algorithm(b: int) -> None:
    n = 97
    groups = random_groups(n, num_groups=5, seed=b)
    pool = torch.randperm(n, generator=torch.Generator().manual_seed(b)).numpy()
    assert _group_layout(pool, torch.tensor(groups).numpy(), b).tolist() == reference_layout(
        pool.tolist(), groups, b)


@pytest.mark.parametrize(("n", "b", "w"), [(61, 4, 2), (40, 3, 3), (9, 2, 2)])
def test_grouped_batches_are_single_group_except_the_leftovers(n: int, b: int, w: int) -> None:
    groups = random_groups(n, num_groups=3, seed=n)
    per_rank = run_all_ranks(n, b, w, groups)
    flat = global_flat(per_rank)
    real_batches = [flat[i:i + b] for i in range(0, n, b)]
    mixed = [batch for batch in real_batches if len({groups[i] for i in batch}) > 1]
    assert len(mixed) <= 3  # leftovers: fewer than B per group, so at most one mixed batch per group
    assert all(batch in real_batches[-len(mixed):] for batch in mixed)  # and only at the end of the epoch


def test_groups_of_whole_batches_give_only_single_group_batches_even_when_padded() -> None:
    groups = [0] * 12 + [1] * 8  # 5 batches of 4 for 3 ranks: one padding batch
    per_rank = run_all_ranks(20, 4, 3, groups, seed=2)
    assert sum(len(batches) for batches in per_rank) == 6
    assert all(len({groups[i] for i in batch}) == 1 for batches in per_rank for batch in batches)


def test_padding_batches_repeat_the_first_batches_whole() -> None:
    """A partial last batch is filled from the sequence start, whole padding batches stay batch-aligned."""
    groups = [0] * 8 + [1] * 8 + [2]  # 4 full batches + 1 leftover; 3 ranks need 6 batches: 1 padding batch
    per_rank = run_all_ranks(17, 4, 3, groups, seed=6)
    first_batch, padding_batch = per_rank[0][0], per_rank[2][1]
    assert padding_batch == first_batch and len({groups[i] for i in padding_batch}) == 1
    assert per_rank[1][1] == [16] + first_batch[:3]  # the leftover, filled from the start


def test_a_new_epoch_forgets_the_batch_size_history() -> None:
    groups = random_groups(40, seed=2)
    old = make(40, 3, 2, 0, groups)
    it = iter(old)
    next(it)
    s = make(40, 2, 2, 0, groups)
    s.load_state_dict(old.state_dict(consumed_batches=1))
    assert s.state_dict()["history"] == [[3, 6]]
    s.set_epoch(1)
    fresh = make(40, 2, 2, 0, groups)
    fresh.set_epoch(1)
    assert s.state_dict()["history"] == [] and list(s) == list(fresh)


def test_aspect_ratio_group_ids_match_torchvision_quantize() -> None:
    # k=3: edges 2**linspace(-1, 1, 7) = 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2; an edge goes to the upper bin
    widths = [40, 50, 70, 100, 120, 150, 300, 200]
    heights = [100, 100, 100, 100, 100, 100, 100, 100]
    assert aspect_ratio_group_ids(widths, heights) == [0, 1, 2, 4, 4, 5, 7, 7]
    assert aspect_ratio_group_ids(widths, heights, k=0) == [0, 0, 0, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="positive"):
        aspect_ratio_group_ids([0], [1])


# --- bad states --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("num_samples", 31), ("seed", 1), ("shuffle", False),
                                              ("group_digest", 123)])
def test_a_state_of_another_dataset_or_seed_is_refused_naming_the_field(field: str, value: Any) -> None:
    state = make(30, 2, 2, 0).state_dict()
    with pytest.raises(ValueError, match=field):
        make(30, 2, 2, 0).load_state_dict({**state, field: value})


def test_a_grouped_state_is_refused_by_an_ungrouped_sampler_and_bad_positions_too() -> None:
    grouped = make(30, 2, 2, 0, random_groups(30)).state_dict()
    with pytest.raises(ValueError, match="group_digest"):
        make(30, 2, 2, 0).load_state_dict(grouped)
    with pytest.raises(ValueError, match="position"):
        make(30, 2, 2, 0).load_state_dict({**make(30, 2, 2, 0).state_dict(), "position": 31})
    with pytest.raises(ValueError, match="lacks seed"):
        make(30, 2, 2, 0).load_state_dict({k: v for k, v in grouped.items() if k != "seed"})


def test_state_dict_is_small_and_plain() -> None:
    state = make(30, 2, 2, 0, random_groups(30)).state_dict()
    assert set(state) == {"epoch", "position", "seed", "num_samples", "shuffle", "batch_size", "num_replicas",
                          "group_digest", "history"}
    assert all(type(v) in (int, bool) for k, v in state.items() if k != "history") and state["history"] == []


# --- with a real DataLoader --------------------------------------------------------------------------------


class IndexDataset(Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return 1000 + i


def test_dataloader_yields_the_sampler_batches() -> None:
    n, b, w = 23, 4, 2
    for rank in range(w):
        expected = list(make(n, b, w, rank, random_groups(n)))
        loader = DataLoader(IndexDataset(n), batch_sampler=make(n, b, w, rank, random_groups(n)), num_workers=0)
        assert len(loader) == len(expected)
        assert [(batch - 1000).tolist() for batch in loader] == expected
