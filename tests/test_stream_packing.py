"""The streaming packer: the document-hash split never lets validation text into training (duplicates
included), a killed `pack` resumes to the uninterrupted store, and bad settings are one line."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_documents, write_jsonl
from test_pack import pack
from test_resume import assert_same_store

from ddk_cache.data.manifest import load_manifest
from ddk_cache.data.streamed_packing import PackProgress, StreamPacker, valid_share
from ddk_cache.errors import ManifestError
from ddk_cache.stages.pack import load_tokenizer


def corpus(tmp_path: Path, documents: list[str], valid_sequences: int = 3, budget: int | None = None) -> Path:
    write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in documents])
    domain = {"name": "prose", "sources": [{"path": "json", "data_files": "docs.jsonl"}], "valid_sequences": valid_sequences}
    if budget:
        domain["token_budget"] = budget
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"seq_len": 16, "seed": 5, "domains": [domain]}))
    return manifest


def split_texts(manifest: Path, tokenizer, fraction: float, shard_windows: int = 4) -> dict[str, str]:
    """Each split's token stream, rebuilt from its windows (they overlap by one token), decoded."""
    spec = load_manifest(manifest)
    packer = StreamPacker(spec.domains[0], tokenizer, spec.seq_len, spec.seed, shard_windows, fraction)
    windows: dict[str, list[np.ndarray]] = {"train": [], "valid": []}
    for shard in packer.shards():
        windows[shard.split] += list(shard.windows)
    streams = {name: np.concatenate([w[0][:1]] + [x[1:] for x in w]) for name, w in windows.items()}
    return {name: tokenizer.decode(stream.tolist()) for name, stream in streams.items()}


def test_no_validation_document_reaches_training_not_even_a_duplicate(tiny_teacher, tmp_path):
    tokenizer = load_tokenizer(str(tiny_teacher), None)
    documents = make_documents("prose", 120, seed=11, min_words=12, max_words=20)
    fraction = 0.25
    to_valid = [d for d in documents if valid_share(5, "prose", d) < fraction]
    assert 10 < len(to_valid) < 60  # the rule sends about a quarter of the documents to validation
    documents += to_valid[:5]  # exact duplicates of validation documents, later in the stream
    texts = split_texts(corpus(tmp_path, documents, valid_sequences=3), tokenizer, fraction)
    assert not any(d in texts["train"] for d in to_valid)  # neither the first copy nor the duplicate
    assert to_valid[0] in texts["valid"]  # validation is filled from the first documents hashed to it
    assert sum(d in texts["train"] for d in documents if d not in to_valid) > 40


def test_a_sharded_source_streams_its_files_in_order(tiny_teacher, tmp_path):
    """One source over several files packs like the same documents in one file (file order, then row order)."""
    tokenizer = load_tokenizer(str(tiny_teacher), None)
    documents = make_documents("code", 90, seed=4)
    (tmp_path / "one").mkdir()
    one = split_texts(corpus(tmp_path / "one", documents), tokenizer, 0.2)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for i in range(3):
        write_jsonl(sharded / f"part-{i}.jsonl", [{"text": d} for d in documents[i * 30 : (i + 1) * 30]])
    (sharded / "manifest.yaml").write_text(yaml.safe_dump({"seq_len": 16, "seed": 5, "domains": [{"name": "prose", "valid_sequences": 3,
        "sources": [{"path": "json", "data_files": [f"part-{i}.jsonl" for i in range(3)]}]}]}))
    assert split_texts(sharded / "manifest.yaml", tokenizer, 0.2) == one


def test_progress_round_trips_and_resuming_from_it_continues_the_same_shards(tiny_teacher, tmp_path):
    tokenizer = load_tokenizer(str(tiny_teacher), None)
    manifest = corpus(tmp_path, make_documents("code", 150, seed=2), valid_sequences=2, budget=16 * 50)
    spec = load_manifest(manifest)
    packer = StreamPacker(spec.domains[0], tokenizer, 16, 5, 4, 0.1)
    straight = list(packer.shards())
    commits = [i for i, s in enumerate(straight) if s.commit is not None and not s.commit.done]
    cut = commits[len(commits) // 2]
    progress = PackProgress.from_attrs(json.loads(json.dumps(straight[cut].commit.to_attrs())))
    resumed = list(packer.shards(progress))
    assert [(s.split, s.first_window) for s in resumed] == [(s.split, s.first_window) for s in straight[cut + 1 :]]
    for a, b in zip(resumed, straight[cut + 1 :]):
        np.testing.assert_array_equal(a.windows, b.windows)
    assert sum(len(s.windows) for s in straight if s.split == "train") == 50  # the budget, exactly


KILLING_RUNNER = textwrap.dedent(
    """
    import os, signal, sys
    from ddk_cache.store import writer as cache_writer

    kill_at, calls, write = int(os.environ["KILL_AT_WRITE"]), [0], cache_writer.CacheWriter.write_windows

    def write_then_die(self, *args):
        write(self, *args)
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    cache_writer.CacheWriter.write_windows = write_then_die
    from ddk_cache.cli.main import main
    sys.argv = ["ddk-cache", *sys.argv[1:]]
    main()
    """
)


@pytest.mark.parametrize("kill_at", [3, 9])
def test_killed_pack_resumes_to_the_uninterrupted_store(reference_store, tiny_teacher, tmp_path, kill_at):
    manifest, _ = reference_store
    straight = tmp_path / "straight.zarr"
    assert pack(manifest, straight, tiny_teacher).returncode == 0
    runner = tmp_path / "runner.py"
    runner.write_text(KILLING_RUNNER)
    killed = tmp_path / "killed.zarr"
    result = pack(manifest, killed, tiny_teacher, runner=runner, KILL_AT_WRITE=str(kill_at))
    assert result.returncode == -9, result.stderr
    assert yaml.safe_load((killed / "zarr.json").read_text())["attributes"]["ddk_cache"]["status"] == "packing"
    resumed = pack(manifest, killed, tiny_teacher)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_store(killed, straight, volatile=("created_at", "packed_at"))


def test_bad_streaming_settings_are_one_line(reference_store, tiny_teacher, tmp_path):
    manifest, _ = reference_store
    for extra, message in [(("--valid-fraction", "0"), "--valid-fraction must be in (0, 1), got 0.0"),
                           (("--valid-fraction", "0.0001"), "validation windows (about 0% of the documents go to validation)")]:
        result = pack(manifest, tmp_path / "bad.zarr", tiny_teacher, *extra)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(ManifestError, match="no text"):
        tokenizer = load_tokenizer(str(tiny_teacher), None)
        list(StreamPacker(load_manifest(corpus(tmp_path, ["   "])).domains[0], tokenizer, 16, 5, 4, 0.5).shards())


def test_pack_refuses_what_the_manifest_path_refuses(tiny_teacher, tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"body": d} for d in make_documents("math", 30, seed=1)])
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"seq_len": 16, "seed": 5, "domains": [
        {"name": "math", "sources": [{"path": "json", "data_files": "rows.jsonl", "text_field": "text"}]}]}))
    result = pack(manifest, tmp_path / "out.zarr", tiny_teacher)
    assert result.returncode == 2 and "text field 'text' is not a column (columns: body)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "broken.txt").write_bytes(b"caf\xe9 au lait\n" * 50)  # Latin-1, not UTF-8
    manifest.write_text(yaml.safe_dump({"seq_len": 16, "seed": 5, "domains": [
        {"name": "prose", "sources": [{"path": "text", "data_files": "broken.txt"}]}]}))
    result = pack(manifest, tmp_path / "out2.zarr", tiny_teacher)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
