"""The embedded default engine: Hugging Face transformers, runs anywhere (CPU included).

Memory: neither the logits nor their log_softmax are materialised for a whole batch. The forward
runs with the head recorded, not applied (`lm_head.hidden_states`), and the head is applied to row
blocks of at most `LOGPROB_BLOCK_ELEMENTS` logits, each captured (top-k, target, samples) and freed
before the next: a 256k-vocabulary teacher's batch costs `[tokens x d]` hidden states, not
`[tokens x V]` logits in the model's dtype plus a float32 block.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ddk_cache.devices import resolve_device
from ddk_cache.engines.base import ProgressCallback, TeacherEngine, TopKResult
from ddk_cache.errors import EngineError, first_line
from ddk_cache.hub import require_loadable
from ddk_cache.lm_head import LMHead, hidden_states, row_pieces

LOGPROB_BLOCK_ELEMENTS = 1 << 26  # 256 MiB of float32 per log_softmax block
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        from transformers import AutoModelForCausalLM  # heavy: transformers loads only when a model or tokenizer does
        from transformers.utils import logging as hf_logging  # heavy: transformers loads only when a model or tokenizer does

        hf_logging.disable_progress_bar()

        if batch_size <= 0:
            raise EngineError(f"batch size must be positive, got {batch_size}")
        self.device = resolve_device(device)  # checked: an unknown name, or cuda without a GPU, is one line
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        require_loadable(teacher, "teacher", revision)
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
        import transformers  # heavy: transformers loads only when a model or tokenizer does

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
        self, windows: np.ndarray, k: int, progress: ProgressCallback | None = None, draws: int | None = None, seed: int = 0,
        tail: bool = False,
    ) -> TopKResult:
        """Batches are pipelined on a GPU: batch i + 1 is queued before batch i's results are copied back
        (asynchronously, into pinned memory), so the device never waits for the host between batches."""
        vocab = int(self.model.config.vocab_size)
        if not 0 < k <= vocab:
            raise EngineError(f"k={k} must be between 1 and the teacher's vocabulary size {vocab}")
        if tail and k >= vocab:
            raise EngineError(f"a head of k={k} leaves no tail to draw from in a {vocab}-token vocabulary: lower --k")
        generator = None
        if draws is not None:  # CPU generator: the same draws on any device, batch size or process
            generator = torch.Generator().manual_seed(seed)
        parts: list[TopKResult] = []
        in_flight: _HostCopy | None = None
        for start in range(0, len(windows), self.batch_size):
            batch = torch.as_tensor(windows[start : start + self.batch_size], dtype=torch.long).to(self.device)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            hidden, head = hidden_states(self.model, inputs)
            copy = _HostCopy(topk_from_hidden(hidden, head, targets, k, draws, generator, tail), int(inputs.numel()))
            del hidden
            if in_flight is not None:
                parts.append(in_flight.wait(progress))
            in_flight = copy
        if in_flight is not None:
            parts.append(in_flight.wait(progress))
        return TopKResult.concatenate(parts)


class _HostCopy:
    """One batch's results on their way to host memory: non-blocking copies, waited for later."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], tokens: int) -> None:
        self.tokens = tokens
        self.tensors = [None if t is None else t.to("cpu", non_blocking=True) for t in tensors]
        self.event = None
        if any(t is not None and t.is_pinned() for t in self.tensors):  # a device-to-host copy is in flight
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self, progress: ProgressCallback | None) -> TopKResult:
        if self.event is not None:
            self.event.synchronize()
        if progress is not None:
            progress(self.tokens)
        ids, values, target_values, samples = (None if t is None else t.numpy() for t in self.tensors)
        return TopKResult(ids, values, target_values, samples)


