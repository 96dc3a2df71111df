"""`ddk-cache prune-student`: real weights of the kept layers, a loadable model that `distill` accepts, and
one-line refusals of what cannot be pruned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.training.pruning import block_influence, even_layers, influence_layers


@pytest.fixture(scope="module")
def deep_teacher(tiny_teacher, tmp_path_factory) -> Path:
    """The tiny teacher's tokenizer on a 6-layer Llama (random weights, fixed seed): something to prune."""
    out = tmp_path_factory.mktemp("deep_teacher")
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    tokenizer.save_pretrained(out)
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).save_pretrained(out)
    return out


def prune(*args: str):
    return CliRunner().invoke(app, ["prune-student", *args])


def test_even_spacing_keeps_first_and_last():
    assert even_layers(6, 3) == [0, 2, 5] or even_layers(6, 3) == [0, 3, 5]
    assert even_layers(12, 4) == [0, 4, 7, 11]
    assert even_layers(6, 1) == [0]


def test_kept_layers_carry_the_teachers_real_weights(deep_teacher, tmp_path):
    result = prune("--teacher", str(deep_teacher), "--layers", "3", "--out", str(tmp_path / "s"), "--criterion", "even")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "s" / "ddk_prune.json").read_text())
    assert record["criterion"] == "even" and record["teacher_layers"] == 6 and len(record["kept_layers"]) == 3
    teacher = AutoModelForCausalLM.from_pretrained(deep_teacher)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    for new, old in enumerate(record["kept_layers"]):
        for (name, a), (_, b) in zip(student.model.layers[new].state_dict().items(), teacher.model.layers[old].state_dict().items()):
            assert torch.equal(a, b), (new, old, name)
        assert student.model.layers[new].self_attn.layer_idx == new
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert AutoTokenizer.from_pretrained(tmp_path / "s").get_vocab() == AutoTokenizer.from_pretrained(deep_teacher).get_vocab()


def test_block_influence_keeps_the_layers_that_change_their_input_most(deep_teacher, tiny_store, tmp_path):
    result = prune("--teacher", str(deep_teacher), "--layers", "3", "--out", str(tmp_path / "s"), "--store", str(tiny_store), "--windows", "2")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "s" / "ddk_prune.json").read_text())
    scores = record["block_influence"]
    assert len(scores) == 6 and scores[-1] is None  # the last layer is always kept
    assert record["kept_layers"] == influence_layers([s if s is not None else float("inf") for s in scores], 3)
    assert 5 in record["kept_layers"]
    dropped = [i for i in range(5) if i not in record["kept_layers"]]
    assert max(scores[i] for i in dropped) <= min(scores[i] for i in record["kept_layers"] if i != 5)


def test_block_influence_is_one_minus_the_mean_cosine():
    """A layer that leaves its input unchanged has BI 0; one that reverses it has BI 2."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    for param in model.model.layers[0].parameters():  # layer 0 adds nothing to the residual stream: output = input
        torch.nn.init.zeros_(param)
    scores = block_influence(model, torch.randint(0, 50, (2, 8)).numpy())
    assert scores[0] == pytest.approx(0.0, abs=1e-6) and scores[1] > 0 and scores[2] == float("inf")


def test_the_pruned_student_is_accepted_by_distill(deep_teacher, tiny_store, tmp_path):
    assert prune("--teacher", str(deep_teacher), "--layers", "2", "--out", str(tmp_path / "s"), "--criterion", "even").exit_code == 0
    result = CliRunner().invoke(app, ["distill", "--store", str(tiny_store), "--student", str(tmp_path / "s"), "--out", str(tmp_path / "run"),
                                      "--steps", "2", "--batch-size", "4", "--eval-windows", "2", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run").config.num_hidden_layers == 2


@pytest.mark.parametrize(("extra", "fragment"), [
    (("--layers", "6", "--criterion", "even"), "--layers must be between 1 and 5 (the teacher has 6 decoder layers), got 6"),
    (("--layers", "0"), "--layers must be >= 1, got 0"),
    (("--layers", "2", "--criterion", "random"), "Invalid value for '--criterion': 'random' is not one of 'even', 'block-influence'."),
    (("--layers", "2"), "--criterion block-influence measures the layers on real windows: pass --store"),
])
def test_bad_input_is_one_line_and_writes_nothing(deep_teacher, tmp_path, extra, fragment):
    result = prune("--teacher", str(deep_teacher), "--out", str(tmp_path / "s"), *extra)
    assert result.exit_code == 2 and fragment in result.stderr and result.stderr.count("\n") == 1, result.output
    assert not (tmp_path / "s").exists()


def test_another_decoder_architecture_prunes_and_a_non_decoder_is_one_line(tmp_path, tiny_teacher):
    gpt2 = tmp_path / "gpt2"  # GPT-2's blocks are found through _no_split_modules as Llama's are
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=16, n_layer=3, n_head=2, n_positions=32)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_teacher / name, gpt2 / name)
    assert prune("--teacher", str(gpt2), "--layers", "2", "--out", str(tmp_path / "s"), "--criterion", "even").exit_code == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.num_hidden_layers == 2
    t5 = tmp_path / "t5"  # an encoder-decoder: not a causal LM
    T5ForConditionalGeneration(T5Config(vocab_size=300, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)).save_pretrained(t5)
    result = prune("--teacher", str(t5), "--layers", "1", "--out", str(tmp_path / "t"), "--criterion", "even")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "cannot load teacher" in result.stderr, result.output


def test_block_influence_on_a_store_of_another_tokenizer_is_refused(deep_teacher, tiny_store, tmp_path):
    """Issue 24, class 5: the store's windows are the teacher's input; made with another tokenizer they measured nonsense."""
    from conftest import write_other_tokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(deep_teacher, teacher)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        (teacher / name).unlink(missing_ok=True)
    write_other_tokenizer(teacher)
    result = prune("--teacher", str(teacher), "--out", str(tmp_path / "s"), "--layers", "2", "--store", str(tiny_store))
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "the teacher's tokenizer" in result.stderr and "measure the layers on a store made with the teacher's tokenizer" in result.stderr
    assert not (tmp_path / "s").exists()
