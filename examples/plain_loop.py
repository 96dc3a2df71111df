"""Distil from a ddk-cache store in a plain PyTorch loop: a DataLoader, a student, CE + gamma * KD.

The loss is the fused one: from the student's final hidden states and its head, a token chunk of logits at a
time, so a 128k-262k vocabulary never costs `[tokens x vocabulary]` logits (`ddk_cache.kd_loss` on the model's
logits gives the same KD term, the dense way).

    python examples/plain_loop.py --store cache.zarr --student ./student --steps 200
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

import ddk_cache


def train(store: str, student: str, steps: int, batch_size: int = 4, lr: float = 3e-4, gamma: float = 0.2) -> tuple[torch.nn.Module, list[float]]:
    """Returns the trained student and the KD term of every step."""
    cache = ddk_cache.open_store(store)
    print(f"{cache.url}: {', '.join(cache.domains)}; {cache.capture.mode} targets, windows of {cache.seq_len}")
    loader = DataLoader(ddk_cache.CacheMixture(cache, seed=0), batch_size=batch_size, collate_fn=ddk_cache.collate)
    model = AutoModelForCausalLM.from_pretrained(student)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    for step, batch in enumerate(itertools.islice(loader, steps)):
        hidden, head = ddk_cache.hidden_states(model, batch["input_ids"])  # the model's forward, its head not applied
        parts = ddk_cache.fused_kd_loss(hidden, head, batch, gamma=gamma)  # CE + forward KL on the entries + the rest bucket
        parts.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(parts.kd.item())
        print(f"step {step}: ce {parts.ce.item():.3f} kd {parts.kd.item():.3f}")
    return model, history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--student", required=True, help="a folder or hub id that from_pretrained loads")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    cli = parser.parse_args()
    train(cli.store, cli.student, cli.steps, cli.batch_size, cli.lr)
