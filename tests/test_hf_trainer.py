"""`ddk_cache.KDTrainer`: the HF Trainer from a cache, with one optimizer step's loss and gradients the same under
gradient accumulation, and on 2 ranks under a real `torchrun` (gloo), as on one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from test_examples import EXAMPLES, load_example
from transformers import LlamaForCausalLM, TrainerCallback, TrainingArguments

import ddk_cache


class KeepGradients(TrainerCallback):
    """The gradients the optimizer is about to apply, at each step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None})


def one_step(store: Path, student: Path, out: Path, batch_size: int, grad_accum: int) -> tuple[float, dict[str, torch.Tensor]]:
    gradients = KeepGradients()
    args = TrainingArguments(output_dir=str(out), max_steps=1, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
                             learning_rate=1e-3, max_grad_norm=0.0, save_strategy="no", report_to=[], use_cpu=True, seed=0)
    trainer = ddk_cache.KDTrainer(model=LlamaForCausalLM.from_pretrained(student), args=args, callbacks=[gradients],
                                  train_dataset=ddk_cache.CacheMixture(str(store), seed=0))
    loss = trainer.train().training_loss
    return loss, gradients.steps[0]


def reference_loss(store: Path, student: Path, windows: int, gamma: float = 0.2) -> float:
    """CE + gamma KD, the mean over the first `windows` windows of the mixture: what one step must report."""
    items = iter(ddk_cache.CacheMixture(str(store), seed=0))
    batch = ddk_cache.collate([next(items) for _ in range(windows)])
    with torch.no_grad():
        logits = LlamaForCausalLM.from_pretrained(student)(input_ids=batch["input_ids"]).logits
        ce = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        return (ce + gamma * ddk_cache.kd_loss(logits, batch)).item()


def test_gradient_accumulation_changes_neither_the_loss_nor_the_gradients(tiny_store, tiny_student, tmp_path):
    """Issue 25: a compute_loss override gave 4x the loss at 4 accumulation steps (the Trainer took it as scaled)."""
    whole, whole_grads = one_step(tiny_store, tiny_student, tmp_path / "a", batch_size=8, grad_accum=1)
    split, split_grads = one_step(tiny_store, tiny_student, tmp_path / "b", batch_size=2, grad_accum=4)
    assert abs(whole - reference_loss(tiny_store, tiny_student, 8)) < 1e-5, whole
    assert abs(split - whole) < 1e-5, (split, whole)
    assert whole_grads.keys() == split_grads.keys() and whole_grads
    for name, grad in whole_grads.items():
        assert torch.allclose(split_grads[name], grad, atol=1e-5, rtol=0), name


def test_two_rank_torchrun_trains_the_example_like_one_process(tiny_store, tiny_student, tmp_path):
    """2 ranks x 2 windows per step (accelerate dispatches the endless mixture's batches: tensors only) follow 1 process x 4."""
    single = load_example("hf_trainer_kd").train(str(tiny_store), str(tiny_student), str(tmp_path / "one"), steps=2, batch_size=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLES / "hf_trainer_kd.py"),
               "--store", str(tiny_store), "--student", str(tiny_student), "--out", str(tmp_path / "two"), "--steps", "2", "--batch-size", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("trained on"))
    assert line.startswith("trained on 2 rank(s)"), line
    two_ranks = float(line.rsplit(" ", 1)[1])
    assert abs(two_ranks - single.state.log_history[-1]["train_loss"]) < 1e-4, (two_ranks, single.state.log_history[-1])
    assert (tmp_path / "two" / "model.safetensors").exists()
