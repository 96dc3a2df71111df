"""Turn vLLM `RequestOutput`s into the arrays every engine returns (see `engines.base`).

A request is one window `w` of `seq_len + 1` tokens. Its prompt is `w[:seq_len]` (what the
HF engine feeds too) and it generates one token, forced to be `w[seq_len]` with
`allowed_token_ids`. vLLM's facts that shape this module:

- `prompt_logprobs[0]` is None; entry i (1 <= i < seq_len) is the distribution of prompt
  token i given tokens < i, i.e. our position t = i - 1.
- The distribution after the last prompt token (our position seq_len - 1) is the
  generated step's `logprobs[0]`. With `logprobs_mode="raw_logprobs"` (the default) the
  values are taken before `allowed_token_ids` masks the logits, so they are the model's
  raw distribution; forcing the sampled token only makes that entry the actual token.
- Every position carries the actual (or sampled) token first, then the top-k. In the flat
  form (`FlatLogprobs`) that is always k + 1 entries, the actual token possibly repeated
  inside the top-k. In the dict form a repeated token collapses into one key, leaving k
  entries, in which case the actual token is one of the top-k.

Flat outputs are converted with whole-list numpy conversions, never a Python object per
token; the dict form needs a loop over positions and is the fallback for old vLLM.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ddk_cache.engines.base import TopKResult
from ddk_cache.errors import EngineError


def request_outputs_to_result(outputs: Sequence[Any], windows: np.ndarray, k: int) -> TopKResult:
    """Arrays `[B, seq_len, k]` / `[B, seq_len]` for `outputs[i]` answering `windows[i]`."""
    if len(outputs) != len(windows):
        raise EngineError(f"vLLM returned {len(outputs)} outputs for {len(windows)} windows")
    seq_len = windows.shape[1] - 1
    ids = np.empty((len(windows), seq_len, k), dtype=np.int32)
    logprobs = np.empty((len(windows), seq_len, k), dtype=np.float32)
    target = np.empty((len(windows), seq_len), dtype=np.float32)
    for row, (output, window) in enumerate(zip(outputs, windows)):
        ids[row], logprobs[row], target[row] = request_output_to_arrays(output, window, k)
    return TopKResult(topk_ids=ids, topk_logprobs=logprobs, target_logprobs=target)


def request_output_to_arrays(output: Any, window: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One request: prompt positions from `prompt_logprobs[1:]`, the last from the generated step."""
    seq_len = len(window) - 1
    if output.prompt_token_ids is not None and list(output.prompt_token_ids) != window[:seq_len].tolist():
        raise EngineError("a vLLM output's prompt is not its window's first seq_len tokens: outputs out of order?")
    prompt = output.prompt_logprobs
    if prompt is None or len(prompt) != seq_len:
        got = "none" if prompt is None else f"{len(prompt)} positions"
        raise EngineError(f"vLLM returned prompt log-probs with {got} for a {seq_len}-token prompt: was prompt_logprobs set?")
    completion = output.outputs[0]
    if list(completion.token_ids[:1]) != [int(window[-1])]:
        raise EngineError(
            f"vLLM generated token {list(completion.token_ids[:1])} where {int(window[-1])} was forced with "
            "allowed_token_ids: this vLLM version does not honour it; use vLLM >= 0.10.2"
        )
    if completion.logprobs is None or len(completion.logprobs) < 1:
        raise EngineError("vLLM returned no log-probs for the generated token: was logprobs=k set?")
    head_ids, head_lp, head_target = positions_to_arrays(prompt, 1, window[1:seq_len], k)
    last_ids, last_lp, last_target = positions_to_arrays(completion.logprobs, 0, window[seq_len:], k)
    if k > 1 and not np.isfinite(last_lp[0, 1]):
        raise EngineError(
            "vLLM masked the logits before taking log-probs (the top-k after the forced token are -inf): "
            "run it with logprobs_mode='raw_logprobs' (vLLM >= 0.10.2)"
        )
    return (
        np.concatenate([head_ids, last_ids]),
        np.concatenate([head_lp, last_lp]),
        np.concatenate([head_target, last_target]),
    )


def positions_to_arrays(logprobs: Any, first: int, actual: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k ids, log-probs and the actual token's log-prob for positions `first`, `first + 1`, ..."""
    if hasattr(logprobs, "start_indices"):
        return _flat_to_arrays(logprobs, first, actual, k)
    return _dicts_to_arrays(logprobs[first : first + len(actual)], actual, k)


def _flat_to_arrays(flat: Any, first: int, actual: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(actual)
    starts = np.asarray(flat.start_indices[first : first + n])
    ends = np.asarray(flat.end_indices[first : first + n])
    if n and (np.any(ends - starts != k + 1) or np.any(starts[1:] != ends[:-1])):
        raise EngineError(f"vLLM flat log-probs do not hold k + 1 = {k + 1} contiguous entries per position: was k = {k} requested?")
    lo, hi = (int(starts[0]), int(ends[-1])) if n else (0, 0)
    token_ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(n, k + 1)
    values = np.asarray(flat.logprobs[lo:hi], dtype=np.float32).reshape(n, k + 1)
    _check_actual(token_ids[:, 0], actual)
    return token_ids[:, 1:].astype(np.int32), values[:, 1:], values[:, 0]


def _dicts_to_arrays(positions: Sequence[Any], actual: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(actual)
    ids = np.empty((n, k), dtype=np.int32)
    values = np.empty((n, k), dtype=np.float32)
    target = np.empty(n, dtype=np.float32)
    for t, (position, token) in enumerate(zip(positions, actual.tolist())):
        if position is None or token not in position or len(position) not in (k, k + 1):
            size = "None" if position is None else f"{len(position)} entries"
            raise EngineError(f"vLLM log-probs at a position hold {size}, expected k or k + 1 = {k + 1} including token {token}")
        target[t] = position[token].logprob
        # k + 1 keys: the actual token came first and is outside the top-k; k keys: it is inside
        entries = list(position.items())[1:] if len(position) == k + 1 else list(position.items())
        entries.sort(key=lambda item: item[1].rank)
        ids[t] = [token_id for token_id, _ in entries]
        values[t] = [entry.logprob for _, entry in entries]
    return ids, values, target


def _check_actual(returned: np.ndarray, actual: np.ndarray) -> None:
    mismatch = np.flatnonzero(returned != actual)
    if mismatch.size:
        t = int(mismatch[0])
        raise EngineError(f"vLLM's log-probs belong to token {int(returned[t])} where the window holds {int(actual[t])}: outputs out of order?")
