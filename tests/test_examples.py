"""The integration examples in examples/ train a tiny student from a real store, as a user would run them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

import ddk_cache

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The tiny teacher has random weights: its distribution is far from the data's, so at DDK's gamma = 0.2
# the CE term pulls the student away from it. With KD weighted to dominate, the KD term must fall:
# measured on the same held-out batch (valid windows) before and after, since a step's own batch is noisy.
GAMMA = 5.0


def held_out_kd(model: torch.nn.Module, store: Path) -> float:
    dataset = ddk_cache.CacheDataset(str(store), "math", "valid")
    batch = ddk_cache.collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        return ddk_cache.kd_loss(model(input_ids=batch["input_ids"]).logits, batch).item()


def test_hf_trainer_example_lowers_the_kd_term(tiny_store, tiny_student, tmp_path):
    before = held_out_kd(LlamaForCausalLM.from_pretrained(tiny_student), tiny_store)
    trainer = load_example("hf_trainer_kd").train(str(tiny_store), str(tiny_student), str(tmp_path / "run"), steps=30, lr=3e-3, gamma=GAMMA)
    after = held_out_kd(trainer.model, tiny_store)
    assert len(trainer.kd_history) == 30 and after < 0.85 * before, (before, after)


def test_hf_trainer_example_with_lora_trains_an_adapter_that_eval_loads(tiny_store, tiny_student, tmp_path):
    from typer.testing import CliRunner

    from ddk_cache.cli.main import app

    before = held_out_kd(LlamaForCausalLM.from_pretrained(tiny_student), tiny_store)
    trainer = load_example("hf_trainer_kd").train(str(tiny_store), str(tiny_student), str(tmp_path / "run"), steps=30, lr=3e-2, gamma=GAMMA,
                                                  lora_rank=4)
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert held_out_kd(trainer.model, tiny_store) < before  # a 1-layer student: the adapters move the KD term a little
    trainer.save_model(str(tmp_path / "adapter"))
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "adapter"), str(tiny_store), "--device", "cpu"])  # base and its tokenizer
    assert result.exit_code == 0, result.output


def test_trl_example_trains_from_the_datasets_view(tiny_store, tiny_student, tmp_path):
    before = held_out_kd(LlamaForCausalLM.from_pretrained(tiny_student), tiny_store)
    trainer = load_example("trl_kd").train(str(tiny_store), str(tiny_student), str(tmp_path / "run"), steps=30, lr=3e-3, gamma=GAMMA)
    after = held_out_kd(trainer.model, tiny_store)
    assert len(trainer.kd_history) == 30 and after < 0.85 * before, (before, after)


def test_plain_loop_example_lowers_the_kd_term(tiny_store, tiny_student):
    before = held_out_kd(LlamaForCausalLM.from_pretrained(tiny_student), tiny_store)
    model, history = load_example("plain_loop").train(str(tiny_store), str(tiny_student), steps=30, lr=3e-3, gamma=GAMMA)
    after = held_out_kd(model, tiny_store)
    assert len(history) == 30 and after < 0.85 * before, (before, after)
