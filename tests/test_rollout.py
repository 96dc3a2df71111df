"""Rollout stores: the student's sampled responses written, read back, scored by a real teacher, verified."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import copy_tokenizer, make_documents, write_jsonl
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.errors import StoreError
from ddk_cache.minillm.rollouts import sequence_logprobs
from ddk_cache.store.reader import CacheReader

MAX_PROMPT, MAX_NEW = 12, 10


@pytest.fixture(scope="session")
def tiny_student(tiny_teacher, tmp_path_factory) -> Path:
    """The tiny teacher's architecture and tokenizer with other (seeded) weights: a policy unlike the teacher."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny_student")
    copy_tokenizer(tiny_teacher, out)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_teacher)).save_pretrained(out)
    return out


def write_prompt_manifest(folder: Path, train: int = 6, test: int = 3, **overrides) -> Path:
    questions = make_documents("math", 20, seed=5, min_words=3, max_words=14)
    answers = make_documents("math", 20, seed=6, min_words=2, max_words=8)
    rows = [{"question": q, "answer": a} for q, a in zip(questions, answers)]
    write_jsonl(folder / "train.jsonl", rows[:14])
    write_jsonl(folder / "test.jsonl", rows[14:])
    document = {"seed": 3, "name": "math", "prompt_template": "Q: {question} A:", "reference_field": "answer",
                "train": {"path": "json", "data_files": "train.jsonl"}, "test": {"path": "json", "data_files": "test.jsonl"},
                "train_prompts": train, "test_prompts": test, "max_prompt_tokens": MAX_PROMPT, "max_new_tokens": MAX_NEW, **overrides}
    path = folder / "prompts.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def rollout(student: Path, prompts: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["rollout", "--student", str(student), "--prompts", str(prompts), "--out", str(out),
                                    "--device", "cpu", "--batch-size", "4", "--shard-windows", "4", "--no-progress", *extra])


