"""Stage two end to end: tiny teacher -> store -> smaller student, on CPU, with real components."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_corpus_manifest, write_other_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.data.packing import pack_domain
from ddk_cache.engines import EngineOptions
from ddk_cache.stages.teacher_dump import LayoutSettings, TeacherDumpConfig, run_teacher_dump
from ddk_cache.store.capture import Capture
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.losses import bucket_logprobs, divergence


def make_student(folder: Path, tokenizer_dir: Path, vocab_size: int | None = None) -> Path:
    """A 1-layer Llama folder with config + tokenizer only: distill builds it from the config."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(folder)
    LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def specialist_store(tiny_teacher, tmp_path_factory) -> Path:
    """A store whose teacher was trained on the 'math' domain only: the student/teacher
    perplexity ratio is by construction largest on math."""
    tmp = tmp_path_factory.mktemp("specialist")
    manifest = write_corpus_manifest(tmp)
    teacher_dir = tmp / "math_teacher"
    shutil.copytree(tiny_teacher, teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    documents = [json.loads(line)["question"] + json.loads(line)["answer"] for line in (tmp / "data" / "math.jsonl").read_text().splitlines()]
    windows = torch.as_tensor(pack_domain("math", documents, tokenizer, 16, 1, None, 0).train.windows, dtype=torch.long)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(80):
        batch = windows[(step * 16) % len(windows) :][:16]
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(teacher_dir)
    out = tmp / "specialist.zarr"
    run_teacher_dump(TeacherDumpConfig(teacher=str(teacher_dir), manifest=manifest, out=str(out), capture=Capture(k=8), engine_options=EngineOptions(device="cpu"),
                                       layout=LayoutSettings(chunk_windows=4, shard_windows=8), progress=False))
    return out


def distill(store: Path, student: Path, out: Path, *extra: str):
    args = ["distill", "--store", str(store), "--student", str(student), "--out", str(out), "--batch-size", "4",
            "--eval-windows", "2", "--device", "cpu", "--no-progress", *extra]
    return CliRunner().invoke(app, args)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def teacher_student_kl(model_dir: Path, store: Path) -> float:
    """Forward KL (rest bucket) of teacher top-k vs student on every held-out window of every domain."""
    reader = CacheReader(str(store))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for domain in reader.domains:
            block = reader.read(domain, "valid")
            logits = model(input_ids=torch.as_tensor(block.tokens[:, :-1], dtype=torch.long)).logits
            t_lp, s_lp = bucket_logprobs(torch.log_softmax(logits, -1).flatten(0, 1), torch.as_tensor(block.ids).long().flatten(0, 1),
                                         torch.as_tensor(block.logprobs).flatten(0, 1), rest=torch.as_tensor(block.rest_logprobs).flatten())
            kl = divergence(t_lp, s_lp, "forward_kl")
            total, count = total + float(kl.sum()), count + kl.numel()
    return total / count


def test_distill_trains_saves_a_loadable_student_and_logs_metrics(specialist_store, tiny_teacher, tmp_path):
    out = tmp_path / "run"
    result = distill(specialist_store, make_student(tmp_path / "student", tiny_teacher), out, "--steps", "40", "--update-every", "10", "--lr", "3e-3")
    assert result.exit_code == 0, result.output
    rows = metrics(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(40))
    assert np.mean([r["loss"] for r in steps[-5:]]) < np.mean([r["loss"] for r in steps[:5]]) - 0.2
    assert all({"ce", "kd", "lr", "tokens_per_s"} <= r.keys() for r in steps)
    updates = [r for r in rows if "domain_weights" in r]
    assert [r["step"] for r in updates] == [0, 10, 20, 30]
    assert set(updates[0]["eval"]["math"]) == {"student_ppl", "teacher_ppl"}
    assert "final_eval" in rows[-1]
    model = AutoModelForCausalLM.from_pretrained(out)  # save_pretrained output, with its tokenizer
    assert AutoTokenizer.from_pretrained(out).eos_token == "<eos>" and model.config.num_hidden_layers == 1
    assert not (out / "checkpoints").exists()
    assert "student" in result.output and "after" in result.output  # header "student ppl after", one word per line


def test_ddk_moves_weight_to_the_domain_the_student_lags_most(specialist_store, tiny_teacher, tmp_path):
    out = tmp_path / "ddk"
    result = distill(specialist_store, make_student(tmp_path / "student", tiny_teacher), out, "--steps", "12", "--update-every", "4", "--gamma", "0")
    assert result.exit_code == 0, result.output
    updates = [r for r in metrics(out) if "domain_weights" in r]
    first = updates[0]
    ratios = {d: e["student_ppl"] / e["teacher_ppl"] for d, e in first["eval"].items()}
    assert max(ratios, key=ratios.get) == "math"  # the construction holds
    exp = {d: np.exp(r - max(ratios.values())) for d, r in ratios.items()}
    for domain, weight in first["domain_weights"].items():  # softmax of the ratios, as in the paper
        assert weight == pytest.approx(exp[domain] / sum(exp.values()))
    for update in updates:
        assert max(update["domain_weights"], key=update["domain_weights"].get) == "math"
    # the uniform sampler, same data, does not move
    uniform = tmp_path / "uniform"
    assert distill(specialist_store, tmp_path / "student", uniform, "--steps", "8", "--update-every", "4", "--sampler", "uniform").exit_code == 0
    assert all(w == pytest.approx(1 / 3) for r in metrics(uniform) if "domain_weights" in r for w in r["domain_weights"].values())


def test_ddk_score_options_reach_the_sampler(specialist_store, tiny_teacher, tmp_path):
    """--ddk-score ce-ratio --ddk-temperature 2: the first factor is softmax(log ppl_S / log ppl_T / 2)."""
    out = tmp_path / "ce"
    result = distill(specialist_store, make_student(tmp_path / "student", tiny_teacher), out, "--steps", "4", "--update-every", "2",
                     "--ddk-score", "ce-ratio", "--ddk-temperature", "2")
    assert result.exit_code == 0, result.output
    first = next(r for r in metrics(out) if "domain_weights" in r)
    scores = {d: np.log(e["student_ppl"]) / np.log(e["teacher_ppl"]) / 2 for d, e in first["eval"].items()}
    exp = {d: np.exp(v - max(scores.values())) for d, v in scores.items()}
    for domain, weight in first["domain_weights"].items():
        assert weight == pytest.approx(exp[domain] / sum(exp.values()), rel=1e-4)


def test_kd_brings_the_student_closer_to_the_teacher_than_ce_alone(specialist_store, tiny_teacher, tmp_path):
    student = make_student(tmp_path / "student", tiny_teacher)
    common = ("--steps", "40", "--update-every", "40", "--sampler", "uniform", "--lr", "3e-3")
    assert distill(specialist_store, student, tmp_path / "ce", *common, "--gamma", "0").exit_code == 0
    assert distill(specialist_store, student, tmp_path / "kd", *common, "--mix", "0.9").exit_code == 0
    kl_ce, kl_kd = teacher_student_kl(tmp_path / "ce", specialist_store), teacher_student_kl(tmp_path / "kd", specialist_store)
    assert kl_kd < 0.9 * kl_ce, (kl_kd, kl_ce)


KILLING_RUNNER = textwrap.dedent(
    """
    import os, signal, sys
    from ddk_cache.training.checkpoint import Checkpointer

    save, kill_at = Checkpointer.save, int(os.environ["KILL_AFTER_CHECKPOINT_STEP"])

    def save_then_die(self, step):
        save(self, step)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    Checkpointer.save = save_then_die
    from ddk_cache.cli.main import main
    sys.argv = ["ddk-cache", *sys.argv[1:]]
    main()
    """
)


def test_killed_and_resumed_run_follows_the_uninterrupted_loss_curve(tiny_store, tiny_teacher, tmp_path):
    student = make_student(tmp_path / "student", tiny_teacher)
    runner = tmp_path / "runner.py"
    runner.write_text(KILLING_RUNNER)
    args = ["distill", "--store", str(tiny_store), "--student", str(student), "--batch-size", "3", "--grad-accum", "2",
            "--steps", "12", "--update-every", "4", "--eval-windows", "2", "--device", "cpu", "--no-progress"]

    def run(out: Path, *extra: str, kill: int | None = None) -> subprocess.CompletedProcess:
        command = [sys.executable, str(runner), *args, "--out", str(out), *extra]
        env = {**os.environ, "KILL_AFTER_CHECKPOINT_STEP": str(kill if kill is not None else -1)}
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)

    assert run(tmp_path / "straight", "--auto-resume").returncode == 0  # auto on an empty folder: a new run
    killed = run(tmp_path / "killed", kill=8)
    assert killed.returncode == -9
    assert max(r["step"] for r in metrics(tmp_path / "killed")) == 7
    refused = run(tmp_path / "killed")
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    resumed = run(tmp_path / "killed", "--auto-resume")  # what a job script re-run after preemption passes
    assert resumed.returncode == 0, resumed.stderr

    straight, again = metrics(tmp_path / "straight"), metrics(tmp_path / "killed")
    assert [r["step"] for r in again] == [r["step"] for r in straight]
    for a, b in zip(again, straight):
        for key in ("loss", "ce", "kd", "lr", "domain_weights", "eval", "final_eval"):
            assert a.get(key) == b.get(key), (a["step"], key)
    weights_a, weights_b = load_file(tmp_path / "killed" / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_b)


