"""Real, tiny components for tests: a BPE tokenizer trained here, a Llama built from a config,
and small multi-domain text files. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DOMAIN_WORDS = {
    "prose": "the a river town people walked slowly under bright morning light while children sang old songs".split(),
    "code": "def return self if else for in range print import class lambda yield none true false".split(),
    "math": "one two three plus minus times equals half double sum total apples cost dollars each".split(),
}


def make_documents(domain: str, n_docs: int, seed: int, min_words: int = 20, max_words: int = 80) -> list[str]:
    rng = random.Random(f"{domain}-{seed}")
    words = DOMAIN_WORDS[domain]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))) for _ in range(n_docs)]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 2-layer Llama (random weights, fixed seed) with a BPE tokenizer trained on the test domains."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_teacher")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<bos>", "<eos>"], show_progress=False)
    corpus = [doc for domain in DOMAIN_WORDS for doc in make_documents(domain, 50, seed=99)]
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,  # sharper than the default, so top-k orderings are well separated
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def copy_tokenizer(source: Path, out: Path) -> None:
    """The tokenizer files of the model folder `source`, for another model built on the same vocabulary."""
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def corpus_manifest(tmp_path) -> Path:
    return write_corpus_manifest(tmp_path)


@pytest.fixture(scope="session")
def tiny_store(tiny_teacher, tmp_path_factory) -> Path:
    """A complete k=8 store of the 3-domain corpus, dumped once for the stage-two tests."""
    from ddk_cache.engines import EngineOptions
    from ddk_cache.stages.teacher_dump import LayoutSettings, TeacherDumpConfig, run_teacher_dump
    from ddk_cache.store.capture import Capture

    tmp = tmp_path_factory.mktemp("tiny_store")
    out = tmp / "cache.zarr"
    run_teacher_dump(TeacherDumpConfig(teacher=str(tiny_teacher), manifest=write_corpus_manifest(tmp), out=str(out), capture=Capture(k=8),
                                       engine_options=EngineOptions(device="cpu"), layout=LayoutSettings(chunk_windows=4, shard_windows=8), progress=False))
    return out


def write_corpus_manifest(tmp_path: Path) -> Path:
    """A 3-domain manifest over local json and text files, exercising field and template sources."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "prose.jsonl", [{"text": d} for d in make_documents("prose", 40, seed=1)])
    (data / "code.txt").write_text("\n\n".join(make_documents("code", 40, seed=2)) + "\n")
    math_docs = make_documents("math", 40, seed=3)
    write_jsonl(data / "math.jsonl", [{"question": d[: len(d) // 2], "answer": d[len(d) // 2 :]} for d in math_docs])
    manifest = {
        "seq_len": 16,
        "seed": 7,
        "domains": [
            {"name": "prose", "sources": [{"path": "json", "data_files": "data/prose.jsonl"}], "valid_sequences": 4},
            {
                "name": "code",
                "sources": [{"path": "text", "data_files": ["data/code.txt"], "load_kwargs": {"sample_by": "paragraph"}}],
                "valid_sequences": 3,
                "token_budget": 320,
            },
            {
                "name": "math",
                "sources": [{"path": "json", "data_files": "data/math.jsonl", "template": "Q: {question}\nA: {answer}"}],
                "valid_sequences": 2,
                "weight": 2.0,
            },
        ],
    }
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def dump_command(tiny_teacher: Path, manifest: Path, out: Path | str, runner: Path | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """`ddk-cache teacher-dump` of the corpus manifest with the tiny teacher (k 8, shards of 4 windows), optionally through a runner."""
    args = ["--teacher", str(tiny_teacher), "--manifest", str(manifest), "--out", str(out)]
    args += ["--k", "8", "--shard-windows", "4", "--chunk-windows", "2", "--device", "cpu", "--no-progress", *extra]
    return [sys.executable, str(runner), "teacher-dump", *args] if runner else [sys.executable, "-m", "ddk_cache.cli", "teacher-dump", *args]


def run_dump(
    tiny_teacher: Path, manifest: Path, out: Path, runner: Path | None = None, extra: tuple[str, ...] = (), **env: str
) -> subprocess.CompletedProcess:
    command = dump_command(tiny_teacher, manifest, out, runner, extra)
    # cwd away from the checkout, so the installed package is imported, not the source tree
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=300, cwd=out.parent)


@pytest.fixture(scope="session")
def reference_store(tiny_teacher, tmp_path_factory) -> tuple[Path, Path]:
    """The corpus manifest and its store, dumped by the CLI in one uninterrupted process (k 8, shards of 4 windows)."""
    tmp = tmp_path_factory.mktemp("reference")
    manifest = write_corpus_manifest(tmp)
    out = tmp / "uninterrupted.zarr"
    result = run_dump(tiny_teacher, manifest, out)
    assert result.returncode == 0, result.stderr
    return manifest, out


def write_other_tokenizer(folder: Path) -> Path:
    """A real tokenizer trained on other text: every id means another token than the tiny teacher's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["completely different text for another vocabulary"] * 20,
                            trainer=trainers.BpeTrainer(vocab_size=260, special_tokens=["<unk>", "<eos>"], show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_student(tiny_teacher, tmp_path) -> Path:
    """A 1-layer Llama with real (random, seeded) weights and the cache's tokenizer, loadable by from_pretrained."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    return tmp_path / "student"
