"""`ddk-cache eval-responses`: how good a student's answers are, MiniLLM's way, on the held-out prompts.

ROUGE-L of the student's greedy answers against the manifest's references, and (given a scored rollout
store of this student) the reverse KL estimate from the teacher's scores of its samples. The measures
themselves are `minillm/response_quality.py`; this stage loads what they need and checks the settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ddk_cache.devices import resolve_device
from ddk_cache.minillm.prompts import apply_chat_template, load_prompt_manifest, load_prompts
from ddk_cache.minillm.response_quality import evaluate_responses, reverse_kl_estimate
from ddk_cache.ranges import AT_LEAST_ONE, check_ranges
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.student import load_student


@dataclass(frozen=True)
class EvalResponsesConfig:
    student: str
    prompts: Path
    scored: str | None = None  # a scored rollout store of this student: adds its reverse KL estimate
    batch_size: int = 8
    device: str = "auto"
    storage_options: dict[str, Any] | None = None


@dataclass(frozen=True)
class ResponseScores:
    student: str
    rouge_l: float
    responses: int
    mean_response_tokens: float
    reverse_kl: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_eval_responses(config: EvalResponsesConfig) -> ResponseScores:
    check_ranges({"batch_size": config.batch_size}, {"batch_size": AT_LEAST_ONE})
    manifest = load_prompt_manifest(config.prompts)
    scored = CacheReader(config.scored, storage_options=config.storage_options) if config.scored else None
    reverse_kl = reverse_kl_estimate(scored) if scored is not None else None
    # a fresh random initialisation: answers (and their ROUGE-L) that change on every run
    model, tokenizer = load_student(config.student, None, needs_weights="evaluate a saved student (distill writes one)")
    model.to(resolve_device(config.device))
    prompts = apply_chat_template(manifest, load_prompts(manifest, "test"), tokenizer, f"the student {config.student}")
    result = evaluate_responses(model, tokenizer, prompts, manifest.max_prompt_tokens, manifest.max_new_tokens,
                                config.batch_size)
    return ResponseScores(config.student, result.rouge_l, result.responses, result.mean_response_tokens, reverse_kl)
