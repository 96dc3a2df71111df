"""Teacher-mixed sampling (MiniLLM's recipe): every response token drawn from (1 - a) q + a p.

MiniLLM samples its training responses from a mixture of the student q and the teacher p (a = 0.2 in the
paper): early in training the student's own samples wander into text the teacher finds unlikely, and the
reverse KL can then fall by the student spreading its mass there (benchmarks/RESULTS.md, "MiniLLM rounds").
Mixing keeps the samples near what the teacher would write, and the update stays unbiased through
importance weights q_theta / mix (`objective.py`), so the mixture's probability of every sampled token
must be stored next to the student's.

Both models run on the node that samples (an inference node, beside the teacher), each with its own KV
cache: a prompt batch is left-padded, both models take it once, then each step feeds both the token drawn
from the mixture of their next-token distributions. vLLM cannot mix two models' distributions within one
request, so `rollout --teacher` samples with transformers only.

Why the stored log-probs come from teacher-forced passes over the finished windows rather than from the
incremental ones used for sampling: the update recomputes log q_theta with that same teacher-forced pass,
so ratios start at q_old / mix exactly (the reasoning of `rollouts.py`); the incremental values agree with
them to float rounding (tests/test_mixed_sampling.py checks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ddk_cache.minillm.prompts import Prompt
from ddk_cache.minillm.rollouts import Rollouts, assemble, encode_prompts, sequence_logprobs


def mixed_rollouts(student, teacher, tokenizer, prompts: list[Prompt], max_prompt_tokens: int, max_new_tokens: int, alpha: float,
                   seed: int, batch_size: int = 8, progress: Callable[[int], None] | None = None) -> Rollouts:
    """One response per prompt drawn from the mixture; `sampling_logprobs` = log((1 - a) q_old(y_t) + a p(y_t))."""
    eos = tokenizer.eos_token_id
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    responses, _ = mixed_generate(student, teacher, prompt_ids, max_new_tokens, alpha, seed, batch_size, eos, progress=progress)
    rollouts = assemble(student, prompt_ids, responses, eos, max_prompt_tokens + max_new_tokens, batch_size)
    teacher_logprobs = sequence_logprobs(teacher, rollouts.tokens, batch_size)
    rollouts.sampling_logprobs = (mixture_logprobs(rollouts.behaviour_logprobs, teacher_logprobs, alpha) * rollouts.response_mask).astype(np.float32)
    return rollouts


def mixture_logprobs(student_logprobs: np.ndarray, teacher_logprobs: np.ndarray, alpha: float) -> np.ndarray:
    """log((1 - a) exp(log q) + a exp(log p)), elementwise, in log space (a = 1: the teacher's alone)."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log1p(-alpha) + student_logprobs.astype(np.float64), math.log(alpha) + teacher_logprobs.astype(np.float64))


def mixed_generate(student, teacher, prompt_ids: list[list[int]], max_new_tokens: int, alpha: float, seed: int, batch_size: int, eos: int,
                   progress: Callable[[int], None] | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Responses (ending at `eos` or after `max_new_tokens`), and for each token the log of its mixture probability as
    the incremental passes computed it (what sampling used; the stores keep the teacher-forced values)."""
    device = next(student.parameters()).device
    student.eval()
    teacher.eval()
    responses, logprobs = [], []
    for first in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[first : first + batch_size]
        generator = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, first]).generate_state(1)[0]))
        tokens, picked = _sample_batch(student, teacher, batch, max_new_tokens, alpha, generator, eos, device)
        for row, ids in enumerate(tokens.tolist()):
            end = ids.index(eos) + 1 if eos in ids else len(ids)
            responses.append(ids[:end])
            logprobs.append(picked[row, :end].tolist())
        if progress is not None:
            progress(len(batch))
    return responses, logprobs


def _sample_batch(student, teacher, batch: list[list[int]], max_new_tokens: int, alpha: float, generator: torch.Generator, eos: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, max_new_tokens]` drawn tokens (eos after a row's end) and the log mixture probability of each."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([[eos] * (width - len(ids)) + ids for ids in batch], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    finished = torch.zeros(len(batch), dtype=torch.bool, device=device)
    drawn, picked = [], []
    caches: list = [None, None]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = []
            for index, model in enumerate((student, teacher)):
                out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=caches[index],
                            use_cache=True, logits_to_keep=1)
                caches[index] = out.past_key_values
                logits.append(out.logits[:, -1].float())
            mix = _mixture(*logits, alpha)
            token = torch.multinomial(mix, 1, generator=generator)[:, 0]
            picked.append(torch.log(mix.gather(1, token[:, None])[:, 0]))
            token = torch.where(finished, torch.full_like(token, eos), token)
            drawn.append(token)
            finished |= token == eos
            if bool(finished.all()):
                break
            input_ids, positions = token[:, None], positions[:, -1:] + 1
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
    return torch.stack(drawn, dim=1).cpu(), torch.stack(picked, dim=1).cpu()


def _mixture(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - a) softmax(student) + a softmax(teacher) over the larger of the two vocabularies (ids one model lacks: 0 there)."""
    q, p = torch.softmax(student_logits, -1), torch.softmax(teacher_logits, -1)
    vocab = max(q.shape[-1], p.shape[-1])
    q, p = (torch.nn.functional.pad(x, (0, vocab - x.shape[-1])) for x in (q, p))
    return (1 - alpha) * q + alpha * p
