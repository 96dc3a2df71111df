"""A causal LM's head apart from its body: the final hidden states, and the head's logits a few rows at a time.

Why: a Hugging Face `*ForCausalLM` forward ends with `logits = lm_head(hidden)`: `[tokens x vocabulary]`
values, 16-34 GB in float32 for an 8 x 4,096-token batch at V = 128k-262k, where every consumer here (the
sparse KD losses, evaluation, the teacher's capture) keeps O(tokens x W) of them. `hidden_states` runs the
model's own forward (so DDP's and FSDP2's hooks run as in training) with the head's call replaced for the
length of the call: it records its input and returns an empty `[..., 0]` tensor, so the model's own
post-processing (Gemma 2's soft-capping, Cohere's and Granite's scaling) runs on nothing. `LMHead` then
applies the head, and that post-processing, to any rows: a chunk of tokens with the whole vocabulary.

Token chunks with every id, not vocabulary chunks: every consumer (log_softmax, top-k, top-p, sampling) then
works on whole rows exactly as on the full logits, so chunking changes the memory and never the numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ddk_cache.errors import SettingError

CHUNK_ELEMENTS = 1 << 24  # logits per token chunk: [rows x V] float32 of 64 MiB
MIN_ROWS = 128  # below this, the head's [V, d] gradient, read and written once per chunk, costs more than the matmuls


def rows_per_chunk(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Tokens per chunk: about `elements` logits, and at least MIN_ROWS tokens (benchmarks/bench_fused_loss.py: at
    V = 128k, 32-row chunks take 1.3x the dense time, 128-row chunks 0.93x)."""
    return max(MIN_ROWS, elements // max(1, vocab))


def row_pieces(n: int, rows: int) -> Iterator[slice]:
    """The token chunks of `n` rows, `rows` at a time (the last may be shorter): every chunked loop here walks these."""
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


@dataclass(frozen=True)
class LMHead:
    """`transform(hidden @ weight.T + bias)`: the head's weight `[V, d]` (tied or not), bias `[V]`, and what the model
    does to its logits afterwards (`softcap`: cap * tanh(z / cap); `scale`: z * scale)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    scale: float = 1.0

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def linear(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden @ weight.T + bias` in float32, computed in the hidden states' dtype (bf16 stays bf16 on GPU)."""
        weight = self.weight if self.weight.dtype == hidden.dtype else self.weight.to(hidden.dtype)
        z = hidden @ weight.t()
        if self.bias is not None:
            z = z + self.bias.to(z.dtype)
        return z.float()

    def finish(self, z: torch.Tensor) -> torch.Tensor:
        """The model's post-processing of the linear logits (differentiable: the fused losses take its gradient)."""
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of a few rows `[n, V]`, as the model's forward would give them."""
        return self.finish(self.linear(hidden))

    @classmethod
    def of(cls, model: torch.nn.Module) -> "LMHead":
        """The head of a Hugging Face causal LM (DDP's wrapper looked through), with its config's logit post-processing."""
        model = getattr(model, "module", model)
        head = model.get_output_embeddings()
        if hasattr(head, "base_layer"):  # peft's LoRA (or another adapter) on the head: its weight alone is not the head
            raise SettingError("the fused loss applies the head's weight itself, and the student has an adapter on its head "
                               "(lm_head in --lora-targets): leave the head out of the adapted modules, or use --loss-impl dense")
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        softcap = getattr(text, "final_logit_softcapping", None)
        scale = float(getattr(text, "logit_scale", None) or 1.0)  # Cohere multiplies
        if getattr(text, "logits_scaling", None):  # Granite divides
            scale /= float(text.logits_scaling)
        return cls(head.weight, getattr(head, "bias", None), float(softcap) if softcap else None, scale)


@contextmanager
def _head_recorder(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    head = getattr(model, "module", model).get_output_embeddings()
    recorded: list[torch.Tensor] = []

    def record(hidden: torch.Tensor) -> torch.Tensor:
        recorded.append(hidden)
        return hidden[..., :0]  # empty logits: the model's own post-processing runs on nothing

    head.forward = record
    try:
        yield recorded
    finally:
        del head.forward  # the class's forward again


def hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, LMHead]:
    """The final hidden states `[..., d]` (what the head would take) and the head, from the model's own forward.

    `model` may be a DDP wrapper or an FSDP2 module: its forward is what runs. Read the head after the forward:
    under FSDP2 the root's parameters (the head among them) are gathered by it and stay so until the backward.
    """
    with _head_recorder(model) as recorded:
        model(input_ids=input_ids, use_cache=False, **kwargs)
    if len(recorded) != 1:
        raise RuntimeError(f"{type(getattr(model, 'module', model)).__name__}'s forward called its output embeddings "
                           f"{len(recorded)} times: use the dense loss for this model")
    return recorded[0], LMHead.of(model)


def map_rows(hidden: torch.Tensor, head: LMHead, fn: Callable[[torch.Tensor, slice], tuple[torch.Tensor, ...]],
             rows: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """`fn(logits of rows i..j, slice(i, j))` for every token chunk of `hidden` `[N, d]`, without a gradient.

    What evaluation and the teacher's capture need: per-row results (a loss, a top-1 probability, top-k ids)
    with one chunk of logits alive at a time.
    """
    with torch.no_grad():
        return [fn(head.logits(hidden[piece]), piece) for piece in row_pieces(hidden.shape[0], rows or rows_per_chunk(head.vocab))]
