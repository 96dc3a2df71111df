"""The embedded default engine: Hugging Face transformers, runs anywhere (CPU included).

Memory: the full-vocabulary log_softmax is never materialised for a whole batch; it is
computed over row blocks of at most `LOGPROB_BLOCK_ELEMENTS` floats, so a 128k vocabulary
at long sequence lengths does not multiply the logits' footprint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ddk_cache.engines.base import ProgressCallback, TeacherEngine, TopKResult
from ddk_cache.errors import EngineError, first_line

LOGPROB_BLOCK_ELEMENTS = 1 << 26  # 256 MiB of float32 per log_softmax block
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """bf16 on GPU (fast, the usual training dtype), float32 on CPU (bf16 matmuls are slow there)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise EngineError(f"unknown dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class HFTeacherEngine(TeacherEngine):
    name = "hf"
    supports_sampling = True

    def __init__(
        self,
        teacher: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        if batch_size <= 0:
            raise EngineError(f"batch size must be positive, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                teacher, dtype=self.dtype, revision=revision, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load teacher {teacher!r} as a causal LM: {first_line(exc)}") from None
        self.model.to(self.device).eval()

    @property
    def config(self) -> Any:
        return self.model.config

    def describe(self) -> dict[str, Any]:
        import transformers

        return {
            "name": self.name,
            "version": transformers.__version__,
            "torch_version": torch.__version__,
            "settings": {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."), "batch_size": self.batch_size},
        }

    def value_settings(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": str(self.dtype).removeprefix("torch.")}

    @torch.inference_mode()
    def score(
        self, windows: np.ndarray, k: int, progress: ProgressCallback | None = None, draws: int | None = None, seed: int = 0
    ) -> TopKResult:
        vocab = int(self.model.config.vocab_size)
        if not 0 < k <= vocab:
            raise EngineError(f"k={k} must be between 1 and the teacher's vocabulary size {vocab}")
        generator = None
        if draws is not None:  # CPU generator: the same draws on any device, batch size or process
            generator = torch.Generator().manual_seed(seed)
        parts = []
        for start in range(0, len(windows), self.batch_size):
            batch = torch.as_tensor(windows[start : start + self.batch_size], dtype=torch.long, device=self.device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            logits = self.model(input_ids=inputs, use_cache=False).logits
            topk_ids, topk_lp, target_lp, samples = topk_from_logits(logits, targets, k, draws, generator)
            parts.append(
                TopKResult(
                    topk_ids.cpu().numpy(),
                    topk_lp.cpu().numpy(),
                    target_lp.cpu().numpy(),
                    None if samples is None else samples.numpy(),
                )
            )
            if progress is not None:
                progress(int(inputs.numel()))
        return TopKResult.concatenate(parts)


def topk_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, k: int, draws: int | None = None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k of float32 log_softmax(logits) and the targets' log-probs, in row blocks.

    `logits` is `[B, L, V]` in any dtype, `targets` `[B, L]`. Returns int32 ids `[B, L, k]`,
    float32 log-probs `[B, L, k]` (descending), float32 target log-probs `[B, L]` and, with
    `draws`, int32 samples `[B, L, draws]` drawn with replacement (inverse CDF of uniforms from
    the CPU `generator`, so the draws do not depend on the device or the batching).
    """
    b, length, vocab = logits.shape
    flat_logits = logits.reshape(b * length, vocab)
    flat_targets = targets.reshape(b * length, 1)
    rows = max(1, LOGPROB_BLOCK_ELEMENTS // vocab)
    ids, values, target_values, samples = [], [], [], []
    for start in range(0, flat_logits.shape[0], rows):
        logprobs = torch.log_softmax(flat_logits[start : start + rows].float(), dim=-1)
        top = logprobs.topk(k, dim=-1, sorted=True)
        ids.append(top.indices.to(torch.int32))
        values.append(top.values)
        target_values.append(logprobs.gather(-1, flat_targets[start : start + rows]).squeeze(-1))
        if draws is not None:
            samples.append(sample_from_logprobs(logprobs, draws, generator).cpu())
    return (
        torch.cat(ids).reshape(b, length, k),
        torch.cat(values).reshape(b, length, k),
        torch.cat(target_values).reshape(b, length),
        torch.cat(samples).reshape(b, length, draws) if draws is not None else None,
    )


def sample_from_logprobs(logprobs: torch.Tensor, draws: int, generator: torch.Generator | None) -> torch.Tensor:
    """`draws` ids per row of `[N, V]` log-probs, with replacement, by inverse CDF (float64 cumsum)."""
    cdf = logprobs.double().exp().cumsum(-1)
    uniforms = torch.rand(logprobs.shape[0], draws, generator=generator, dtype=torch.float64).to(cdf.device)
    ids = torch.searchsorted(cdf, uniforms * cdf[:, -1:])  # scaled by the total: rounding never runs past V
    return ids.clamp_(max=logprobs.shape[-1] - 1).to(torch.int32)