@pytest.fixture(scope="session")
def rollout_store(tiny_student, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("rollout")
    out = folder / "round-0.zarr"
    result = rollout(tiny_student, write_prompt_manifest(folder), out, "--seed", "7")
    assert result.exit_code == 0, result.output
    return out


def test_a_rollout_store_holds_prompt_response_windows_with_mask_and_behaviour_logprobs(rollout_store, tiny_student):
    from transformers import AutoModelForCausalLM

    reader = CacheReader(str(rollout_store), allow_incomplete=True)
    header = reader.header
    assert header.status == "packed" and not header.scored and header.rollout.round == 0 and header.rollout.seed == 7
    assert header.rollout.student_weights_sha256.startswith("sha256:") and header.split_rule == "rollout-v1"
    assert header.seq_len == MAX_PROMPT + MAX_NEW and header.domains == ("math",)
    arrays = {split: reader.read_arrays("math", split, reader.data_arrays) for split in ("train", "valid")}
    assert len(arrays["train"]["tokens"]) == 6 and len(arrays["valid"]["tokens"]) == 3
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    for split, values in arrays.items():
        mask, behaviour, tokens = values["response_mask"], values["behaviour_logprobs"], values["tokens"]
        lengths = mask.sum(-1)
        assert np.all(lengths >= 1) and np.all(lengths <= MAX_NEW)
        for row in range(len(tokens)):  # one contiguous response after the prompt; nothing masked in before it
            positions = np.flatnonzero(mask[row])
            assert np.array_equal(positions, np.arange(positions[0], positions[0] + len(positions)))
        expected = sequence_logprobs(model, tokens) * mask
        np.testing.assert_allclose(behaviour, expected, atol=0.5 / 1024 + 1e-5)  # stored to 1/1024 nat
        assert np.all(behaviour[mask > 0] < 0) and np.all(behaviour[mask == 0] == 0)


def test_rounds_take_other_training_prompts_and_the_same_test_prompts(tiny_student, tmp_path):
    prompts = write_prompt_manifest(tmp_path)
    stores = [tmp_path / f"r{r}.zarr" for r in (0, 1)]
    for r, out in enumerate(stores):
        assert rollout(tiny_student, prompts, out, "--round", str(r)).exit_code == 0
    first, second = (CacheReader(str(s), allow_incomplete=True) for s in stores)

    def prompts_of(reader: CacheReader, split: str) -> list[tuple]:
        tokens, mask = reader.read_array("math", split, "tokens"), reader.read_array("math", split, "response_mask")
        return [tuple(t[: np.flatnonzero(m)[0] + 1]) for t, m in zip(tokens, mask)]

    assert prompts_of(first, "valid") == prompts_of(second, "valid")
    assert prompts_of(first, "train") != prompts_of(second, "train")


def test_a_teacher_scores_a_rollout_store_in_place(rollout_store, tiny_teacher, tmp_path):
    scored = tmp_path / "scored.zarr"
    shutil.copytree(rollout_store, scored)
    result = CliRunner().invoke(app, ["teacher-dump", "--teacher", str(tiny_teacher), "--out", str(scored), "--k", "8",
                                      "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    reader = CacheReader(str(scored))
    assert reader.header.scored and reader.header.rollout.round == 0
    assert reader.load_tokenizer().decode(reader.read("math", "valid", 0, 1).tokens[0])  # the student's tokenizer, carried by the store
    block = reader.read("math", "valid")
    before = CacheReader(str(rollout_store), allow_incomplete=True).read_arrays("math", "valid", ("response_mask", "behaviour_logprobs"))
    np.testing.assert_array_equal(block.response_mask, before["response_mask"])  # scoring kept the rollout's arrays
    np.testing.assert_array_equal(block.behaviour_logprobs, before["behaviour_logprobs"])
    mask = block.response_mask > 0
    expected = -block.target_logprobs[mask].astype(np.float64).mean()  # response positions only: prompts are not the student's
    assert reader.domain_info("math").teacher_valid_loss == pytest.approx(expected, rel=1e-5)
    verified = CliRunner().invoke(app, ["verify", str(scored)])
    assert verified.exit_code == 0, verified.output
    inspected = CliRunner().invoke(app, ["inspect", str(scored)], env={"COLUMNS": "200"})
    assert inspected.exit_code == 0 and "round 0: hf responses of" in inspected.output


def test_a_damaged_rollout_array_is_caught_by_its_checksum(rollout_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(rollout_store, store)
    shard = store / "math" / "train" / "response_mask" / "c" / "1" / "0"
    shutil.copy(store / "math" / "train" / "response_mask" / "c" / "0" / "0", shard)  # shard 0's bytes at shard 1's place
    with pytest.raises(StoreError, match="response_mask chunk .* does not match its checksum"):
        CacheReader(str(store), allow_incomplete=True).read_array("math", "train", "response_mask")


@pytest.mark.parametrize(("change", "fragment"), [
    ({"prompt_template": "no fields"}, "'prompt_template' must be a string naming fields"),
    ({"max_new_tokens": 0}, "'max_new_tokens' must be a positive integer"),
    ({"name": "bad name"}, "'name' must be a domain name"),
    ({"prompt_template": "Q: {missing}"}, "text field 'missing' is not a column"),
    ({"prompt_template": "Q: {question:d}"}, "field {question:d} has a conversion or format spec"),  # issue 24, class 1
    ({"prompt_template": "Q: {question!x}"}, "field {question!x} has a conversion or format spec"),
    ({"prompt_template": "Q: {}"}, "field {} is not a column name"),
    ({"max_new_tokens": 200}, "longer than the student's context (128 positions)"),  # issue 24, class 5
])
def test_a_bad_prompt_manifest_is_refused_in_one_line(tiny_student, tmp_path, change, fragment):
    result = rollout(tiny_student, write_prompt_manifest(tmp_path, **change), tmp_path / "out.zarr")
    assert result.exit_code == 2 and fragment in result.stderr and result.stderr.count("\n") == 1, result.output
    assert not (tmp_path / "out.zarr").exists()


def test_rollout_refuses_an_existing_store_and_a_student_without_weights(tiny_student, rollout_store, tmp_path):
    prompts = write_prompt_manifest(tmp_path)
    before = (rollout_store / "zarr.json").read_text()
    result = rollout(tiny_student, prompts, rollout_store)
    assert result.exit_code == 2 and "already exists: pass --overwrite" in result.stderr
    assert (rollout_store / "zarr.json").read_text() == before
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_student / name).exists():
            shutil.copy(tiny_student / name, config_only / name)
    result = rollout(config_only, prompts, tmp_path / "x.zarr")
    assert result.exit_code == 2 and "holds a config without weights" in result.stderr
    result = rollout(tiny_student, prompts, tmp_path / "y.zarr", "--batch-size", "0")
    assert result.exit_code == 2 and "--batch-size must be >= 1" in result.stderr
    assert json.loads((rollout_store / "zarr.json").read_text())["attributes"]["ddk_cache"]["status"] == "packed"


@pytest.fixture(scope="session")
def scored_rollouts(rollout_store, tiny_teacher, tmp_path_factory) -> Path:
    scored = tmp_path_factory.mktemp("scored") / "round-0.zarr"
    shutil.copytree(rollout_store, scored)
    result = CliRunner().invoke(app, ["teacher-dump", "--teacher", str(tiny_teacher), "--out", str(scored), "--k", "8",
                                      "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    return scored


def update(store: Path, student: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["distill", "--store", str(store), "--student", str(student), "--out", str(out), "--objective", "minillm",
                                    "--steps", "4", "--batch-size", "3", "--update-every", "2", "--warmup", "0", "--min-lr-ratio", "1",
                                    "--lr", "1e-3", "--device", "cpu", "--no-progress", *extra])


def test_a_minillm_update_trains_on_scored_rollouts_and_logs_its_parts(scored_rollouts, tiny_student, tmp_path):
    result = update(scored_rollouts, tiny_student, tmp_path / "run")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "policy_gradient" in r]
    assert len(steps) == 4
    for record in steps:
        assert record["loss"] == pytest.approx(record["policy_gradient"] + record["single_step"], abs=1e-5)
        assert record["single_step"] > 0 and record["reverse_kl"] > 0 and 0 <= record["clipped_fraction"] <= 1
    assert steps[0]["clipped_fraction"] == 0  # the first step starts from the policy that sampled: every ratio is 1
    assert steps[-1]["single_step"] < steps[0]["single_step"]  # the student moves toward the teacher on its own samples
    assert (tmp_path / "run" / "model.safetensors").exists()
    plotted = CliRunner().invoke(app, ["plot", str(tmp_path / "run")])  # MiniLLM's loss parts are drawn like CE and KD
    assert plotted.exit_code == 0, plotted.output
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_objectives_and_stores_must_match(scored_rollouts, tiny_store, tiny_student, tiny_teacher, tmp_path):
    result = update(tiny_store, tiny_student, tmp_path / "a")
    assert result.exit_code == 2 and "is a cache of fixed text: make one with `ddk-cache rollout`" in result.stderr
    result = CliRunner().invoke(app, ["distill", "--store", str(scored_rollouts), "--student", str(tiny_student), "--out", str(tmp_path / "b"),
                                      "--steps", "2", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2 and "is a rollout store (MiniLLM round 0): train on it with --objective minillm" in result.stderr
    result = update(scored_rollouts, tiny_teacher, tmp_path / "c")  # not the policy that sampled
    assert result.exit_code == 2 and "is not the student that sampled" in result.stderr
    result = update(scored_rollouts, tiny_student, tmp_path / "d", "--ppo-clip", "1.5")
    assert result.exit_code == 2 and "--ppo-clip must be in (0, 1), got 1.5" in result.stderr
    for out in "abcd":
        assert not (tmp_path / out).exists()


def test_a_reference_store_trains_sft_and_word_level_kd_on_the_answers_only(tiny_student, tiny_teacher, tmp_path):
    prompts = write_prompt_manifest(tmp_path)
    store = tmp_path / "references.zarr"
    assert rollout(tiny_student, prompts, store, "--responses", "references").exit_code == 0
    reader = CacheReader(str(store), allow_incomplete=True)
    assert reader.header.rollout.generator == "references" and not reader.header.rollout.sampled
    tokens, mask = reader.read_array("math", "valid", "tokens"), reader.read_array("math", "valid", "response_mask")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    answers = [json.loads(line)["answer"] for line in (tmp_path / "test.jsonl").read_text().splitlines()][:3]
    for row, answer in enumerate(answers):  # the masked tokens are " answer" + eos, cut at max_new_tokens
        expected = (tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:MAX_NEW]
        assert tokens[row, 1:][mask[row] > 0].tolist() == expected
    score = CliRunner().invoke(app, ["teacher-dump", "--teacher", str(tiny_teacher), "--out", str(store), "--k", "8", "--device", "cpu",
                                     "--no-progress"])
    assert score.exit_code == 0, score.output
    kd = update(store, tiny_student, tmp_path / "kd", "--objective", "kd", "--mix", "0.5")
    assert kd.exit_code == 0, kd.output
    first = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()][0]
    assert {"ce", "kd"} <= set(first) and "policy_gradient" not in first
    result = update(store, tiny_student, tmp_path / "pg")
    assert result.exit_code == 2 and "holds the reference answers, not the student's samples" in result.stderr


def test_masked_distillation_loss_counts_the_masked_positions_only():
    from ddk_cache.training.losses import KDConfig, TeacherTargets, distillation_loss

    torch.manual_seed(0)
    logits, targets = torch.randn(1, 3, 5), torch.tensor([[1, 2, 3]])
    teacher = TeacherTargets(torch.tensor([[[0, 1]] * 3]), torch.log(torch.tensor([[[0.6, 0.3]] * 3])))
    masked = distillation_loss(logits, targets, teacher, KDConfig(), mask=torch.tensor([[0.0, 1.0, 1.0]]))
    alone = distillation_loss(logits[:, 1:], targets[:, 1:], TeacherTargets(teacher.ids[:, 1:], teacher.logprobs[:, 1:]), KDConfig())
    assert masked.ce.item() == pytest.approx(alone.ce.item()) and masked.kd.item() == pytest.approx(alone.kd.item())


def test_the_pretraining_term_adds_lm_loss_on_a_cache_of_fixed_text(scored_rollouts, tiny_store, tiny_student, tmp_path):
    result = update(scored_rollouts, tiny_student, tmp_path / "run", "--pt-store", str(tiny_store), "--pt-weight", "0.5")
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "policy_gradient" in r]
    assert len(steps) == 4
    for record in steps:
        assert record["pretraining_lm"] > 0
        assert record["loss"] == pytest.approx(record["policy_gradient"] + record["single_step"] + 0.5 * record["pretraining_lm"], abs=1e-4)
    refused = update(scored_rollouts, tiny_student, tmp_path / "a", "--pt-store", str(scored_rollouts))
    assert refused.exit_code == 2 and "is a rollout store: give a cache of fixed text" in refused.stderr
    refused = CliRunner().invoke(app, ["distill", "--store", str(tiny_store), "--student", str(tiny_student), "--out", str(tmp_path / "b"),
                                       "--pt-store", str(tiny_store), "--steps", "2", "--device", "cpu", "--no-progress"])
    assert refused.exit_code == 2 and "--pt-store is MiniLLM's pretraining term" in refused.stderr
    refused = update(scored_rollouts, tiny_student, tmp_path / "c", "--pt-store", str(tiny_store), "--pt-weight", "-1")
    assert refused.exit_code == 2 and "--pt-weight must be >= 0" in refused.stderr


def test_the_vllm_generator_is_refused_in_one_line_where_it_cannot_run(tiny_student, tmp_path):
    """Without vLLM: the install hint. With it (as in CI): the tiny student's head size 8, which vLLM's CPU attention
    lacks, refused before vLLM starts (tests/test_vllm_live.py runs the generator on a student it can serve)."""
    from ddk_cache.engines.vllm_install import find_vllm

    result = rollout(tiny_student, write_prompt_manifest(tmp_path), tmp_path / "x.zarr", "--generator", "vllm")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    expected = "no kernel for the student's head size 8" if find_vllm().usable else "--generator vllm needs"
    assert expected in result.stderr and "--generator hf" in result.stderr and not (tmp_path / "x.zarr").exists()


def test_a_packed_store_serves_the_pretraining_term_and_a_half_packed_one_says_why_not(scored_rollouts, tiny_store, tiny_student,
                                                                                       tiny_teacher, tmp_path):
    """Issue 24, class 6: README accepts any pack or teacher-dump store as --pt-store; a packed one was refused as
    'incomplete (a dump is running or was killed)'."""
    packed = tmp_path / "packed.zarr"
    made = CliRunner().invoke(app, ["pack", "--manifest", str(tiny_store.parent / "manifest.yaml"), "--out", str(packed),
                                    "--tokenizer", str(tiny_teacher), "--valid-fraction", "0.5", "--no-progress"])
    assert made.exit_code == 0, made.output
    result = update(scored_rollouts, tiny_student, tmp_path / "run", "--pt-store", str(packed))
    assert result.exit_code == 0, result.output
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["pretraining_lm"] > 0 for r in steps if "policy_gradient" in r)
    as_training_data = CliRunner().invoke(app, ["distill", "--store", str(packed), "--student", str(tiny_student), "--out",
                                                str(tmp_path / "kd"), "--steps", "2", "--device", "cpu", "--no-progress"])
    assert as_training_data.exit_code == 2 and "is packed but not scored yet: score it with `ddk-cache teacher-dump" in as_training_data.stderr
    header = json.loads((packed / "zarr.json").read_text())
    header["attributes"]["ddk_cache"]["status"] = "packing"  # as a killed `pack` leaves it
    (packed / "zarr.json").write_text(json.dumps(header))
    refused = update(scored_rollouts, tiny_student, tmp_path / "again", "--pt-store", str(packed))
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.output
    assert "(`ddk-cache pack` is running or was killed): run it again to finish the store" in refused.stderr


def test_chat_template_wraps_each_prompt_in_the_tokenizers_own_template(tiny_student, tmp_path):
    """Issue 25: instruction models are the usual teachers; prompts took Python format strings only."""
    import shutil

    from transformers import AutoTokenizer

    chat_student = tmp_path / "chat_student"
    shutil.copytree(tiny_student, chat_student)
    tokenizer = AutoTokenizer.from_pretrained(chat_student)
    tokenizer.chat_template = ("{% for m in messages %}user {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant{% endif %}")
    tokenizer.save_pretrained(chat_student)
    prompts = write_prompt_manifest(tmp_path, chat_template=True)
    result = rollout(chat_student, prompts, tmp_path / "chat.zarr", "--responses", "references")
    assert result.exit_code == 0, result.output
    values = CacheReader(str(tmp_path / "chat.zarr"), allow_incomplete=True).read_arrays("math", "valid", ("tokens", "response_mask"))
    for tokens, mask in zip(values["tokens"], values["response_mask"]):
        start = int(np.flatnonzero(mask)[0])  # mask[t] = 1: the token after position t is the response's
        assert tokenizer.decode(tokens[: start + 1]).rstrip().endswith("assistant")  # the template's opened assistant turn
    plain = rollout(tiny_student, prompts, tmp_path / "plain.zarr", "--responses", "references")  # a tokenizer without a template
    assert plain.exit_code == 2 and "chat_template is true, but the student" in plain.stderr and "has no chat template" in plain.stderr
    assert not (tmp_path / "plain.zarr").exists()
