"""The live vLLM engine (vLLM's CPU build here, `ddk-cache[vllm-cpu]`), tested value for value against the HF engine.

One vLLM engine is started for the module (start-up takes half a minute or more on 2 cores) and shared by the
in-process runs; the CLI runs (a SIGKILLed dump, a node of two) start their own, as users' do. The data-parallel
dump, which starts two engines of its own, is `test_vllm_data_parallel.py`: run beside this module's engine, three
engines shared 2 cores, and CI once saw it pass 600 s.
The teacher is a tiny Llama built from a config with head size 32: vLLM's CPU attention has kernels for head
sizes 32, 64, 80, ... only, not the 8 of the shared tiny teacher (which the bad-input test uses for that).

Where vLLM does not import, the whole module is skipped with the reason; `.ci/run` installs vLLM's CPU build,
so there it runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_tokenizer, write_corpus_manifest
from test_resume import KILLING_RUNNER

from ddk_cache.engines import EngineOptions, create_engine
from ddk_cache.engines.vllm_install import find_vllm
from ddk_cache.stages.teacher_dump import LayoutSettings, NodeSettings, TeacherDumpConfig, run_teacher_dump
from ddk_cache.store.api import open_store
from ddk_cache.store.capture import Capture

install = find_vllm()
pytestmark = pytest.mark.skipif(not install.usable, reason=f"vLLM does not run here: {install.refusal('--engine vllm', '--engine hf')}")

K = 16
QUANTUM = 1 / 32  # the default --logprob-scale: every stored log-prob is a multiple of it
ENGINE_TOLERANCE = 1e-4  # vLLM's and transformers' float32 kernels differ by ~1e-5 nats on this teacher
VLLM_FLAGS = ("--engine", "vllm", "--dtype", "float32", "--enforce-eager", "--windows-per-call", "4")


@pytest.fixture(scope="module")
def vllm_teacher(tiny_teacher, tmp_path_factory) -> Path:
    """The tiny teacher's tokenizer with a Llama of head size 32 (hidden 64, 2 heads, 1 KV head), seeded weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("vllm_teacher")
    copy_tokenizer(tiny_teacher, out)
    shared = LlamaConfig.from_pretrained(tiny_teacher)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=shared.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=128, initializer_range=0.2, bos_token_id=shared.bos_token_id,
                         eos_token_id=shared.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engine(vllm_teacher):
    """One vLLM engine for the module (windows_per_call 4: one shard per generate call)."""
    engine = create_engine("vllm", str(vllm_teacher), EngineOptions(dtype="float32", enforce_eager=True, windows_per_call=4), max_k=K)
    yield engine
    engine.close()  # the engine process ends now, not at interpreter exit


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus_manifest(tmp_path_factory.mktemp("vllm_corpus"))


def dump(teacher: Path, manifest: Path | None, out: Path, engine=None, capture: Capture = Capture(k=K), **settings) -> Path:
    """An in-process dump: with `engine` (the module's vLLM one), else the HF engine on the CPU in float32."""
    options = EngineOptions(dtype="float32", enforce_eager=True, windows_per_call=4) if engine is not None else \
        EngineOptions(device="cpu", dtype="float32")
    run_teacher_dump(TeacherDumpConfig(teacher=str(teacher), manifest=manifest, out=str(out), capture=capture,
                                       engine="vllm" if engine is not None else "hf", engine_options=options,
                                       layout=LayoutSettings(chunk_windows=2, shard_windows=4), progress=False, **settings), engine=engine)
    return out