def test_out_holding_unrelated_files_is_refused_and_left_alone(tiny_store, tiny_teacher, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpeg")
    result = distill(tiny_store, make_student(tmp_path / "student", tiny_teacher), out, "--steps", "2")
    assert result.exit_code == 2 and "holds other files, not a distill run" in result.stderr
    assert [p.name for p in out.iterdir()] == ["holiday.jpg"]


def test_student_shorter_than_the_windows_is_refused(tiny_store, tiny_teacher, tmp_path):
    student = make_student(tmp_path / "student", tiny_teacher)
    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8}))
    result = distill(tiny_store, student, tmp_path / "out", "--steps", "2")
    assert result.exit_code == 2 and "the student's context (8 positions) is shorter than the cache's windows (16 tokens)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_resume_with_other_settings_is_refused(tiny_store, tiny_teacher, tmp_path):
    student = make_student(tmp_path / "student", tiny_teacher)
    out = tmp_path / "run"
    result = distill(tiny_store, student, out, "--steps", "4", "--update-every", "2")
    assert result.exit_code == 0
    again = distill(tiny_store, student, out, "--steps", "4")
    assert again.exit_code == 2 and "finished distill run" in again.stderr


def test_student_with_another_tokenizer_is_refused(tiny_store, tiny_teacher, tmp_path):
    other = write_other_tokenizer(tmp_path / "other_tokenizer")
    student = make_student(tmp_path / "student", other)
    result = distill(tiny_store, student, tmp_path / "out", "--steps", "2")
    assert result.exit_code == 2
    assert "student's tokenizer" in result.stderr and "differs from the cache's" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    # the cache's tokenizer passed with --tokenizer to a student made for another one: refused too
    masked = distill(tiny_store, student, tmp_path / "out2", "--steps", "2", "--tokenizer", str(tiny_teacher))
    assert masked.exit_code == 2 and "the --tokenizer tokenizer" in masked.stderr and "the student's own in" in masked.stderr
    assert not (tmp_path / "out2").exists()


