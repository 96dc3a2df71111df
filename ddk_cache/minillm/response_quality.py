"""How good a student's answers are: MiniLLM's two measures on held-out prompts.

- **ROUGE-L** of the student's greedy responses against the reference answers (F-measure x 100, the
  paper's metric), computed by Google's `rouge-score` package (the implementation HF `evaluate` wraps),
  with its default tokenizer and Porter stemming.
- **Reverse KL estimate**: for responses the student *sampled* and the teacher scored (the `valid` split
  of a scored rollout store), the mean over responses of the per-token log-ratio log q(y_t) - log p(y_t),
  with q the sampling student's behaviour log-prob. Its expectation is the per-token reverse KL
  KL(q || p) of the student that sampled; it is what MiniLLM minimises, so it is the honest measure of
  whether a round helped (ROUGE-L measures something the objective never sees).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ddk_cache.errors import DDKCacheError
from ddk_cache.minillm.objective import sequence_reverse_kl
from ddk_cache.minillm.prompts import Prompt
from ddk_cache.minillm.rollouts import encode_prompts, hf_generate
from ddk_cache.store.format import BEHAVIOUR_LOGPROBS, RESPONSE_MASK, TARGET_LOGPROBS
from ddk_cache.store.reader import CacheReader


@dataclass(frozen=True)
class ResponseEval:
    rouge_l: float  # mean ROUGE-L F-measure x 100
    responses: int
    mean_response_tokens: float


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure x 100 over pairs."""
    try:
        from rouge_score import rouge_scorer  # optional: rouge-score (the minillm extra)
    except ImportError:
        raise DDKCacheError("ROUGE-L needs the rouge-score package: pip install 'ddk-cache[minillm]'") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(reference, prediction)["rougeL"].fmeasure for prediction, reference in zip(predictions, references)]
    return 100.0 * float(np.mean(scores)) if scores else 0.0


def evaluate_responses(model, tokenizer, prompts: list[Prompt], max_prompt_tokens: int, max_new_tokens: int,
                       batch_size: int = 8) -> ResponseEval:
    """ROUGE-L of the greedy responses to `prompts` (which must carry references)."""
    if any(p.reference is None for p in prompts):
        raise DDKCacheError("ROUGE-L needs reference answers: set 'reference_field' in the prompt manifest")
    eos = tokenizer.eos_token_id
    # generation only: greedy answers need no behaviour log-probs, so no windows and no second forward pass
    answers = hf_generate(model, tokenizer, encode_prompts(tokenizer, prompts, max_prompt_tokens), max_new_tokens, seed=0,
                          batch_size=batch_size, greedy=True)
    answers = [ids[: ids.index(eos) + 1] if eos in ids else ids for ids in answers]
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]
    return ResponseEval(rouge_l(texts, [p.reference.strip() for p in prompts]), len(prompts), float(np.mean([len(ids) for ids in answers])))


def reverse_kl_estimate(reader: CacheReader, split: str = "valid") -> float:
    """Mean over a scored rollout store's responses of their per-token log q - log p (see the module docstring)."""
    if reader.header.rollout is None or not reader.header.scored:
        raise DDKCacheError(f"{reader.url} is not a scored rollout store: the reverse KL estimate needs the teacher's scores of "
                            "the student's samples")
    domain = reader.domains[0]
    values = reader.read_arrays(domain, split, (TARGET_LOGPROBS, BEHAVIOUR_LOGPROBS, RESPONSE_MASK))
    mask = torch.from_numpy(values[RESPONSE_MASK].astype(np.float64))
    per_sequence = sequence_reverse_kl(torch.from_numpy(values[TARGET_LOGPROBS].astype(np.float64)),
                                       torch.from_numpy(values[BEHAVIOUR_LOGPROBS].astype(np.float64)), mask)
    has = mask.sum(-1) > 0
    return float(per_sequence[has].mean()) if bool(has.any()) else float("nan")


def sample_entropy(reader: CacheReader, split: str = "valid") -> float:
    """The student's mean -log q over its own sampled responses: an estimate of its per-token entropy. With the teacher's
    CE on the same tokens it splits the reverse KL, KL(q || p) = CE_p(samples) - H(q) per token, which is how the entropy
    failure shows (`minillm` warns on it): the reverse KL falls while both the entropy and the teacher's CE rise."""
    domain = reader.domains[0]
    values = reader.read_arrays(domain, split, (BEHAVIOUR_LOGPROBS, RESPONSE_MASK))
    mask = values[RESPONSE_MASK] > 0
    return float(-values[BEHAVIOUR_LOGPROBS][mask].astype(np.float64).mean()) if mask.any() else float("nan")
