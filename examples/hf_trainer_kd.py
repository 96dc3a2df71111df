"""Distil from a ddk-cache store with the Hugging Face `Trainer`: the user code is `KDTrainer` and `train`.

The cache gives each window's tokens and the teacher's sparse next-token distribution; the
student's loss is DDK's, CE on the next token + gamma * KD on the cached entries. No teacher is
loaded. Run (any causal LM with the cache's tokenizer as the student):

    python examples/hf_trainer_kd.py --store cache.zarr --student ./student --out ./run --steps 200
"""

from __future__ import annotations

import argparse

import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import ddk_cache


class KDTrainer(Trainer):
    """CE on the next token plus `gamma` x KD against the cached teacher entries."""

    def __init__(self, *args, gamma: float = 0.2, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gamma, self.kd_history = gamma, []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["input_ids"]).logits  # labels are already shifted: not passed to the model
        ce = F.cross_entropy(logits.flatten(0, 1).float(), inputs["labels"].flatten())
        kd = ddk_cache.kd_loss(logits, inputs, divergence="forward_kl", tail="rest", temperature=1.0)
        self.kd_history.append(kd.item())
        loss = ce + self.gamma * kd
        return (loss, {"logits": logits}) if return_outputs else loss


def train(store: str, student: str, out: str, steps: int, batch_size: int = 4, lr: float = 3e-4, gamma: float = 0.2) -> KDTrainer:
    mixture = ddk_cache.CacheMixture(store, weights="manifest", seed=0)  # or weights={"code": 2, "math": 1}, or CacheDataset(store, domain)
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
                             logging_steps=max(1, steps // 10), save_strategy="no", report_to=[], dataloader_num_workers=0,
                             remove_unused_columns=False)  # keep the teacher_* columns: compute_loss needs them
    trainer = KDTrainer(model=AutoModelForCausalLM.from_pretrained(student), args=args, train_dataset=mixture,
                        data_collator=ddk_cache.collate, gamma=gamma)
    trainer.train()
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--student", required=True, help="a folder or hub id that from_pretrained loads")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    cli = parser.parse_args()
    train(cli.store, cli.student, cli.out, cli.steps, cli.batch_size, cli.lr)
