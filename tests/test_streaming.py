"""The streaming reader: every window once per epoch, cyclic reuse, deterministic, resumable."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ddk_cache.cache_reader import CacheReader
from ddk_cache.streaming import CacheBatcher, DomainStream


@pytest.fixture
def reader(tiny_store) -> CacheReader:
    return CacheReader(str(tiny_store))


def take(stream: DomainStream, n: int) -> list[np.ndarray]:
    windows = [stream.next_window() for _ in range(n)]
    return [block.tokens[row] for block, row in windows]


def test_each_epoch_visits_every_window_once_in_a_fresh_order(reader):
    with ThreadPoolExecutor(2) as pool:
        stream = DomainStream(reader, "code", seed=1, pool=pool)
        n = stream.n_windows
        stored = reader.read("code", "train").tokens
        first, second = take(stream, n), take(stream, n)
    as_set = lambda windows: sorted(map(tuple, windows))  # noqa: E731
    assert as_set(first) == as_set(stored) == as_set(second)  # exhausted domain is reused cyclically
    assert [tuple(w) for w in first] != [tuple(w) for w in second]
    assert [tuple(w) for w in first] != [tuple(w) for w in stored]  # shuffled


def test_windows_come_with_their_own_teacher_targets(reader):
    stored = reader.read("math", "train")
    index = {tuple(t): i for i, t in enumerate(stored.tokens)}
    with ThreadPoolExecutor(2) as pool:
        stream = DomainStream(reader, "math", seed=3, pool=pool)
        for _ in range(20):
            block, row = stream.next_window()
            i = index[tuple(block.tokens[row])]
            np.testing.assert_array_equal(block.ids[row], stored.ids[i])
            np.testing.assert_array_equal(block.logprobs[row], stored.logprobs[i])
            np.testing.assert_array_equal(block.rest_logprobs[row], stored.rest_logprobs[i])


def test_stream_is_deterministic_and_resumes_from_a_cursor(reader):
    with ThreadPoolExecutor(2) as pool:
        reference = DomainStream(reader, "prose", seed=5, pool=pool)
        expected = take(reference, 300)
        stream = DomainStream(reader, "prose", seed=5, pool=pool)
        take(stream, 137)
        cursor = stream.state()
        resumed = DomainStream(reader, "prose", seed=5, pool=pool)
        resumed.restore(cursor)
        np.testing.assert_array_equal(np.stack(take(resumed, 163)), np.stack(expected[137:]))
        other_seed = DomainStream(reader, "prose", seed=6, pool=pool)
        assert not np.array_equal(np.stack(take(other_seed, 20)), np.stack(expected[:20]))


def test_batches_are_model_ready(reader):
    batcher = CacheBatcher(reader, reader.domains, seed=0)
    try:
        batch = batcher.next_batch(np.array([0, 2, 2, 1]))
        assert batch.input_ids.shape == (4, 16) and batch.targets.shape == (4, 16)
        assert batch.teacher.ids.shape == (4, 16, 8) and batch.teacher.logprobs.dtype.is_floating_point
        assert batch.teacher.rest.shape == (4, 16) and batch.teacher.valid is None  # fixed top-k: every slot is real
        assert batch.domains.tolist() == [0, 2, 2, 1]
        assert (batch.input_ids[:, 1:] == batch.targets[:, :-1]).all()
        state = batcher.state()
        assert state["math"]["position"] == 2 and state["prose"]["position"] == 1
    finally:
        batcher.close()