def topk_from_hidden(
    hidden: torch.Tensor, head: LMHead, targets: torch.Tensor, k: int, draws: int | None = None, generator: torch.Generator | None = None,
    tail: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`topk_from_logits` of `head.logits(hidden)`, the head applied a row block at a time: the same results, with one
    block of logits alive instead of `[B, L, V]`. `hidden` `[B, L, d]`."""
    b, length, _ = hidden.shape
    flat = hidden.reshape(b * length, -1)
    rows = max(1, LOGPROB_BLOCK_ELEMENTS // head.vocab)
    blocks = [_capture_block(head.logits(flat[piece]), targets.reshape(-1, 1)[piece], k, draws, generator, tail)
              for piece in row_pieces(flat.shape[0], rows)]
    return _joined(blocks, b, length, k, draws)


def topk_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, k: int, draws: int | None = None, generator: torch.Generator | None = None,
    tail: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k of float32 log_softmax(logits) and the targets' log-probs, in row blocks.

    `logits` is `[B, L, V]` in any dtype, `targets` `[B, L]`; float32 logits are consumed (overwritten).
    Returns int32 ids `[B, L, k]`, float32 log-probs `[B, L, k]` (descending), float32 target log-probs
    `[B, L]` and, with `draws`, int32 samples `[B, L, draws]` drawn with replacement (inverse CDF of
    uniforms from the CPU `generator`, so the draws do not depend on the device or the batching); with
    `tail`, drawn from the distribution restricted to the ids outside the top-k (headtail capture).
    """
    b, length, vocab = logits.shape
    flat_logits = logits.reshape(b * length, vocab)
    rows = max(1, LOGPROB_BLOCK_ELEMENTS // vocab)
    blocks = [_capture_block(flat_logits[piece], targets.reshape(-1, 1)[piece], k, draws, generator, tail)
              for piece in row_pieces(flat_logits.shape[0], rows)]
    return _joined(blocks, b, length, k, draws)


def _capture_block(block: torch.Tensor, targets: torch.Tensor, k: int, draws: int | None, generator: torch.Generator | None,
                   tail: bool = False) -> tuple:
    """One row block's `(ids, log-probs, target log-probs, samples)`; float32 blocks are consumed (overwritten).

    Why not log_softmax: the top-k and the target are read off the logits, and only the normaliser
    log(sum(exp)) is needed on top; computing it in place (subtract the row maximum, the top-1 logit,
    exponentiate, sum) writes no second `[rows, V]` tensor, which on CPU is most of the cost after
    the forward (page faults of a fresh 200 MiB buffer per block). Sampling needs every log-prob and
    keeps log_softmax.
    """
    if draws is not None:
        logprobs = torch.log_softmax(block.float(), dim=-1)
        top = logprobs.topk(k, dim=-1, sorted=True)
        target = logprobs.gather(-1, targets).squeeze(-1)
        if tail:  # the head can never be drawn: its ids get probability 0 (the tail's total is then rest's mass)
            logprobs.scatter_(-1, top.indices, -math.inf)
        return top.indices.to(torch.int32), top.values, target, sample_from_logprobs(logprobs, draws, generator)
    # top-k in the logits' own dtype: float(bf16) is exact and order-preserving, so the entries are
    # the same as in float32, and the selection reads half the bytes
    top = block.topk(k, dim=-1, sorted=True)
    row_max = top.values[:, :1].float()
    target = block.gather(-1, targets).squeeze(-1).float()
    log_normaliser = row_max + block.float().sub_(row_max).exp_().sum(-1, keepdim=True).log_()
    return top.indices.to(torch.int32), top.values.float() - log_normaliser, target - log_normaliser.squeeze(-1), None


def _joined(blocks: list[tuple], b: int, length: int, k: int, draws: int | None) -> tuple:
    ids, values, target_values, samples = zip(*blocks)
    return (torch.cat(ids).reshape(b, length, k), torch.cat(values).reshape(b, length, k), torch.cat(target_values).reshape(b, length),
            torch.cat(samples).reshape(b, length, draws) if draws is not None else None)


def sample_from_logprobs(logprobs: torch.Tensor, draws: int, generator: torch.Generator | None) -> torch.Tensor:
    """`draws` ids per row of `[N, V]` log-probs, with replacement, by inverse CDF (float64 cumsum).

    Rows need not sum to 1 (headtail's tail is a row with its head at -inf). An id of probability 0 can
    only come out of a uniform of exactly 0 (odds 2^-53 a draw); it becomes the row's most likely id, so
    a tail draw is never a head id."""
    cdf = logprobs.double().exp().cumsum(-1)
    uniforms = torch.rand(logprobs.shape[0], draws, generator=generator, dtype=torch.float64).to(cdf.device)
    ids = torch.searchsorted(cdf, uniforms * cdf[:, -1:]).clamp_(max=logprobs.shape[-1] - 1)  # scaled by the total: never past V
    impossible = logprobs.gather(-1, ids) == -math.inf
    return torch.where(impossible, logprobs.argmax(-1, keepdim=True), ids).to(torch.int32)
