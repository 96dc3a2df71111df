"""The HF engine's numbers are exactly the teacher's log_softmax top-k, at every position."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ddk_cache.engines import EngineOptions, create_engine
from ddk_cache.engines import hf as hf_engine
from ddk_cache.errors import DDKCacheError, EngineError

K = 8


@pytest.fixture(scope="module")
def windows(tiny_teacher) -> np.ndarray:
    vocab = AutoModelForCausalLM.from_pretrained(tiny_teacher).config.vocab_size
    return np.random.default_rng(0).integers(0, vocab, size=(5, 17), dtype=np.int32)


@pytest.fixture(scope="module")
def reference(tiny_teacher, windows):
    """Direct computation: log_softmax over the full vocabulary, then topk and gather."""
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    with torch.inference_mode():
        x = torch.as_tensor(windows, dtype=torch.long)
        logprobs = torch.log_softmax(model(input_ids=x[:, :-1]).logits.float(), dim=-1)
    top = logprobs.topk(K, dim=-1)
    return top.indices.numpy(), top.values.numpy(), logprobs.gather(-1, x[:, 1:, None]).squeeze(-1).numpy(), logprobs.numpy()


def test_topk_equals_direct_log_softmax_topk_at_every_position(tiny_teacher, windows, reference):
    engine = create_engine("hf", str(tiny_teacher), EngineOptions(device="cpu", batch_size=2))
    result = engine.score(windows, K)
    ref_ids, ref_values, ref_target, _ = reference
    assert result.topk_ids.shape == (5, 16, K) and result.topk_ids.dtype == np.int32
    np.testing.assert_array_equal(result.topk_ids, ref_ids)
    np.testing.assert_allclose(result.topk_logprobs, ref_values, rtol=0, atol=1e-5)
    assert np.all(np.diff(result.topk_logprobs, axis=-1) <= 0), "top-k must be in descending order"


def test_target_logprob_is_the_actual_next_token_including_the_last_position(tiny_teacher, windows, reference):
    result = create_engine("hf", str(tiny_teacher), EngineOptions(device="cpu")).score(windows, K)
    _, _, ref_target, full = reference
    np.testing.assert_allclose(result.target_logprobs, ref_target, atol=1e-5)
    # the last position predicts window[-1], the token after the model's input
    last = full[np.arange(5), -1, windows[:, -1]]
    np.testing.assert_allclose(result.target_logprobs[:, -1], last, atol=1e-5)
    # raw log-probs: the top-k mass is a probability below one, the remaining tail is known
    assert np.all(np.exp(result.topk_logprobs).sum(-1) <= 1 + 1e-5)


def test_blocked_log_softmax_matches_unblocked(tiny_teacher, windows, monkeypatch):
    engine = create_engine("hf", str(tiny_teacher), EngineOptions(device="cpu", batch_size=5))
    whole = engine.score(windows, K)
    monkeypatch.setattr(hf_engine, "LOGPROB_BLOCK_ELEMENTS", 3 * engine.config.vocab_size)  # 3 rows per block
    blocked = engine.score(windows, K)
    np.testing.assert_array_equal(blocked.topk_ids, whole.topk_ids)
    # the head's matmul on fewer rows may round differently (1 ulp seen on an AMD EPYC): equal up to float32 rounding,
    # where a wrong normaliser or a misplaced row would be off by far more
    np.testing.assert_allclose(blocked.target_logprobs, whole.target_logprobs, rtol=0, atol=1e-5)


def test_progress_reports_every_scored_token(tiny_teacher, windows):
    seen: list[int] = []
    create_engine("hf", str(tiny_teacher), EngineOptions(device="cpu", batch_size=2)).score(windows, K, progress=seen.append)
    assert seen == [32, 32, 16]


def test_bad_teacher_and_bad_k_are_clear_errors(tmp_path, tiny_teacher, windows):
    with pytest.raises(DDKCacheError, match="teacher '.*no-model' does not exist: check the path"):
        create_engine("hf", str(tmp_path / "no-model"))  # said at once, without trying the hub
    with pytest.raises(EngineError, match="cannot load teacher"):
        create_engine("hf", str(tmp_path))  # a folder, but no model in it
    with pytest.raises(EngineError, match="unknown engine 'tpu'"):
        create_engine("tpu", str(tiny_teacher))
    engine = create_engine("hf", str(tiny_teacher), EngineOptions(device="cpu"))
    with pytest.raises(EngineError, match="k=100000 must be between 1"):
        engine.score(windows, 100_000)


def test_auto_dtype_is_float32_on_cpu(tiny_teacher):
    engine = create_engine("auto", str(tiny_teacher), EngineOptions(device="cpu"))
    assert engine.describe()["settings"]["dtype"] == "float32"
    assert engine.value_settings() == {"name": "hf", "dtype": "float32"}


def test_bfloat16_logits_select_the_entries_of_their_float32_copy():
    """The top-k runs in the logits' own dtype (a GPU teacher's bf16): same ids, and values equal to the
    float32 log_softmax of the same logits, because float(bf16) is exact and keeps the order."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 500) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 500, (3, 7))
    ids, values, target, _ = hf_engine.topk_from_logits(logits, targets, K)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = logprobs.topk(K, dim=-1)
    assert values.dtype == torch.float32 and target.dtype == torch.float32
    # bf16 has ties (8 mantissa bits): compare the selected values, and ids wherever the value is unique
    torch.testing.assert_close(values, top.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(logprobs.gather(-1, ids.long()), top.values, rtol=0, atol=1e-5)
    torch.testing.assert_close(target, logprobs.gather(-1, targets[..., None]).squeeze(-1), rtol=0, atol=1e-5)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()  # bf16 logits are not consumed


@pytest.mark.parametrize("draws", [None, 6])
def test_the_head_applied_in_row_blocks_captures_what_the_whole_logits_give(tiny_teacher, windows, monkeypatch, draws):
    """Issue 26: the engine applies the head to row blocks of the recorded hidden states; with blocks of 7 rows (that
    divide nothing) the top-k ids, log-probs, targets and the sampled draws (the same CPU generator) are today's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    x = torch.as_tensor(windows, dtype=torch.long)
    with torch.inference_mode():
        whole = hf_engine.topk_from_logits(model(input_ids=x[:, :-1]).logits, x[:, 1:], K, draws, torch.Generator().manual_seed(3))
        monkeypatch.setattr(hf_engine, "LOGPROB_BLOCK_ELEMENTS", 7 * model.config.vocab_size)
        hidden, head = hf_engine.hidden_states(model, x[:, :-1])
        blocks = hf_engine.topk_from_hidden(hidden, head, x[:, 1:], K, draws, torch.Generator().manual_seed(3))
    torch.testing.assert_close(blocks[0], whole[0], rtol=0, atol=0)
    for a, b in zip(blocks[1:3], whole[1:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if draws is not None:
        assert torch.equal(blocks[3], whole[3])


def test_tail_draws_come_from_the_distribution_outside_the_head():
    """headtail capture (issue 27): the draws never hit a head id, and their frequencies are the teacher's
    distribution restricted to the tail (p / tail mass): with 40,000 draws of a 12-token vocabulary every tail
    frequency is within 5 standard errors of it. The head and target are what a plain top-k capture gives."""
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 12) * 2
    targets = torch.randint(0, 12, (2, 3))
    head = 3
    ids, values, target, draws = hf_engine.topk_from_logits(logits.clone(), targets, head, 40_000, torch.Generator().manual_seed(0), tail=True)
    plain = hf_engine.topk_from_logits(logits.clone(), targets, head)
    torch.testing.assert_close(ids, plain[0], rtol=0, atol=0)
    torch.testing.assert_close(values, plain[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(target, plain[2], rtol=0, atol=1e-5)
    probs = torch.softmax(logits.double(), -1).reshape(-1, 12)
    for row, (row_ids, row_draws) in enumerate(zip(ids.reshape(-1, head), draws.reshape(-1, 40_000))):
        assert not torch.isin(row_draws, row_ids).any(), "a tail draw hit a head id"
        tail = probs[row].clone()
        tail[row_ids.long()] = 0
        tail /= tail.sum()
        frequency = torch.bincount(row_draws.long(), minlength=12).double() / 40_000
        error = (tail * (1 - tail) / 40_000).sqrt()
        assert torch.all((frequency - tail).abs() <= 5 * error + 1e-12), (frequency, tail)


def test_a_head_as_large_as_the_vocabulary_leaves_no_tail_and_is_refused(tiny_teacher, windows):
    engine = create_engine("hf", str(tiny_teacher), EngineOptions(device="cpu"))
    vocab = int(engine.config.vocab_size)
    with pytest.raises(EngineError, match="leaves no tail to draw from"):
        engine.score(windows[:1], vocab, draws=4, tail=True)
