"""Teacher-mixed sampling (MiniLLM's recipe): draws from (1 - a) q + a p, the mixture's log-probs stored, bad flags refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from test_rollout import MAX_NEW, rollout, tiny_student, update, write_prompt_manifest  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.minillm.mixed_sampling import mixed_generate, mixture_logprobs
from ddk_cache.minillm.rollouts import assemble, sequence_logprobs
from ddk_cache.store.reader import CacheReader


@pytest.fixture(scope="module")
def models(tiny_student, tiny_teacher):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny_student), AutoModelForCausalLM.from_pretrained(tiny_teacher),
            AutoTokenizer.from_pretrained(tiny_student))


def test_the_incremental_mixture_agrees_with_teacher_forced_passes_over_left_padded_prompts(models):
    """Both KV caches, left padding and positions are right iff each drawn token's mixture probability, as sampling
    computed it, equals the one recomputed from the finished windows."""
    student, teacher, tokenizer = models
    prompts = [[5, 9, 14], [7, 22, 31, 40, 41, 50, 61], [12]]  # different lengths: two of three rows are left-padded
    alpha = 0.3
    responses, picked = mixed_generate(student, teacher, prompts, MAX_NEW, alpha, seed=3, batch_size=3, eos=tokenizer.eos_token_id)
    assert all(1 <= len(r) <= MAX_NEW for r in responses)
    rollouts = assemble(student, prompts, responses, tokenizer.eos_token_id, 8 + MAX_NEW, 3)
    recomputed = mixture_logprobs(rollouts.behaviour_logprobs, sequence_logprobs(teacher, rollouts.tokens), alpha)
    for row, (ids, values) in enumerate(zip(prompts, picked)):
        np.testing.assert_allclose(recomputed[row, len(ids) - 1 : len(ids) - 1 + len(values)], values, atol=1e-4)
    again, _ = mixed_generate(student, teacher, prompts, MAX_NEW, alpha, seed=3, batch_size=3, eos=tokenizer.eos_token_id)
    assert again == responses  # seeded: a rollout repeats


def test_first_tokens_follow_the_mixture_not_the_student(models):
    student, teacher, _ = models
    prompt, alpha, draws = [5, 9, 14], 0.5, 6000
    with torch.no_grad():
        q = torch.softmax(student(torch.tensor([prompt])).logits[0, -1].float(), -1)
        p = torch.softmax(teacher(torch.tensor([prompt])).logits[0, -1].float(), -1)
    mixture = ((1 - alpha) * q + alpha * p).numpy()
    responses, _ = mixed_generate(student, teacher, [prompt] * draws, 1, alpha, seed=0, batch_size=draws, eos=-1)
    counts = np.bincount([r[0] for r in responses], minlength=len(mixture)) / draws
    distance = lambda a, b: 0.5 * np.abs(a - b).sum()  # noqa: E731  total variation
    assert distance(mixture, q.numpy()) > 0.1  # the two models differ enough to tell the mixture from the student
    assert distance(counts, mixture) < distance(mixture, q.numpy()) / 2


def test_a_teacher_mixed_rollout_stores_the_mixture_and_trains(tiny_student, tiny_teacher, tmp_path):  # noqa: F811
    prompts = write_prompt_manifest(tmp_path)
    out = tmp_path / "mixed.zarr"
    result = rollout(tiny_student, prompts, out, "--teacher", str(tiny_teacher), "--teacher-mix", "0.25", "--seed", "2")
    assert result.exit_code == 0, result.output
    reader = CacheReader(str(out), allow_incomplete=True)
    info = reader.header.rollout
    assert info.teacher_mix == 0.25 and info.mix_teacher.endswith(tiny_teacher.name) and info.mix_teacher_weights_sha256.startswith("sha256:")
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    for split in ("train", "valid"):
        values = reader.read_arrays("math", split, reader.data_arrays)
        mask, behaviour, sampling = values["response_mask"], values["behaviour_logprobs"], values["sampling_logprobs"]
        if split == "train":  # log(0.75 q + 0.25 p), both teacher-forced, to the storage's 1/1024 nat
            expected = mixture_logprobs(behaviour, sequence_logprobs(teacher, values["tokens"]) * mask, 0.25) * mask
            np.testing.assert_allclose(sampling, expected, atol=1.5 / 1024)
            assert np.abs(sampling - behaviour)[mask > 0].max() > 0.01
        else:  # the test prompts are the student's alone: its reverse KL estimate needs its own samples
            np.testing.assert_array_equal(sampling, behaviour)
    scored = CliRunner().invoke(app, ["teacher-dump", "--teacher", str(tiny_teacher), "--out", str(out), "--k", "8", "--device", "cpu",
                                      "--no-progress"])
    assert scored.exit_code == 0, scored.output
    block = CacheReader(str(out)).read("math", "train")
    assert block.sampling_logprobs is not None  # scoring kept it
    assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 0
    inspected = CliRunner().invoke(app, ["inspect", str(out)], env={"COLUMNS": "300"})
    assert "train responses sampled from 0.75 student + 0.25 teacher" in inspected.output, inspected.output
    trained = update(out, tiny_student, tmp_path / "run")
    assert trained.exit_code == 0, trained.output
    first = next(line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "clipped_fraction" in line)
    assert '"clipped_fraction": 0.0' not in first  # ratios start at q / mix, not at 1: the mixture is in the update


def test_bad_teacher_mix_flags_are_refused_in_one_line(tiny_student, tiny_teacher, tmp_path):  # noqa: F811
    prompts = write_prompt_manifest(tmp_path)
    other = tmp_path / "other_tokenizer"
    shutil.copytree(tiny_teacher, other)
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"<eos>"', '"<end>"'))
    cases = [
        (("--teacher-mix", "0.2"), "--teacher-mix needs --teacher"),
        (("--teacher", str(tiny_teacher), "--teacher-mix", "0"), "--teacher-mix must be in (0, 1]"),
        (("--teacher", str(tiny_teacher), "--teacher-mix", "1.5"), "--teacher-mix must be in (0, 1]"),
        (("--teacher", str(tiny_teacher), "--generator", "vllm"), "cannot mix the teacher's distribution"),
        (("--teacher", str(tiny_teacher), "--responses", "references"), "--responses references samples nothing"),
        (("--teacher", str(other)), "the teacher's tokenizer"),
    ]
    for index, (extra, fragment) in enumerate(cases):
        out = tmp_path / f"out{index}.zarr"
        result = rollout(tiny_student, prompts, out, *extra)
        assert result.exit_code == 2 and fragment in result.stderr and result.stderr.count("\n") == 1, (extra, result.output)
        assert not out.exists()

