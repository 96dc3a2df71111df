"""LoRA students (issue 25): `distill --lora-rank` trains adapters on a frozen pretrained student and saves the adapter
(and the merged model); `eval` and `distill --student` take the adapter folder (its base + the adapter)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_distill import distill
from typer.testing import CliRunner

from ddk_cache.cli.main import app


@pytest.fixture
def lora_run(tiny_store, tiny_student, tmp_path):
    out = tmp_path / "lora"
    result = distill(tiny_store, tiny_student, out, "--steps", "4", "--update-every", "2", "--lr", "1e-2",
                     "--lora-rank", "4", "--lora-targets", "q_proj,v_proj", "--lora-merge")
    assert result.exit_code == 0, result.output
    return out


def evaluate(model, store) -> list[dict]:
    result = CliRunner().invoke(app, ["eval", str(model), str(store), "--device", "cpu", "--json", "-"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_lora_trains_the_adapters_only_and_saves_adapter_and_merged_model(lora_run, tiny_student):
    assert (lora_run / "adapter_config.json").is_file() and not (lora_run / "config.json").exists()
    adapter = load_file(lora_run / "adapter_model.safetensors")
    assert adapter and all("lora_" in name and ("q_proj" in name or "v_proj" in name) for name in adapter)
    assert any(t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at zero: it trained
    base, merged = load_file(tiny_student / "model.safetensors"), load_file(lora_run / "merged" / "model.safetensors")
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed and all("q_proj" in name or "v_proj" in name for name in changed)  # the rest of the student stayed frozen


def test_eval_and_distill_take_the_adapter_folder(lora_run, tiny_store, tmp_path):
    adapter_scores, merged_scores = evaluate(lora_run, tiny_store), evaluate(lora_run / "merged", tiny_store)
    for a, m in zip(adapter_scores, merged_scores):
        assert a["domain"] == m["domain"] and a["student_loss"] == pytest.approx(m["student_loss"], abs=1e-5)
    more = distill(tiny_store, lora_run, tmp_path / "more", "--steps", "2", "--update-every", "2")  # trains the same adapter on
    assert more.exit_code == 0, more.output
    assert (tmp_path / "more" / "adapter_config.json").is_file()
    twice = distill(tiny_store, lora_run, tmp_path / "twice", "--steps", "2", "--lora-rank", "4")
    assert twice.exit_code == 2 and "is a LoRA adapter already: drop --lora-rank" in twice.stderr
    assert not (tmp_path / "twice").exists()


def test_lora_flags_are_checked(tiny_store, tiny_student, tmp_path):
    for flags, fragment in ((["--lora-rank", "-1"], "--lora-rank"), (["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout"),
                            (["--lora-merge"], "need --lora-rank"), (["--lora-rank", "4", "--lora-targets", "no_such_proj"], "--lora-targets")):
        result = distill(tiny_store, tiny_student, tmp_path / "out", "--steps", "2", *flags)
        assert result.exit_code == 2 and fragment in result.stderr and result.stderr.count("\n") == 1, (flags, result.output)