def test_student_vocabulary_smaller_is_refused_padded_is_fine(tiny_store, tiny_teacher, tmp_path):
    size = len(AutoTokenizer.from_pretrained(tiny_teacher))
    small = make_student(tmp_path / "small", tiny_teacher, vocab_size=size - 5)
    result = distill(tiny_store, small, tmp_path / "small_out", "--steps", "2")
    assert result.exit_code == 2 and "smaller than the cache's tokenizer" in result.stderr
    padded = make_student(tmp_path / "padded", tiny_teacher, vocab_size=size + 34)
    result = distill(tiny_store, padded, tmp_path / "padded_out", "--steps", "3", "--update-every", "3")
    assert result.exit_code == 0, result.output
    assert all(np.isfinite(r["loss"]) for r in metrics(tmp_path / "padded_out") if "loss" in r)


def test_eval_reports_model_and_teacher_per_domain(tiny_store, tiny_teacher, tmp_path):
    result = CliRunner().invoke(app, ["eval", str(tiny_teacher), str(tiny_store), "--device", "cpu", "--json", str(tmp_path / "e.json")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "e.json").read_text())
    reader = CacheReader(str(tiny_store))
    for row in rows:
        # the teacher itself, evaluated live, reproduces the cached teacher loss on the same windows
        assert row["student_loss"] == pytest.approx(row["teacher_loss"], abs=1e-4)
        assert row["teacher_ppl"] == pytest.approx(reader.domain_info(row["domain"]).teacher_valid_ppl, rel=1e-6)
        assert f"{row['teacher_ppl']:.3f}" in result.output


