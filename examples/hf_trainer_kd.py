"""Distil from a ddk-cache store with the Hugging Face `Trainer`: `ddk_cache.KDTrainer` is the Trainer with DDK's loss.

The cache gives each window's tokens and the teacher's sparse next-token distribution; the
student's loss is DDK's, CE on the next token + gamma * KD on the cached entries. No teacher is
loaded. `KDTrainer` normalises the loss over each optimizer step's positions, so
`gradient_accumulation_steps` and the number of ranks change neither the loss nor the gradients.
Run (any causal LM with the cache's tokenizer as the student; on several GPUs under torchrun):

    python examples/hf_trainer_kd.py --store cache.zarr --student ./student --out ./run --steps 200
    torchrun --nproc-per-node 2 examples/hf_trainer_kd.py --store cache.zarr --student ./student --out ./run
    python examples/hf_trainer_kd.py ... --lora-rank 16     # LoRA adapters on the frozen student (pip install peft)
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, TrainingArguments

import ddk_cache


def train(store: str, student: str, out: str, steps: int, batch_size: int = 4, lr: float = 3e-4, gamma: float = 0.2,
          grad_accum: int = 1, lora_rank: int = 0) -> ddk_cache.KDTrainer:
    mixture = ddk_cache.CacheMixture(store, weights="manifest", seed=0)  # or weights={"code": 2, "math": 1}, or CacheDataset(store, domain)
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
                             gradient_accumulation_steps=grad_accum, logging_steps=max(1, steps // 10), save_strategy="no",
                             report_to=[], dataloader_num_workers=0,  # zarr's I/O thread does not survive a forked worker
                             use_cpu=not torch.cuda.is_available())  # CPU ranks under torchrun: without it each trains alone
    model = AutoModelForCausalLM.from_pretrained(student)
    if lora_rank:  # only the adapters train; trainer.save_model then writes the adapter, which `ddk-cache eval` loads
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = ddk_cache.KDTrainer(model=model, args=args, train_dataset=mixture, gamma=gamma)
    trainer.train()
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--student", required=True, help="a folder or hub id that from_pretrained loads")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank instead of the whole student")
    cli = parser.parse_args()
    trainer = train(cli.store, cli.student, cli.out, cli.steps, cli.batch_size, cli.lr, grad_accum=cli.grad_accum, lora_rank=cli.lora_rank)
    if trainer.is_world_process_zero():
        trainer.save_model(cli.out)
        print(f"trained on {trainer.args.world_size} rank(s); last loss {trainer.state.log_history[-1].get('train_loss')}")
