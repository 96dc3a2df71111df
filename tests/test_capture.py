"""The capture transform and the v2 codecs: exact where they must be, within the stated error where they quantize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from ddk_cache.engines.base import TopKResult
from ddk_cache.engines.hf import HFTeacherEngine
from ddk_cache.store.capture import Capture, distinct_counts, encode_targets, rest_logprobs, top_p_entries
from ddk_cache.store.format import StoreLayout, create_split_arrays
from ddk_cache.store.header import bare_header
from ddk_cache.store.reader import CacheReader
from ddk_cache.store.writer import CacheWriter
from ddk_cache.training.losses import bucket_logprobs


def test_distinct_counts_byte_for_byte():
    draws = np.array([[[5, 3, 5, 9, 3, 5]], [[7, 7, 7, 7, 7, 7]]], dtype=np.int32)
    ids, counts, n = distinct_counts(draws)
    np.testing.assert_array_equal(n, [[3], [1]])
    np.testing.assert_array_equal(ids, [[[3, 5, 9, 9, 9, 9]], [[7, 7, 7, 7, 7, 7]]])  # padding repeats the last id
    np.testing.assert_array_equal(counts, [[[2, 3, 1, 0, 0, 0]], [[6, 0, 0, 0, 0, 0]]])
    assert ids.dtype == np.int32 and counts.dtype == np.uint8


def test_topk_entries_are_sorted_by_id_with_an_exact_rest():
    logprobs = np.log(np.array([[[0.5, 0.3, 0.1]]], dtype=np.float32))
    result = TopKResult(np.array([[[40, 7, 19]]], dtype=np.int32), logprobs, np.array([[-0.7]], dtype=np.float32))
    encoded = encode_targets(result, Capture(mode="topk", k=3))
    np.testing.assert_array_equal(encoded.ids, [[[7, 19, 40]]])
    np.testing.assert_allclose(np.exp(encoded.values), [[[0.3, 0.1, 0.5]]], rtol=1e-6)
    np.testing.assert_allclose(np.exp(encoded.rest_logprobs), [[0.1]], rtol=1e-5)
    assert encoded.n_entries.tolist() == [[3]]


def test_top_p_keeps_the_fewest_leading_entries_reaching_p():
    probs = np.array([[[0.6, 0.25, 0.1, 0.05]], [[0.97, 0.01, 0.01, 0.01]]], dtype=np.float32)
    lp = np.log(probs)
    assert top_p_entries(lp, 0.8).tolist() == [[2], [1]]
    assert top_p_entries(lp, 0.999).tolist() == [[4], [4]]  # never more than k: capped
    result = TopKResult(np.tile(np.array([3, 1, 2, 0], np.int32), (2, 1, 1)), lp, np.zeros((2, 1), np.float32))
    encoded = encode_targets(result, Capture(mode="topp", k=4, top_p=0.8))
    np.testing.assert_array_equal(encoded.ids[0, 0, :2], [1, 3])
    np.testing.assert_array_equal(encoded.ids[0, 0, 2:], [3, 3])  # padding
    np.testing.assert_allclose(np.exp(encoded.rest_logprobs), [[0.15], [0.03]], rtol=1e-4)


def test_rest_stays_finite_when_the_top_token_holds_all_the_mass():
    assert rest_logprobs(np.zeros((1, 1), np.float32))[0] == pytest.approx(-69.0)


def test_bad_capture_settings_are_refused():
    for kwargs, message in [({"mode": "beam"}, "unknown capture mode"), ({"mode": "sampled"}, "--draws"),
                            ({"mode": "sampled", "draws": 300}, "--draws"), ({"mode": "topp"}, "--top-p"),
                            ({"k": 0}, "--k"), ({"logprob_scale": -1}, "--logprob-scale")]:
        with pytest.raises(ValueError, match=message):
            Capture(**kwargs)


def _store_round_trip(tmp_path, result: TopKResult, capture: Capture, vocab: int):
    windows = np.zeros((result.target_logprobs.shape[0], result.target_logprobs.shape[1] + 1), dtype=np.int32)
    layout = StoreLayout.choose(windows.shape[1] - 1, capture, vocab, chunk_windows=2, shard_windows=4)
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    root.attrs["ddk_cache"] = bare_header(["d"], layout.seq_len, capture, vocab, layout.chunk_windows, layout.shard_windows).to_dict()
    create_split_arrays(root.create_group("d").create_group("train"), len(windows), layout)
    writer = CacheWriter(root, str(tmp_path / "s.zarr"), layout)
    encoded = encode_targets(result, capture)
    for shard in range(layout.n_shards(len(windows))):
        rows = layout.shard_slice(shard, len(windows))
        writer.write_shard("d", "train", shard, windows[rows], encoded.windows(rows))
    return encoded, CacheReader(str(tmp_path / "s.zarr")).read("d", "train")


@pytest.mark.parametrize("scale", [8, 16, 32, 64])
def test_quantized_store_decodes_within_the_stated_kl(tmp_path, tiny_teacher, scale):
    """Real distributions (the tiny teacher) through the real writer, codecs and reader.

    Rounding log-probs to 1/scale nat moves each entry by at most 1/(2 scale); the KL of the
    renormalised (entries + rest) distribution is then at most about (1/(2 scale))^2 / 2 per position.
    """
    engine = HFTeacherEngine(str(tiny_teacher), device="cpu")
    windows = np.random.default_rng(0).integers(0, engine.config.vocab_size, size=(6, 33)).astype(np.int32)
    result = engine.score(windows, 16)
    encoded, block = _store_round_trip(tmp_path, result, Capture(mode="topk", k=16, logprob_scale=scale), engine.config.vocab_size)
    np.testing.assert_array_equal(block.ids, encoded.ids)  # ids are lossless
    assert np.abs(block.logprobs - encoded.values).max() <= 0.5 / scale + 1e-6
    np.testing.assert_allclose(block.target_logprobs, result.target_logprobs, atol=0.5 / 1024 + 1e-6)
    ids = torch.as_tensor(encoded.ids).long().flatten(0, 1)
    student = torch.log_softmax(torch.randn(ids.shape[0], engine.config.vocab_size), -1)
    exact_t, _ = bucket_logprobs(student, ids, torch.as_tensor(encoded.values).flatten(0, 1))  # v1 rule: rest = 1 - sum
    decoded_t, _ = bucket_logprobs(student, ids, torch.as_tensor(block.logprobs).flatten(0, 1),
                                   rest=torch.as_tensor(block.rest_logprobs).flatten())
    p = exact_t.double().exp()
    kl = (p * (exact_t.double() - decoded_t.double())).sum(-1)
    assert float(kl.max()) <= (0.5 / scale) ** 2 / 2 + 1e-6
    assert float(kl.mean()) <= (0.5 / scale) ** 2 / 6 + 1e-7  # uniform rounding: mean square error is a third of the max


def test_sampled_store_round_trips_counts_and_estimates_the_teacher_without_bias(tmp_path, tiny_teacher):
    engine = HFTeacherEngine(str(tiny_teacher), device="cpu")
    windows = np.random.default_rng(1).integers(0, engine.config.vocab_size, size=(4, 17)).astype(np.int32)
    result = engine.score(windows, 1, draws=64, seed=3)
    assert np.array_equal(result.samples, engine.score(windows, 1, draws=64, seed=3).samples)  # reproducible
    assert not np.array_equal(result.samples, engine.score(windows, 1, draws=64, seed=4).samples)
    encoded, block = _store_round_trip(tmp_path, result, Capture(mode="sampled", draws=64), engine.config.vocab_size)
    np.testing.assert_array_equal(block.ids, encoded.ids)
    valid = block.valid
    np.testing.assert_allclose(np.where(valid, np.exp(block.logprobs), 0).sum(-1), 1.0, rtol=1e-5)  # counts / draws sum to 1
    assert block.rest_logprobs is None

    # unbiased: averaged over many independent draws, counts / n approaches the exact distribution
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.as_tensor(windows[:1, :-1], dtype=torch.long)).logits[0, 0]
    exact = torch.softmax(logits.double(), -1).numpy()
    estimate = np.zeros_like(exact)
    for seed in range(200):
        draws = engine.score(windows[:1], 1, draws=64, seed=seed).samples[0, 0]
        estimate += np.bincount(draws, minlength=exact.size) / 64 / 200
    assert np.abs(estimate - exact).max() < 4 * np.sqrt(exact.max() / (64 * 200))  # within ~4 standard errors
