"""`ddk-cache pack`, then `teacher-dump` on the packed store: the same store as one command, on one node
or on several; re-scoring the same windows with another teacher; a foreign tokenizer refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_resume import assert_same_store
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.errors import StoreError
from ddk_cache.store.header import StoreHeader
from ddk_cache.store.reader import CacheReader


def pack(manifest: Path, out: Path, tokenizer: Path, *extra: str, runner: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    entry = [str(runner)] if runner else ["-m", "ddk_cache.cli"]
    command = [sys.executable, *entry, "pack", "--manifest", str(manifest), "--out", str(out), "--tokenizer", str(tokenizer),
               "--shard-windows", "4", "--chunk-windows", "2", "--valid-fraction", "0.2", "--no-progress", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=out.parent, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def score_command(tiny_teacher: Path, out: Path, *extra: str) -> list[str]:
    """`teacher-dump` without a manifest: the packed store at `out` is scored in place (its layout is fixed)."""
    return [sys.executable, "-m", "ddk_cache.cli", "teacher-dump", "--teacher", str(tiny_teacher), "--out", str(out), "--k", "8",
            "--device", "cpu", "--no-progress", *extra]


def score(tiny_teacher: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(score_command(tiny_teacher, out, *extra), capture_output=True, text=True, timeout=300, cwd=out.parent,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def packed(reference_store, tiny_teacher, tmp_path_factory) -> Path:
    manifest, _ = reference_store
    out = tmp_path_factory.mktemp("packed") / "packed.zarr"
    result = pack(manifest, out, tiny_teacher)
    assert result.returncode == 0, result.stderr
    return out


def test_pack_writes_windows_only_and_scoring_adds_the_teacher(packed, reference_store, tiny_teacher, tmp_path):
    manifest, _ = reference_store
    root = zarr.open_group(str(packed), mode="r")
    header = root.attrs["ddk_cache"]
    assert header["status"] == "packed" and "teacher" not in header and header["packing"]["split_rule"] == "document-hash-v1"
    for domain in header["domains"]:
        for split in ("train", "valid"):
            assert list(root[f"{domain}/{split}"].array_keys()) == ["tokens"]
            assert root[f"{domain}/{split}/tokens"].shape[0] == root[domain].attrs["ddk_cache_domain"][split]["windows"] > 0
    with pytest.raises(StoreError, match="is packed but not scored yet: score it with `ddk-cache teacher-dump"):
        CacheReader(str(packed))  # nothing to train on yet
    inspected = CliRunner().invoke(app, ["inspect", str(packed)], env={"COLUMNS": "200"})
    assert inspected.exit_code == 0 and "(packed)" in inspected.output and "packed windows only" in inspected.output
    verified = CliRunner().invoke(app, ["verify", str(packed)])
    assert verified.exit_code == 1 and "status is 'packed'" in verified.stderr  # only that: every window shard is there and decodes
    assert len([line for line in verified.stderr.splitlines() if line.startswith("problem:")]) == 1

    again = pack(manifest, packed, tiny_teacher)  # the same data: nothing to do
    assert again.returncode == 0 and "already packed" in again.stdout
    elsewhere = tmp_path / "again.zarr"
    assert pack(manifest, elsewhere, tiny_teacher).returncode == 0
    assert_same_store(elsewhere, packed, volatile=("created_at", "packed_at"))  # deterministic, run to run

    scored = tmp_path / "scored.zarr"
    shutil.copytree(packed, scored)
    result = score(tiny_teacher, scored)
    assert result.returncode == 0, result.stderr
    reader = CacheReader(str(scored))
    assert reader.complete and reader.header.packing.to_dict() == header["packing"] and reader.header.teacher.vocab_size > 0
    verified = CliRunner().invoke(app, ["verify", str(scored)])
    assert verified.exit_code == 0, verified.output
    for domain in reader.domains:
        np.testing.assert_array_equal(reader.read(domain, "train").tokens, root[f"{domain}/train/tokens"][:])


def test_three_nodes_score_a_packed_store(packed, tiny_teacher, tmp_path):
    reference = tmp_path / "one-node.zarr"
    shutil.copytree(packed, reference)
    assert score(tiny_teacher, reference).returncode == 0
    scored = tmp_path / "scored.zarr"
    shutil.copytree(packed, scored)
    # node 0 scores with two data-parallel engine processes: they read their shards' windows from the store themselves
    processes = [subprocess.Popen(score_command(tiny_teacher, scored, "--num-nodes", "3", "--node-rank", str(rank),
                                                *(("--data-parallel", "2") if rank == 0 else ())), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
                 for rank in range(3)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [e[-2000:] for _, e in outputs]
    assert_same_store(scored, reference)


def test_the_same_windows_rescored_by_another_teacher_and_a_foreign_tokenizer_refused(packed, tiny_teacher, tmp_path):
    """Another team copies the packed store and scores it with its own teacher (same tokenizer, other weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other_teacher"
    shutil.copytree(tiny_teacher, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.5)
    model.save_pretrained(other)
    first, second = tmp_path / "team_a.zarr", tmp_path / "team_b.zarr"
    for copy, teacher in ((first, tiny_teacher), (second, other)):
        shutil.copytree(packed, copy)
        result = score(teacher, copy)
        assert result.returncode == 0, result.stderr
    a, b = CacheReader(str(first)), CacheReader(str(second))
    assert a.header.identity["teacher"] != b.header.identity["teacher"]
    for domain in a.domains:
        block_a, block_b = a.read(domain, "train"), b.read(domain, "train")
        np.testing.assert_array_equal(block_a.tokens, block_b.tokens)  # the same windows ...
        assert not np.array_equal(block_a.target_logprobs, block_b.target_logprobs)  # ... other teachers

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["completely different text"] * 20, trainer=trainers.BpeTrainer(vocab_size=260, special_tokens=["<unk>"], show_progress=False))
    foreign = tmp_path / "foreign_tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>").save_pretrained(foreign)
    third = tmp_path / "team_c.zarr"
    shutil.copytree(packed, third)
    refused = score(tiny_teacher, third, "--tokenizer", str(foreign))
    assert refused.returncode == 2 and "differs from the one" in refused.stderr and "was packed with" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert zarr.open_group(str(third), mode="r").attrs["ddk_cache"]["status"] == "packed"  # untouched


def test_bad_pack_and_score_inputs_are_one_line(reference_store, tiny_teacher, tmp_path):
    manifest, _ = reference_store
    missing = score(tiny_teacher, tmp_path / "nothing.zarr")
    assert missing.returncode == 2 and "run `ddk-cache pack` first" in missing.stderr
    layout = score(tiny_teacher, tmp_path / "nothing.zarr", "--shard-windows", "8")
    assert layout.returncode == 2
    other_file = tmp_path / "notes.txt"
    other_file.write_text("keep me")
    result = pack(manifest, tmp_path / "notes.txt", tiny_teacher)
    assert result.returncode == 2 and other_file.read_text() == "keep me"
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_packed_header_round_trips_and_is_not_scored(packed):
    raw = dict(zarr.open_group(str(packed), mode="r").attrs["ddk_cache"])
    header = StoreHeader.from_dict(raw)
    assert header.to_dict() == raw and not header.scored and header.teacher is None and header.status == "packed"
    assert header.split_rule == "document-hash-v1" and header.layout.vocab_size is None and header.packed_at is not None
