"""MiniLLM in rounds end to end (tiny models): rollout -> score -> update, resumed between rounds; the evaluations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_rollout import rollout_store, scored_rollouts, tiny_student, write_prompt_manifest  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.minillm.response_quality import rouge_l
from ddk_cache.store.reader import CacheReader


def rounds(student, teacher, prompts, out, n: int, *extra: str):
    return CliRunner().invoke(app, ["minillm", "--student", str(student), "--teacher", str(teacher), "--prompts", str(prompts),
                                    "--out", str(out), "--rounds", str(n), "--epochs", "1", "--batch-size", "3", "--lr", "1e-3",
                                    "--k", "8", "--device", "cpu", "--no-progress", *extra])


def test_rounds_run_resume_and_log_every_student(tiny_student, tiny_teacher, tmp_path):  # noqa: F811
    prompts = write_prompt_manifest(tmp_path)
    out = tmp_path / "rounds"
    first = rounds(tiny_student, tiny_teacher, prompts, out, 1)  # the SFT start by default: one pass over 1 round x 6 prompts
    assert first.exit_code == 0, first.output
    assert (out / "round-0" / "student" / "model.safetensors").exists() and CacheReader(str(out / "round-1" / "rollouts.zarr")).complete
    round_0, round_1 = ((out / f"round-{r}" / "rollouts.zarr" / "zarr.json").read_text() for r in (0, 1))
    sft = out / "sft" / "student"  # the SFT start: 2 steps of CE on 2 x 3 reference answers, round 0's student
    assert "SFT start: 2 steps of CE on the reference answers (the default" in first.output and (sft / "model.safetensors").exists()
    assert CacheReader(str(out / "sft" / "references.zarr")).domain_info("math").train.windows == 6
    sampled = CacheReader(str(out / "round-0" / "rollouts.zarr")).header.rollout
    assert sampled.student == str(sft.resolve()) and sampled.teacher_mix == 0.2  # MiniLLM's mixture by default
    second = rounds(tiny_student, tiny_teacher, prompts, out, 2, "--sft-steps", "2")  # one more round: round 0 is reused, not redone
    assert second.exit_code == 0, second.output
    assert "SFT start" not in second.output
    assert (out / "round-0" / "rollouts.zarr" / "zarr.json").read_text() == round_0
    assert (out / "round-1" / "rollouts.zarr" / "zarr.json").read_text() == round_1  # the first run's final rollouts are round 1's
    assert "round 0: MiniLLM update" not in second.output and "round 1: MiniLLM update" in second.output
    logged = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    students = {entry["round"]: entry for entry in logged if "reverse_kl" in entry}
    assert set(students) == {0, 1, 2} and len(students) == len([e for e in logged if "reverse_kl" in e])  # none evaluated twice
    for entry in students.values():
        assert entry["reverse_kl"] > 0 and 0 <= entry["rouge_l"] <= 100 and entry["entropy"] > 0
    scored = CacheReader(str(out / "round-1" / "rollouts.zarr"))
    assert scored.header.rollout.round == 1 and scored.header.rollout.student.endswith("round-0/student")
    assert "reverse KL" in second.output and "ROUGE-L" in second.output
    plotted = CliRunner().invoke(app, ["plot", str(out)])
    assert plotted.exit_code == 0, plotted.output
    assert (out / "rounds.png").stat().st_size > 1000 and not (out / "loss.png").exists()


def _record(r: int, entropy: float, teacher_ce: float):
    from ddk_cache.stages.minillm_rounds import RoundRecord

    return RoundRecord(r, "s", 1.0, teacher_ce, None, 10.0, {}, entropy)


def test_the_entropy_failure_and_an_untuned_start_are_said_in_one_line():
    from ddk_cache.stages.minillm_rounds import entropy_failure, untuned_start

    warning = entropy_failure(_record(0, 3.26, 4.61), _record(1, 4.08, 5.20))  # RESULTS.md's round 1
    assert "entropy rose (3.260 -> 4.080)" in warning and "(4.610 -> 5.200)" in warning and "\n" not in warning
    assert entropy_failure(_record(0, 3.26, 4.61), _record(1, 3.50, 4.40)) is None  # entropy up alone: ordinary
    assert entropy_failure(_record(0, 3.26, 4.61), _record(1, 3.00, 4.90)) is None  # teacher CE up alone
    assert entropy_failure(None, _record(0, 3.0, 4.0)) is None
    assert "has not been fine-tuned on the task" in untuned_start(_record(0, 3.26, 4.61), 2.1)
    assert untuned_start(_record(0, 3.26, 2.9), 2.1) is None and untuned_start(_record(0, 3.26, 4.61), None) is None


def test_eval_responses_reports_rouge_and_the_reverse_kl_estimate(scored_rollouts, tiny_student, tmp_path):  # noqa: F811
    prompts = write_prompt_manifest(tmp_path)
    result = CliRunner().invoke(app, ["eval-responses", "--student", str(tiny_student), "--prompts", str(prompts),
                                      "--scored", str(scored_rollouts), "--device", "cpu", "--json", "-"])
    assert result.exit_code == 0, result.output
    values = json.loads(result.stdout)
    reader = CacheReader(str(scored_rollouts))
    block = reader.read("math", "valid")
    mask = block.response_mask.astype(np.float64)
    per_sequence = ((block.behaviour_logprobs - block.target_logprobs) * mask).sum(-1) / mask.sum(-1)
    assert values["reverse_kl"] == pytest.approx(per_sequence.mean(), rel=1e-5)
    assert values["responses"] == 3 and 0 <= values["rouge_l"] <= 100


def test_eval_responses_refuses_a_json_path_in_a_missing_folder_before_any_answer(tiny_student, tmp_path, monkeypatch):  # noqa: F811
    """Issue 24, class 8: a late failure made early: the path is checked before the student answers anything."""
    from ddk_cache.stages import eval_responses

    def must_not_run(config):
        raise AssertionError("the answers were generated before --json was checked")

    monkeypatch.setattr(eval_responses, "run_eval_responses", must_not_run)
    prompts = write_prompt_manifest(tmp_path)
    result = CliRunner().invoke(app, ["eval-responses", "--student", str(tiny_student), "--prompts", str(prompts), "--device", "cpu",
                                      "--json", str(tmp_path / "missing" / "scores.json")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "folder" in result.stderr and "does not exist: create it or choose another path" in result.stderr


def test_rouge_l_against_known_values():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert rouge_l(["the cat sat on the mat"], ["a cat sat on a mat"]) == pytest.approx(100 * 4 / 6)  # LCS 4 of 6 tokens each side
    assert rouge_l(["dogs"], ["cats"]) == 0.0


def test_rounds_refuse_a_manifest_without_references_unless_rouge_is_off(tiny_student, tiny_teacher, tmp_path):  # noqa: F811
    prompts = write_prompt_manifest(tmp_path, reference_field=None)
    result = rounds(tiny_student, tiny_teacher, prompts, tmp_path / "r", 1)
    assert result.exit_code == 2 and "ROUGE-L needs reference answers" in result.stderr and result.stderr.count("\n") == 1


def test_bad_recipe_settings_are_refused_in_one_line_before_anything_is_written(tiny_student, tiny_teacher, tmp_path):  # noqa: F811
    (tmp_path / "plain").mkdir()
    with_references, without = write_prompt_manifest(tmp_path), write_prompt_manifest(tmp_path / "plain", reference_field=None)
    cases = [(without, ("--no-rouge", "--sft-steps", "2"), "--sft-steps trains on reference answers"),
             (with_references, ("--teacher-mix", "1.5"), "--teacher-mix must be in [0, 1]"),
             (with_references, ("--sft-steps", "-1"), "--sft-steps must be >= 0"),
             (with_references, ("--divergence", "skew_reverse_kl", "--skew-alpha", "1"), "--skew-alpha must be in (0, 1)")]
    for index, (prompts, extra, fragment) in enumerate(cases):
        out = tmp_path / f"r{index}"
        result = rounds(tiny_student, tiny_teacher, prompts, out, 1, *extra)
        assert result.exit_code == 2 and fragment in result.stderr and result.stderr.count("\n") == 1, (extra, result.output)
        assert not out.exists()


def test_the_default_sft_start_is_one_pass_over_the_rounds_references():
    from ddk_cache.stages.minillm_rounds import default_sft_steps

    assert default_sft_steps(2, 64, 8, True) == 16  # the benchmark's recipe arm: 2 rounds x 64 prompts, batch 8
    assert default_sft_steps(1, 6, 4, True) == 2 and default_sft_steps(3, 64, 8, False) == 0  # no references: no SFT start
