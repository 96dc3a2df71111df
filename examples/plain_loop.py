"""Distil from a ddk-cache store in a plain PyTorch loop: a DataLoader, a student, CE + gamma * KD.

    python examples/plain_loop.py --store cache.zarr --student ./student --steps 200
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
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
        logits = model(input_ids=batch["input_ids"]).logits
        ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        kd = ddk_cache.kd_loss(logits, batch)  # forward KL on the cached entries + the rest bucket, T = 1
        (ce + gamma * kd).backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(kd.item())
        print(f"step {step}: ce {ce.item():.3f} kd {kd.item():.3f}")
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
