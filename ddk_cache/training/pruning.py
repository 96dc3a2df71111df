"""Depth pruning: a student made from the teacher by keeping some of its decoder layers.

Why: DDK distils into *pretrained* students, which already model every domain; a student made by
dropping layers of the teacher (Minitron, ShortGPT) is the cheapest such student to get, and it shares
the teacher's tokenizer by construction. Which layers to keep:

- `even`: N layers evenly spaced over the depth, first and last included (a baseline needing no data);
- `block-influence`: ShortGPT's Block Influence (Men et al. 2024), BI_i = 1 - E_t[cos(x_i, x_{i+1})], the
  expected cosine between a layer's input and output hidden states over the tokens of real windows. A
  layer that barely turns its input has low BI and is dropped first; the N layers of highest BI are kept,
  in their original order. Gromov et al. (2024) measure the same angular change over blocks of layers and
  reach the same conclusion: deep layers other than the last are the most redundant.

The pruned model keeps the teacher's embeddings, final norm and LM head; a short healing run (distill with
uniform KD) recovers most of the loss before experiments start (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ddk_cache.choices import Criterion, values
from ddk_cache.errors import DDKCacheError

CRITERIA = values(Criterion)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers: the one whose blocks are the model's `_no_split_modules` class."""
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and type(module[0]).__name__ in block_names:
            return module
    raise DDKCacheError(f"cannot find the decoder layers of {type(model).__name__} (no ModuleList of {sorted(block_names) or 'blocks'}): "
                        "prune-student handles decoder-only transformers (Llama, Mistral, Qwen, SmolLM ...)")


def even_layers(total: int, keep: int) -> list[int]:
    """`keep` indices evenly spaced over `total` layers, first and last included."""
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, keep)}) if keep > 1 else [0]


@torch.inference_mode()
def block_influence(model: torch.nn.Module, windows: np.ndarray, batch_size: int = 4) -> list[float]:
    """ShortGPT's BI per decoder layer, averaged over every position of `windows` (int `[n, L]`)."""
    total = len(decoder_layers(model))
    sums, count = torch.zeros(total, dtype=torch.float64), 0
    model.eval()
    for start in range(0, len(windows), batch_size):
        batch = torch.as_tensor(windows[start : start + batch_size], dtype=torch.long, device=next(model.parameters()).device)
        hidden = model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states  # embeddings + one per layer
        for i in range(total - 1):  # hidden[i] enters layer i, hidden[i + 1] leaves it (the last one is after the final norm)
            cos = torch.nn.functional.cosine_similarity(hidden[i].float(), hidden[i + 1].float(), dim=-1)
            sums[i] += (1 - cos).double().sum().cpu()
        count += batch.numel()
    scores = (sums / max(count, 1)).tolist()
    scores[-1] = float("inf")  # the last layer's output is only seen after the final norm: never drop it (ShortGPT keeps it too)
    return scores


def influence_layers(scores: list[float], keep: int) -> list[int]:
    """The `keep` layers of highest Block Influence, in their original order."""
    return sorted(int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:keep])


def prune(model: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    """Keep only the decoder layers `keep` (in place); the config and each layer's index follow."""
    layers = decoder_layers(model)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):  # attention modules index their KV-cache slot by layer
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    parent = _parent_of(model, layers)
    for name, child in parent.named_children():
        if child is layers:
            setattr(parent, name, kept)
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        config.layer_types = [layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    return model


def _parent_of(model: torch.nn.Module, target: torch.nn.Module) -> Any:
    for module in model.modules():
        if any(child is target for child in module.children()):
            return module
    raise DDKCacheError("cannot find where the decoder layers hang in the model")