def test_online_teacher_reference_uses_the_full_distribution(tiny_store, tiny_teacher, tmp_path):
    """Same batch, same initial student: CE agrees; dense KL >= the cache's top-k + rest-bucket KL
    (merging the tail into one bucket can only lose divergence), and equality would mean no tail."""
    student = make_student(tmp_path / "student", tiny_teacher)
    common = ("--steps", "2", "--update-every", "2", "--sampler", "uniform")
    cached = distill(tiny_store, student, tmp_path / "cached", *common)
    dense = distill(tiny_store, student, tmp_path / "dense", *common, "--online-teacher", str(tiny_teacher))
    assert cached.exit_code == 0 and dense.exit_code == 0, cached.output + dense.output
    first_cached, first_dense = metrics(tmp_path / "cached")[0], metrics(tmp_path / "dense")[0]
    assert first_cached["ce"] == pytest.approx(first_dense["ce"], rel=1e-6)
    assert first_dense["kd"] > first_cached["kd"] * 1.01
    broken = distill(tiny_store, student, tmp_path / "broken", *common, "--online-teacher", str(tmp_path / "nowhere"))
    assert broken.exit_code == 2 and "online teacher '" in broken.output and "nowhere' does not exist" in broken.output


@pytest.mark.parametrize(("flags", "message"), [
    (("--parallel", "fsdp"), "--parallel fsdp needs one process per device: launch with torchrun"),
    (("--parallel", "zero3"), "Invalid value for '--parallel': 'zero3' is not one of 'auto', 'none', 'ddp', 'fsdp'. (see "),
    (("--global-batch-size", "6", "--batch-size", "4"), "--global-batch-size 6 is not a multiple of 1 ranks x --batch-size 4 = 4"),
    (("--global-batch-size", "8", "--batch-size", "4", "--grad-accum", "3"), "--grad-accum 3 contradicts --global-batch-size 8"),
    (("--global-batch-size", "0",), "--global-batch-size must be >= 1, got 0"),
    (("--dist-timeout", "0",), "--dist-timeout must be > 0, got 0.0"),
    (("--reader-threads", "0",), "--reader-threads must be in [1, 64], got 0"),
    # the audit's settings that trained backwards or broke training with exit 0
    (("--min-lr-ratio", "-1",), "--min-lr-ratio must be in [0, 1], got -1.0"),
    (("--mix", "2",), "--mix must be in [0, 1], got 2.0"),
    (("--gamma", "-1",), "--gamma must be >= 0, got -1.0"),
    (("--warmup", "-1",), "--warmup must be >= 0, got -1"),
    (("--warmup", "3",), "--warmup 3 is longer than the run (--steps 2)"),
    (("--clip", "-1",), "--clip must be >= 0, got -1.0"),
    (("--update-every", "0",), "--update-every must be >= 1, got 0"),
    (("--checkpoint-every", "-1",), "--checkpoint-every must be >= 0, got -1"),
    (("--lr", "nan",), "--lr must be in (0, 1], got nan"),
    (("--temperature", "0",), "--temperature must be in (0, 100], got 0.0"),
    (("--ddk-temperature", "0",), "--ddk-temperature must be in (0, 1000], got 0.0"),
    (("--ddk-score", "kl",), "Invalid value for '--ddk-score': 'kl' is not one of 'ppl-ratio', 'ce-ratio'."),
    (("--sampler", "random",), "Invalid value for '--sampler': 'random' is not one of 'ddk', 'static', 'uniform'."),
    (("--divergence", "kl",), "Invalid value for '--divergence': 'kl' is not one of 'forward_kl'"),
    (("--steps", "many",), "Invalid value for '--steps'"),
    (("--device", "tpu",), "unknown --device 'tpu'"),
    (("--device", "mps",), "--device mps: ddk-cache runs on cpu or cuda"),
    pytest.param(("--device", "cuda"), "--device cuda but no CUDA GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])
def test_batch_and_launch_settings_are_checked_before_anything_is_written(tiny_store, tiny_teacher, tmp_path, flags, message):
    result = distill(tiny_store, make_student(tmp_path / "student", tiny_teacher), tmp_path / "out", "--steps", "2", *flags)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_global_batch_with_accumulation_equals_the_same_global_batch_in_one_micro_batch(tiny_store, tiny_teacher, tmp_path):
    """The global batch, not its split into micro-batches, decides the run (float summation order aside)."""
    student = make_student(tmp_path / "student", tiny_teacher)
    common = ("--steps", "6", "--update-every", "3", "--global-batch-size", "6")
    assert distill(tiny_store, student, tmp_path / "one", *common, "--batch-size", "6").exit_code == 0
    assert distill(tiny_store, student, tmp_path / "three", *common, "--batch-size", "2").exit_code == 0
    for a, b in zip(metrics(tmp_path / "three"), metrics(tmp_path / "one")):
        for key in ("loss", "ce", "kd"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
        assert a.get("domain_weights") == pytest.approx(b.get("domain_weights"), rel=1e-6) if "domain_weights" in b else True


def test_eval_refuses_a_folder_without_weights_unless_asked_to_score_a_random_init(tiny_store, tiny_teacher, tmp_path):
    """Issue 25: a folder with only config.json was scored silently, a fresh random initialisation each run."""
    student = make_student(tmp_path / "student", tiny_teacher)
    refused = CliRunner().invoke(app, ["eval", str(student), str(tiny_store), "--device", "cpu"])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.output
    assert "holds a config without weights" in refused.stderr and "--random-init" in refused.stderr
    scored = CliRunner().invoke(app, ["eval", str(student), str(tiny_store), "--device", "cpu", "--random-init", "--json", "-"])
    assert scored.exit_code == 0, scored.output
    assert all(row["student_loss"] > 4 for row in json.loads(scored.stdout))  # about ln(vocab): the initialisation's loss


# The CLI in a child process that reports its peak address space (VmPeak, KiB) on stderr when it exits
PEAK_REPORTING_CLI = textwrap.dedent("""
    import atexit, sys
    atexit.register(lambda: print("VmPeak", next(l for l in open("/proc/self/status") if l.startswith("VmPeak")).split()[1], file=sys.stderr))
    from ddk_cache.cli.main import main
    sys.argv = ["ddk-cache", *sys.argv[1:]]
    main()
""")


def test_a_128k_vocabulary_student_trains_fused_in_a_memory_limit_the_dense_loss_cannot_fit(tiny_store, tiny_teacher, tmp_path):
    """Issue 26's "done when": a 128,256-token student (a tiny body, where the logits dominate) trains with 64-window
    micro-batches (960 tokens: dense logits of 470 MiB, their log-softmax and gradient as large) under an address-space
    limit (RLIMIT_AS) of the fused run's own peak + 384 MiB; the dense loss runs out of it, in one line."""
    import resource

    student = make_student(tmp_path / "student", tiny_teacher, vocab_size=128256)
    common = ("--store", str(tiny_store), "--student", str(student), "--steps", "2", "--batch-size", "64", "--global-batch-size", "64",
              "--update-every", "2", "--eval-windows", "2", "--eval-batch-size", "64", "--reader-threads", "1", "--device", "cpu",
              "--no-progress")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def distill(impl: str, out: str, limit: int | None = None) -> subprocess.CompletedProcess:
        limited = None if limit is None else (lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
        return subprocess.run([sys.executable, "-c", PEAK_REPORTING_CLI, "distill", *common, "--out", str(tmp_path / out), "--loss-impl", impl],
                              capture_output=True, text=True, env=env, timeout=300, preexec_fn=limited, cwd=tmp_path)  # not the checkout's ddk_cache/

    free = distill("fused", "free")
    assert free.returncode == 0, free.stderr[-3000:]
    limit = int(free.stderr.rsplit("VmPeak", 1)[1].split()[0]) * 1024 + (384 << 20)
    fused = distill("fused", "fused", limit)
    assert fused.returncode == 0, fused.stderr[-3000:]
    dense = distill("dense", "dense", limit)
    assert dense.returncode != 0
    errors = [line for line in dense.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[0].startswith("error: out of host memory") and "Traceback" not in dense.stderr, dense.stderr[-3000:]