def cli(*args: str, cwd: Path, runner: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """The real CLI in a child process, away from the checkout (the installed package runs), in a session of its own.

    Why the session: vLLM's engine processes outlive a SIGKILLed parent (README, "vLLM"), and would hold the output
    pipes open; the child's output goes to files instead, and whatever of its group is left is killed after it.
    """
    command = [sys.executable, str(runner)] if runner else [sys.executable, "-m", "ddk_cache.cli"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen([*command, *args], stdout=out, stderr=err, text=True, cwd=cwd, start_new_session=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        timed_out = False
        try:
            process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            timed_out = True  # say where it hung: the child's own log, not just the timeout
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
        if timed_out:
            raise AssertionError(f"{' '.join(map(str, args[:3]))}... ran past 600 s; its stderr ends:\n{stderr[-4000:]}\nstdout:\n{stdout[-1000:]}")
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def dump_args(teacher: Path, manifest: Path | None, out: Path, *extra: str) -> list[str]:
    args = ["teacher-dump", "--teacher", str(teacher), "--out", str(out), "--k", str(K), "--no-progress", *VLLM_FLAGS]
    if manifest is not None:
        args += ["--manifest", str(manifest), "--shard-windows", "4", "--chunk-windows", "2"]
    return [*args, *extra]


@pytest.fixture(scope="module")
def stores(vllm_teacher, corpus, engine, tmp_path_factory) -> tuple[Path, Path]:
    """The corpus dumped by the vLLM engine and by the HF engine (top-16, default quantization)."""
    tmp = tmp_path_factory.mktemp("vllm_stores")
    return dump(vllm_teacher, corpus, tmp / "vllm.zarr", engine), dump(vllm_teacher, corpus, tmp / "hf.zarr")


def assert_stores_agree(actual: Path, expected: Path, tolerance: float = ENGINE_TOLERANCE) -> None:
    """Same windows; same entry sets except at a near-tie of the smallest kept log-probs; every stored log-prob
    within one quantum (both sides round to 1/32 nat, so floats `tolerance` apart can round one quantum apart)
    and almost all of them identical; the rest mass likewise."""
    a, b = open_store(str(actual)), open_store(str(expected))
    assert a.domains == b.domains and a.capture == b.capture
    positions = differing = 0
    for domain in b.domains:
        for split in b.splits:
            x, y = a.read(domain, split), b.read(domain, split)
            np.testing.assert_array_equal(x.tokens, y.tokens)
            valid_x = np.ones(x.ids.shape, bool) if x.valid is None else x.valid
            valid_y = np.ones(y.ids.shape, bool) if y.valid is None else y.valid
            same = np.all((x.ids == y.ids) & (valid_x == valid_y), axis=-1)
            positions, differing = positions + same.size, differing + int((~same).sum())
            for n, t in zip(*np.nonzero(~same)):  # a swap at the boundary: the two sides' smallest kept log-probs tie
                low_x, low_y = x.logprobs[n, t][valid_x[n, t]].min(), y.logprobs[n, t][valid_y[n, t]].min()
                assert abs(low_x - low_y) <= QUANTUM + tolerance, (domain, split, n, t)
            for name in ("logprobs", "target_logprobs", "rest_logprobs"):
                u, v = getattr(x, name), getattr(y, name)
                if name == "logprobs":
                    u, v = u[same], v[same]
                    u, v = u[valid_x[same]], v[valid_y[same]]
                elif name == "rest_logprobs":
                    u, v = np.exp(u[same]), np.exp(v[same])  # masses: a log of a tiny rest is not comparable
                assert np.max(np.abs(u - v), initial=0) <= QUANTUM + tolerance, (domain, split, name)
                assert np.mean(u == v) > 0.97, (domain, split, name, np.mean(u == v))
    assert differing <= 0.01 * positions, f"{differing} of {positions} positions keep different entries"


def test_vllm_dump_equals_the_hf_engines(stores):
    vllm_store, hf_store = stores
    assert_stores_agree(vllm_store, hf_store)
    header = open_store(str(vllm_store)).header
    assert header.engine.name == "vllm" and header.engine.version == install.version
    assert header.engine.selected_by == "a loaded engine was passed to run_teacher_dump" and header.engine.settings["dtype"] == "float32"
    assert header.engine.settings["kv_cache_memory_bytes"] > 0, "the CPU KV cache is sized by ddk-cache, and recorded"
    for domain in header.domains:  # the teacher's validation loss, computed from the stored targets
        assert open_store(str(vllm_store)).teacher_valid_loss(domain) == pytest.approx(open_store(str(hf_store)).teacher_valid_loss(domain),
                                                                                       abs=1e-3)


def test_vllm_top_p_capture_equals_the_hf_engines(vllm_teacher, corpus, engine, tmp_path):
    capture = Capture(mode="topp", k=K, top_p=0.8)
    vllm_store = dump(vllm_teacher, corpus, tmp_path / "vllm.zarr", engine, capture)
    hf_store = dump(vllm_teacher, corpus, tmp_path / "hf.zarr", capture=capture)
    assert_stores_agree(vllm_store, hf_store)
    assert open_store(str(vllm_store)).read("prose", "train").valid is not None, "top-p keeps a variable number of entries"


def test_vllm_dump_killed_then_resumed_equals_an_uninterrupted_one(vllm_teacher, corpus, engine, stores, tmp_path):
    runner = tmp_path / "killing_runner.py"
    runner.write_text(KILLING_RUNNER)
    out = tmp_path / "killed.zarr"
    killed = cli(*dump_args(vllm_teacher, corpus, out), cwd=tmp_path, runner=runner, KILL_AT_SHARD="3", KILL_MODE="mid-shard")
    assert killed.returncode == -9, killed.stderr[-3000:]
    dump(vllm_teacher, corpus, out, engine)  # the same command again (in this process, with the module's engine)
    assert_stores_agree(out, stores[0])


def test_two_nodes_score_one_store_with_vllm(vllm_teacher, corpus, engine, stores, tmp_path):
    out = tmp_path / "nodes.zarr"
    with ThreadPoolExecutor(1) as pool:  # node 0 in a child process, node 1 here with the module's engine
        node0 = pool.submit(cli, *dump_args(vllm_teacher, corpus, out, "--num-nodes", "2", "--node-rank", "0"), cwd=tmp_path)
        dump(vllm_teacher, corpus, out, engine, nodes=NodeSettings(num_nodes=2, node_rank=1))
        result = node0.result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert open_store(str(out)).header.status == "complete"
    assert_stores_agree(out, stores[0])


def test_vllm_rollouts_repeat_and_their_behaviour_logprobs_are_the_students(tmp_path, vllm_teacher):
    """`rollout --generator vllm`: a seeded rollout repeats exactly; vLLM's own log-prob of every sampled token equals
    the behaviour log-prob the store holds (the student's teacher-forced transformers pass) within tolerance."""
    from test_rollout import MAX_NEW, write_prompt_manifest
    from vllm.inputs import TokensPrompt

    from ddk_cache.minillm.vllm_rollouts import request_params, vllm_generator
    from ddk_cache.stages.rollout import RolloutConfig, run_rollout
    from ddk_cache.store.reader import CacheReader

    eos = 2  # the tiny tokenizer's end-of-sequence id (test_rollout checks it)
    manifest = write_prompt_manifest(tmp_path)
    generate = vllm_generator(str(vllm_teacher), max_new_tokens=MAX_NEW, eos=eos, enforce_eager=True)
    config = RolloutConfig(student=str(vllm_teacher), prompts=manifest, out=str(tmp_path / "a.zarr"), seed=7, device="cpu",
                           batch_size=4, shard_windows=4, progress=False)
    run_rollout(config, generate)
    run_rollout(replace(config, out=str(tmp_path / "b.zarr")), generate)
    run_rollout(replace(config, out=str(tmp_path / "c.zarr"), seed=8), generate)
    a, b, c = (CacheReader(str(tmp_path / f"{name}.zarr"), allow_incomplete=True) for name in "abc")
    assert a.header.rollout.generator == "vllm"
    block_a, block_b, block_c = (reader.read_arrays("math", "train", reader.data_arrays) for reader in (a, b, c))
    for name in ("tokens", "response_mask", "behaviour_logprobs"):
        np.testing.assert_array_equal(block_a[name], block_b[name])
    assert not np.array_equal(block_a["tokens"], block_c["tokens"]), "another seed samples other answers"

    mask = block_a["response_mask"].astype(bool)
    prompts, sampled = [], []
    for row, tokens in zip(mask, block_a["tokens"]):
        first = int(np.argmax(row))  # position t predicts token t + 1: the response starts at token first + 1
        prompts.append(tokens[: first + 1].tolist())
        sampled.append(tokens[first + 1 : first + 1 + int(row.sum())].tolist())
    # the same requests again (the stage seeds the train split with seed * 1_000_003 + round * 2 + 1), now asking
    # vLLM for each sampled token's log-prob
    params = request_params(len(prompts), MAX_NEW, 7 * 1_000_003 + 1, eos, logprobs=0)
    outputs = generate.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    gaps = []
    for output, response, row, behaviour in zip(outputs, sampled, mask, block_a["behaviour_logprobs"]):
        ids = list(output.outputs[0].token_ids)[: len(response)]
        assert ids == response[: len(ids)], "the seeded request samples the stored answer again"
        vllm_lp = np.asarray([step[token].logprob for step, token in zip(output.outputs[0].logprobs, ids)], dtype=np.float32)
        gaps.append(float(np.max(np.abs(vllm_lp - behaviour[row][: len(ids)]), initial=0)))
    assert max(gaps) <= 0.5 / 1024 + ENGINE_TOLERANCE, gaps  # behaviour log-probs are stored to 1/1024 nat


BROKEN_VLLM = 'raise RuntimeError("operator torchvision::nms does not exist")\n'


def test_vllm_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_teacher, vllm_teacher, corpus):
    """A broken vLLM install, an absent one, a head size vLLM's CPU attention lacks, too small a KV cache, an
    architecture vLLM does not know, --mode sampled: one line each, exit 2, nothing written."""
    broken = tmp_path / "broken"
    (broken / "vllm").mkdir(parents=True)
    (broken / "vllm" / "__init__.py").write_text(BROKEN_VLLM)
    absent = tmp_path / "absent"
    absent.mkdir()
    (absent / "sitecustomize.py").write_text("import sys\nsys.modules['vllm'] = None\n")
    unknown = tmp_path / "unknown_architecture"
    shutil.copytree(vllm_teacher, unknown)
    (unknown / "config.json").write_text((vllm_teacher / "config.json").read_text().replace("LlamaForCausalLM", "FrobnicatorForCausalLM"))
    cases = [
        (vllm_teacher, (), {"PYTHONPATH": str(broken)}, "cannot be imported (RuntimeError: operator torchvision::nms does not exist)"),
        (vllm_teacher, (), {"PYTHONPATH": str(absent)}, "--engine vllm needs vLLM: pip install"),
        (tiny_teacher, (), {}, "vLLM's CPU attention has no kernel for the teacher's head size 8"),
        (vllm_teacher, (), {"VLLM_CPU_KVCACHE_SPACE": "0"}, "raise VLLM_CPU_KVCACHE_SPACE=<GiB>"),
        (unknown, (), {}, "['FrobnicatorForCausalLM'] are not supported"),
        (vllm_teacher, ("--mode", "sampled", "--draws", "8"), {}, "cannot capture --mode sampled"),
    ]
    from test_rollout import write_prompt_manifest

    outs, prompts = [tmp_path / f"never-{number}.zarr" for number in range(len(cases))], write_prompt_manifest(tmp_path)
    with ThreadPoolExecutor(2) as pool:  # two at a time: each child spends most of its time importing vLLM, on one core
        rollout = pool.submit(cli, "rollout", "--student", str(vllm_teacher), "--prompts", str(prompts), "--out", str(tmp_path / "r.zarr"),
                              "--generator", "vllm", "--no-progress", cwd=tmp_path, PYTHONPATH=str(broken))
        results = list(pool.map(lambda case, out: cli(*dump_args(case[0], corpus, out, *case[1]), cwd=tmp_path, **case[2]), cases, outs))
    for (_, _, _, message), out, result in zip(cases, outs, results):
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (message, result.stderr[-2000:])
        assert "Traceback" not in result.stderr.split("error:")[-1]
        assert not out.exists(), "nothing is written before the engine is up"
    result = rollout.result()  # the rollout generator says the same about a broken install
    assert result.returncode == 2 and "cannot be imported" in result.stderr and "--generator hf" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "r.zarr").exists()


def test_auto_takes_vllm_for_a_long_job_and_hf_for_a_short_one():
    from ddk_cache.engines.registry import CPU_BREAK_EVEN_TOKENS, choose_engine

    if torch.cuda.is_available():
        assert choose_engine("auto", tokens=1).name == "vllm", "on a GPU auto takes vLLM whatever the size"
        return
    short, long = choose_engine("auto", tokens=CPU_BREAK_EVEN_TOKENS - 1), choose_engine("auto", tokens=CPU_BREAK_EVEN_TOKENS)
    assert short.name == "hf" and "pays for itself" in short.reason
    assert long.name == "vllm" and install.version in long.reason
    assert choose_engine("auto", EngineOptions(device="cpu"), tokens=10**9).reason == "auto: --device is an option of the hf engine"
    assert choose_engine("auto", EngineOptions(enforce_eager=True), tokens=1).name == "vllm", "a vLLM option chooses vLLM"
    assert choose_engine("auto", drawn=True, tokens=10**9).name == "hf", "sampled capture needs the hf engine"


def test_a_dump_with_auto_says_which_engine_ran_and_why(vllm_teacher, corpus, tmp_path):
    result = cli("teacher-dump", "--teacher", str(vllm_teacher), "--manifest", str(corpus), "--out", str(tmp_path / "auto.zarr"),
                 "--k", str(K), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "teacher-dump: engine hf (auto: " in result.stderr and "pays for itself" in result.stderr
    assert "engine hf" in result.stdout
    assert "pays for itself" in open_store(str(tmp_path / "auto.zarr")).header.engine.selected_by
