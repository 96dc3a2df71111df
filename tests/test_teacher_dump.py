"""`ddk-cache teacher-dump` and `inspect` end to end on a tiny real model and real files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.data.manifest import load_manifest
from ddk_cache.data.packing import pack_domain
from ddk_cache.data.sources import load_domain_documents
from ddk_cache.engines import EngineOptions, create_engine
from ddk_cache.errors import StoreError
from ddk_cache.stages.teacher_dump import load_tokenizer
from ddk_cache.store.fingerprints import tokenizer_fingerprint
from ddk_cache.store.reader import CacheReader

K = 8


def dump(tiny_teacher, manifest, out, *extra: str):
    args = ["teacher-dump", "--teacher", str(tiny_teacher), "--manifest", str(manifest), "--out", str(out)]
    args += ["--k", str(K), "--shard-windows", "8", "--chunk-windows", "4", "--device", "cpu", "--no-progress", *extra]
    return CliRunner().invoke(app, args)


@pytest.fixture
def store(tmp_path, tiny_teacher, corpus_manifest) -> Path:
    out = tmp_path / "cache.zarr"
    result = dump(tiny_teacher, corpus_manifest, out)
    assert result.exit_code == 0, result.output
    return out


def test_store_is_plain_zarr_v3_with_documented_layout(store, corpus_manifest, tiny_teacher):
    root = zarr.open_group(str(store), mode="r")  # any Zarr v3 reader, no ddk-cache code
    header = root.attrs["ddk_cache"]
    assert header["format"] == "ddk-cache" and header["format_version"] == 3 and header["status"] == "complete"
    assert header["domains"] == ["prose", "code", "math"]
    assert header["capture"] == {**header["capture"], "mode": "topk", "k": K, "seq_len": 16, "temperature": 1.0}
    assert header["manifest"]["domains"][2]["weight"] == 2.0
    tokenizer = load_tokenizer(str(tiny_teacher), None)
    assert header["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert header["teacher"]["weights_sha256"].startswith("sha256:") and header["teacher"]["vocab_size"] == len(tokenizer)
    assert header["engine"]["name"] == "hf" and header["versions"]["zarr"] == zarr.__version__
    assert json.loads((store / "zarr.json").read_text())["zarr_format"] == 3
    split = root["prose/train"]
    n = root["prose"].attrs["ddk_cache_domain"]["train"]["windows"]
    expected = {"tokens": ((n, 17), "int32"), "ids": ((n, 16, K), "uint16"), "logprobs": ((n, 16, K), "int16"),
                "n_entries": ((n, 16), "uint8"), "rest_logprobs": ((n, 16), "float16"), "target_logprobs": ((n, 16), "int32")}
    for name, (shape, dtype) in expected.items():
        assert split[name].shape == shape and str(split[name].dtype) == dtype
        assert split[name].shards[0] == 8 and split[name].chunks[0] == 4
    assert split["shard_done"][:].tolist() == [1] * math.ceil(n / 8)
    # format 3: the stored integers and the documented rule give the values, with no ddk-cache code
    stored_ids = split["ids"][:4]
    assert split["ids"].attrs["ddk_cache_encoding"] == {"name": "delta", "axis": -1}
    reader = CacheReader(str(store))
    block = reader.read("prose", "train", 0, 4)
    np.testing.assert_array_equal(np.cumsum(stored_ids, axis=-1, dtype=np.int64), block.ids)
    scale = split["logprobs"].attrs["ddk_cache_encoding"]["scale"]
    np.testing.assert_array_equal((split["logprobs"][:4] / scale).astype(np.float32), block.logprobs)
    np.testing.assert_array_equal((split["target_logprobs"][:4] / 1024).astype(np.float32), block.target_logprobs)


def test_stored_values_equal_the_teacher_on_the_same_windows(store, corpus_manifest, tiny_teacher):
    manifest = load_manifest(corpus_manifest)
    tokenizer = load_tokenizer(str(tiny_teacher), None)
    engine = create_engine("hf", str(tiny_teacher), EngineOptions(device="cpu"))
    reader = CacheReader(str(store))
    for spec in manifest.domains:
        packed = pack_domain(spec.name, load_domain_documents(spec), tokenizer, 16, spec.valid_sequences, spec.token_budget, manifest.seed)
        for split in ("train", "valid"):
            block = reader.read(spec.name, split)
            np.testing.assert_array_equal(block.tokens, getattr(packed, split).windows)
            expected = engine.score(block.tokens, K)
            order = np.argsort(expected.topk_ids, axis=-1)  # the store keeps each position's entries sorted by id
            np.testing.assert_array_equal(block.ids, np.take_along_axis(expected.topk_ids, order, -1))
            exact = np.take_along_axis(expected.topk_logprobs, order, -1)
            np.testing.assert_allclose(block.logprobs, exact, rtol=0, atol=0.5 / 32 + 1e-6)  # 1/32-nat quantization
            rest = np.log1p(-np.exp(expected.topk_logprobs.astype(np.float64)).sum(-1))
            np.testing.assert_allclose(block.rest_logprobs, rest, rtol=2e-3, atol=1e-3)  # float16
            np.testing.assert_allclose(block.target_logprobs, expected.target_logprobs, atol=0.5 / 1024 + 1e-6)
        info = reader.domain_info(spec.name)
        valid_loss = -reader.read(spec.name, "valid").target_logprobs.astype(np.float64).mean()
        assert info.teacher_valid_loss == pytest.approx(valid_loss)
        assert info.teacher_valid_ppl == pytest.approx(math.exp(valid_loss))
    assert reader.domain_info("code").train.windows == 320 // 16  # the token budget


def test_inspect_shows_domains_sizes_perplexity_and_provenance(store):
    result = CliRunner().invoke(app, ["inspect", str(store)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    reader = CacheReader(str(store))
    for domain in ("prose", "code", "math"):
        info = reader.domain_info(domain)
        assert f"{info.teacher_valid_ppl:.3f}" in result.output
    for text in ("B/token", "teacher", "tokenizer fingerprint", reader.header.tokenizer.fingerprint, "complete"):
        assert text in result.output
    per_token = reader.bytes_stored("prose", "train") / reader.domain_info("prose").train.tokens
    assert 0 < per_token < 6 * K + 8  # compressed below raw int32 ids + float16 values + target


def test_rerun_on_complete_store_does_no_work_and_keeps_it(store, tiny_teacher, corpus_manifest):
    before = zarr.open_group(str(store), mode="r")["math/train/ids"][:]
    result = dump(tiny_teacher, corpus_manifest, store)
    assert result.exit_code == 0, result.output
    assert "shards written 0" in result.output
    np.testing.assert_array_equal(zarr.open_group(str(store), mode="r")["math/train/ids"][:], before)


def test_store_from_other_settings_is_refused_unless_overwrite(store, tiny_teacher, corpus_manifest):
    before = zarr.open_group(str(store), mode="r")["prose/train/ids"][:]
    args = ["teacher-dump", "--teacher", str(tiny_teacher), "--manifest", str(corpus_manifest), "--out", str(store), "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--k", "4", "--shard-windows", "8", "--chunk-windows", "4"])
    assert result.exit_code == 2
    assert "was made with a different capture (store: {'mode': 'topk', 'k': 8," in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.output
    np.testing.assert_array_equal(zarr.open_group(str(store), mode="r")["prose/train/ids"][:], before)

    result = CliRunner().invoke(app, [*args, "--k", "4", "--shard-windows", "8", "--chunk-windows", "4", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert CacheReader(str(store)).header.capture.capture.k == 4


def test_changed_manifest_or_teacher_is_refused(store, tiny_teacher, corpus_manifest, tmp_path):
    corpus_manifest.write_text(corpus_manifest.read_text().replace("seed: 7", "seed: 8"))
    result = dump(tiny_teacher, corpus_manifest, store)
    assert result.exit_code == 2 and "different manifest_sha256" in result.stderr

    corpus_manifest.write_text(corpus_manifest.read_text().replace("seed: 8", "seed: 7"))
    other_teacher = tmp_path / "other_teacher"
    other_teacher.mkdir()
    for path in Path(tiny_teacher).iterdir():
        (other_teacher / path.name).write_bytes(path.read_bytes())
    config = json.loads((other_teacher / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (other_teacher / "config.json").write_text(json.dumps(config))
    result = dump(other_teacher, corpus_manifest, store)
    assert result.exit_code == 2 and "different teacher" in result.stderr


def test_out_that_is_not_a_store_is_never_touched(tmp_path, tiny_teacher, corpus_manifest):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for extra in ((), ("--overwrite",)):
        result = dump(tiny_teacher, corpus_manifest, precious, *extra)
        assert result.exit_code == 2 and "not a ddk-cache store" in result.stderr
    assert (precious / "notes.txt").read_text() == "keep me"


def test_reader_refuses_incomplete_and_newer_stores(store):
    root = zarr.open_group(str(store), mode="r+")
    header = dict(root.attrs["ddk_cache"])
    root.attrs["ddk_cache"] = {**header, "status": "writing"}
    with pytest.raises(StoreError, match="is incomplete"):
        CacheReader(str(store))
    assert not CacheReader(str(store), allow_incomplete=True).complete
    root.attrs["ddk_cache"] = {**header, "format_version": 99}
    with pytest.raises(StoreError, match="format version 99; this ddk-cache reads versions 1, 2, 3: upgrade ddk-cache"):
        CacheReader(str(store))
    with pytest.raises(StoreError, match="no ddk-cache store"):
        CacheReader(str(store.parent / "missing.zarr"))
