"""The data order and the loader: every window once per epoch, cyclic reuse, deterministic,
resumable from global cursors, the same global batches on any number of ranks."""

from __future__ import annotations

import numpy as np
import pytest

from ddk_cache.store.reader import CacheReader
from ddk_cache.training.data_order import DomainOrder, GlobalBatchPlanner, micro_batches, rank_slice
from ddk_cache.training.domain_samplers import DomainSampler
from ddk_cache.training.window_loader import WindowLoader, domain_orders


@pytest.fixture
def reader(tiny_store) -> CacheReader:
    return CacheReader(str(tiny_store))


def walk(order: DomainOrder, n: int, start: tuple[int, int] = (0, 0)) -> list[int]:
    """Store rows of the next `n` windows of a domain's stream."""
    (epoch, position), rows = start, []
    for _ in range(n):
        rows.append(order.locate(epoch, position)[1])
        position += 1
        if position == order.n_windows:
            epoch, position = epoch + 1, 0
    return rows


def test_each_epoch_visits_every_window_once_in_a_fresh_chunk_aligned_order(reader):
    [order] = domain_orders(reader, ["code"], seed=1)
    n = order.n_windows
    first, second = walk(order, n), walk(order, n, start=(1, 0))
    assert sorted(first) == sorted(second) == list(range(n))  # exhausted domain is reused cyclically
    assert first != second and first != list(range(n))  # reshuffled each epoch, not the stored order
    # the stream stays inside one chunk until it has used all of that chunk's windows
    chunks = [row // order.chunk_windows for row in first]
    assert len([c for i, c in enumerate(chunks) if i == 0 or c != chunks[i - 1]]) == order.n_chunks


def test_order_depends_on_the_seed_only(reader):
    [a], [b], [c] = (domain_orders(reader, ["prose"], seed=s) for s in (5, 5, 6))
    assert walk(a, 60) == walk(b, 60) != walk(c, 60)


def test_planner_resumes_from_its_cursors_and_matches_the_uninterrupted_plan(reader):
    orders = domain_orders(reader, reader.domains, seed=3)
    sampler = DomainSampler(reader.domains, [1, 2, 3])
    straight = GlobalBatchPlanner(orders, 6, seed=3)
    expected = [straight.plan(step, sampler) for step in range(20)]
    first = GlobalBatchPlanner(orders, 6, seed=3)
    for step in range(7):
        first.plan(step, sampler)
    resumed = GlobalBatchPlanner(orders, 6, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.plan(step, sampler) for step in range(7, 20)] == expected[7:]
    assert resumed.peek(20, sampler) == resumed.plan(20, sampler)  # peeking does not move the cursors


def test_rank_slices_are_the_micro_batches_of_one_process(reader):
    planner = GlobalBatchPlanner(domain_orders(reader, reader.domains, seed=0), 8, seed=0)
    refs = planner.plan(0, DomainSampler(reader.domains))
    assert [r.domain for r in refs] == sorted(r.domain for r in refs)  # grouped by domain, in stream order
    one_process = micro_batches(rank_slice(refs, 0, 1), 2)
    two_ranks = [mb for rank in range(2) for mb in micro_batches(rank_slice(refs, rank, 2), 2)]
    four_ranks = [rank_slice(refs, rank, 4) for rank in range(4)]
    assert one_process == two_ranks == four_ranks


def test_loader_batches_carry_each_windows_own_teacher_targets(reader):
    orders = domain_orders(reader, reader.domains, seed=0)
    planner = GlobalBatchPlanner(orders, 4, seed=0)
    loader = WindowLoader(reader, orders)
    try:
        for step in range(5):
            refs = planner.plan(step, DomainSampler(reader.domains))
            batch = loader.batch(refs)
            loader.retain(refs)
            assert batch.input_ids.shape == (4, 16) and batch.targets.shape == (4, 16)
            assert batch.teacher.ids.shape == (4, 16, 8) and batch.teacher.valid is None  # fixed top-k: every slot is real
            assert (batch.input_ids[:, 1:] == batch.targets[:, :-1]).all()
            assert batch.domains.tolist() == [r.domain for r in refs]
            for i, ref in enumerate(refs):
                stored = reader.read(reader.domains[ref.domain], "train", ref.row, ref.row + 1)
                np.testing.assert_array_equal(batch.input_ids[i].numpy(), stored.tokens[0, :-1])
                np.testing.assert_array_equal(batch.teacher.ids[i].numpy(), stored.ids[0])
                np.testing.assert_array_equal(batch.teacher.logprobs[i].numpy(), stored.logprobs[0])
                np.testing.assert_array_equal(batch.teacher.rest[i].numpy(), stored.rest_logprobs[0])
    finally:
        loader.close()


def test_loader_decodes_only_the_chunks_of_its_own_windows(reader):
    orders = domain_orders(reader, reader.domains, seed=0)
    refs = GlobalBatchPlanner(orders, 4, seed=0).plan(0, DomainSampler(reader.domains, [1, 1e-9, 1e-9]))
    loader = WindowLoader(reader, orders)
    try:
        loader.batch(refs[:1])
        assert set(loader._chunks) == {(refs[0].domain, refs[0].chunk)}
    finally:
        loader.close()
