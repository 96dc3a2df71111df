"""Distil from a ddk-cache store with TRL's `SFTTrainer`: the cache as a `datasets.IterableDataset`, DDK's loss from `KDTrainer`.

TRL's trainers take `datasets` datasets only, and would tokenize and pack text themselves; a cache
is tokenized, packed and scored already. So: `ddk_cache.to_iterable_dataset` gives the cache as an
IterableDataset (the same windows as `CacheMixture`), `skip_prepare_dataset` tells TRL to take it
as it is, and the trainer class puts `ddk_cache.KDTrainer` before `SFTTrainer`, so TRL's machinery
(its config, callbacks, PEFT handling, logging) runs with DDK's loss, normalised over each optimizer
step. Run:

    python examples/trl_kd.py --store cache.zarr --student ./student --out ./run --steps 200
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import ddk_cache


class KDSFTTrainer(ddk_cache.KDTrainer, SFTTrainer):
    """SFTTrainer with KDTrainer's compute_loss (CE + gamma x KD on the cached teacher entries)."""


def train(store: str, student: str, out: str, steps: int, batch_size: int = 4, lr: float = 3e-4, gamma: float = 0.2) -> KDSFTTrainer:
    args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr, logging_steps=max(1, steps // 10),
                     save_strategy="no", report_to=[], dataloader_num_workers=0,
                     dataset_kwargs={"skip_prepare_dataset": True},  # the cache is tokenized and packed already
                     bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available())  # SFTConfig's bf16 default fails on a CPU
    trainer = KDSFTTrainer(model=AutoModelForCausalLM.from_pretrained(student), args=args, gamma=gamma,
                           train_dataset=ddk_cache.to_iterable_dataset(store, weights="manifest", seed=0),
                           processing_class=AutoTokenizer.from_pretrained(student))
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
    train(cli.store, cli.student, cli.out, cli.steps, cli.batch_size, cli.lr).save_model(cli.out)
