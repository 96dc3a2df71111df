"""The student answers prompts: sampled responses as fixed-length windows, with the response mask and the
student's own (behaviour) log-prob of every sampled token. What `ddk-cache rollout` stores for MiniLLM.

Why sampling with every warper off (temperature 1, top-k 0, top-p 1, no repetition penalty, whatever the
model's generation_config says): MiniLLM's gradient is the reverse KL of the student's own distribution,
so the samples must come from exactly q. Why the behaviour log-probs come from a separate forward pass
over the finished windows rather than from generate's scores: the update computes log q_theta with that
same teacher-forced pass, so the importance ratio q_theta / q_old is 1 (up to float rounding) before the
first step, as it must be; generate's incremental, left-padded computation differs by more than rounding.

A window is `[prompt | response | padding]` of `max_prompt_tokens + max_new_tokens + 1` tokens: the prompt's
last `max_prompt_tokens` tokens (tokenized without special tokens, as packing does), the response up to and
including the end-of-sequence token (or `max_new_tokens` tokens), then end-of-sequence tokens as padding.
Right padding needs no attention mask in a causal model: positions after the response see it, never the reverse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ddk_cache.lm_head import hidden_states, map_rows
from ddk_cache.minillm.prompts import Prompt


@dataclass
class Rollouts:
    """`tokens` `[n, L + 1]` int32; `response_mask` `[n, L]` uint8 (position t predicts a response token);
    `behaviour_logprobs` `[n, L]` float32 (log q of token t + 1; 0 where the mask is 0); `sampling_logprobs` the
    same for the distribution that drew the token, where it was not the student alone (`mixed_sampling.py`)."""

    tokens: np.ndarray
    response_mask: np.ndarray
    behaviour_logprobs: np.ndarray
    sampling_logprobs: np.ndarray | None = None

    @property
    def response_lengths(self) -> np.ndarray:
        return self.response_mask.sum(-1)


def sample_rollouts(model, tokenizer, prompts: list[Prompt], max_prompt_tokens: int, max_new_tokens: int, seed: int,
                    batch_size: int = 8, progress: Callable[[int], None] | None = None,
                    generate: "Callable[[list[list[int]]], list[list[int]]] | None" = None) -> Rollouts:
    """One response per prompt; `generate` maps prompt ids to response ids (default: HF `generate` on `model`, batches of
    `batch_size`, each seeded from `seed` and its index; `vllm_rollouts.py` gives vLLM's). The behaviour log-probs
    always come from `model`'s teacher-forced pass, whichever generator sampled."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the student's tokenizer has no end-of-sequence token: responses would never end")
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    if generate is None:
        responses = hf_generate(model, tokenizer, prompt_ids, max_new_tokens, seed, batch_size, progress=progress)
    else:
        responses = generate(prompt_ids)
        if progress is not None:
            progress(len(prompts))
    return assemble(model, prompt_ids, responses, eos, max_prompt_tokens + max_new_tokens, batch_size)


def encode_prompts(tokenizer, prompts: list[Prompt], max_prompt_tokens: int) -> list[list[int]]:
    """Each prompt's last `max_prompt_tokens` token ids, without special tokens (as packing tokenizes); never empty."""
    return [tokenizer(p.text, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] or [tokenizer.eos_token_id] for p in prompts]


def hf_generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, seed: int, batch_size: int, greedy: bool = False,
                progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Responses from transformers' `generate`, left-padded batches, every warper off (see the module docstring)."""
    from transformers import GenerationConfig  # heavy: transformers loads only when a model or tokenizer does

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # top_k=0 is "no top-k filter" (transformers warns it is "not valid" and builds no warper); None would take the model's default
    config = GenerationConfig(do_sample=not greedy, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                              max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
    device = next(model.parameters()).device
    model.eval()
    responses = []
    for first in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[first : first + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        torch.manual_seed(int(np.random.SeedSequence([seed, first]).generate_state(1)[0]))
        with torch.no_grad():
            responses += model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)[:, width:].tolist()
        if progress is not None:
            progress(len(batch))
    return responses


def assemble(model, prompt_ids: list[list[int]], responses: list[list[int]], eos: int, length: int, batch_size: int) -> Rollouts:
    """Windows `[prompt | response up to its end-of-sequence | end-of-sequence padding]`, the mask, the behaviour log-probs."""
    windows = np.full((len(prompt_ids), length + 1), eos, dtype=np.int32)
    mask = np.zeros((len(prompt_ids), length), dtype=np.uint8)
    for row, (ids, response) in enumerate(zip(prompt_ids, responses)):
        if eos in response:
            response = response[: response.index(eos) + 1]
        response = response[: length - len(ids)]
        windows[row, : len(ids) + len(response)] = ids + response
        mask[row, len(ids) - 1 : len(ids) - 1 + len(response)] = 1
    behaviour = sequence_logprobs(model, windows, batch_size) * mask
    return Rollouts(windows, mask, behaviour.astype(np.float32))


def reference_rollouts(model, tokenizer, prompts: list[Prompt], max_prompt_tokens: int, max_new_tokens: int,
                       batch_size: int = 8) -> Rollouts:
    """The references as the responses, in the same windows (what SFT and word-level KD train on): the reference
    text after the prompt (a space between them unless the prompt ends in whitespace), then end-of-sequence,
    cut at `max_new_tokens`. The behaviour log-probs are the model's own, for a like-for-like record."""
    eos = tokenizer.eos_token_id
    if any(prompt.reference is None for prompt in prompts):
        raise ValueError("reference responses need a 'reference_field' in the prompt manifest")
    prompt_ids, responses = encode_prompts(tokenizer, prompts, max_prompt_tokens), []
    for prompt in prompts:
        separator = "" if prompt.text[-1:].isspace() else " "
        responses.append((tokenizer(separator + prompt.reference, add_special_tokens=False)["input_ids"] + [eos])[:max_new_tokens])
    return assemble(model, prompt_ids, responses, eos, max_prompt_tokens + max_new_tokens, batch_size)


def sequence_logprobs(model, windows: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """log q(token t + 1 | tokens <= t) for every position of every window, teacher-forced, `[n, L]` float32.

    The head is applied a token chunk at a time (`lm_head.map_rows`): no `[tokens x vocabulary]` logits."""
    device = next(model.parameters()).device
    out = np.zeros((windows.shape[0], windows.shape[1] - 1), dtype=np.float32)
    with torch.no_grad():
        for first in range(0, len(windows), batch_size):
            tokens = torch.as_tensor(windows[first : first + batch_size], device=device).long()
            hidden, head = hidden_states(model, tokens[:, :-1])
            following = tokens[:, 1:].reshape(-1, 1)

            def picked_logprobs(logits: torch.Tensor, rows: slice) -> tuple[torch.Tensor]:
                return (logits.gather(1, following[rows])[:, 0] - torch.logsumexp(logits, -1),)

            picked = torch.cat([part[0] for part in map_rows(hidden.flatten(0, 1), head, picked_logprobs)])
            out[first : first + len(tokens)] = picked.reshape(len(tokens), -1).cpu().numpy()
    return out
