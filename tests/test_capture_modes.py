"""The four capture modes end to end through the CLI, and version-1 stores still read and train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from test_distill import distill, make_student
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.store.format import SPLITS
from ddk_cache.store.reader import CacheReader


def dump(tiny_teacher, manifest, out, *extra: str):
    args = ["teacher-dump", "--teacher", str(tiny_teacher), "--manifest", str(manifest), "--out", str(out),
            "--shard-windows", "8", "--chunk-windows", "4", "--device", "cpu", "--no-progress", *extra]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def sampled_store(tiny_teacher, tmp_path_factory) -> Path:
    from conftest import write_corpus_manifest

    tmp = tmp_path_factory.mktemp("sampled")
    out = tmp / "sampled.zarr"
    result = dump(tiny_teacher, write_corpus_manifest(tmp), out, "--mode", "sampled", "--draws", "16", "--seed", "5")
    assert result.exit_code == 0, result.output
    return out


def test_sampled_store_holds_distinct_ids_and_counts(sampled_store):
    reader = CacheReader(str(sampled_store))
    assert reader.header.capture.capture.mode == "sampled" and reader.header.capture.capture.draws == 16
    group = zarr.open_group(str(sampled_store), mode="r")["code/train"]
    assert set(group.array_keys()) == {"tokens", "ids", "counts", "n_entries", "target_logprobs", "shard_done"}
    counts, n = group["counts"][:], group["n_entries"][:]
    assert (counts.sum(-1) == 16).all()  # every draw is counted once
    assert ((counts > 0).sum(-1) == n).all() and n.max() <= 16
    block = reader.read("code", "train")
    ids = np.where(block.valid, block.ids, -1)
    assert all(np.all(np.diff(row[row >= 0]) > 0) for row in ids.reshape(-1, 16))  # distinct, ascending


def test_sampled_dump_resumes_to_the_same_draws(sampled_store, tiny_teacher, tmp_path):
    from conftest import write_corpus_manifest

    group = zarr.open_group(str(sampled_store), mode="r+")["prose/train"]
    before = {name: group[name][:] for name in ("ids", "counts")}
    group["counts"][:8] = 0  # a lost shard: unmarked, wrong data
    group["shard_done"][0] = 0
    header = dict(zarr.open_group(str(sampled_store), mode="r").attrs["ddk_cache"])
    zarr.open_group(str(sampled_store), mode="r+").attrs["ddk_cache"] = {**header, "status": "writing"}
    manifest = write_corpus_manifest(tmp_path)
    result = dump(tiny_teacher, manifest, sampled_store, "--mode", "sampled", "--draws", "16", "--seed", "5")
    assert result.exit_code == 0, result.output
    assert "shards written 1" in result.output
    for name, values in before.items():
        np.testing.assert_array_equal(group[name][:], values)


@pytest.fixture(scope="module")
def headtail_store(tiny_teacher, tmp_path_factory) -> Path:
    from conftest import write_corpus_manifest

    tmp = tmp_path_factory.mktemp("headtail")
    out = tmp / "headtail.zarr"
    result = dump(tiny_teacher, write_corpus_manifest(tmp), out, "--mode", "headtail", "--k", "4", "--draws", "16", "--seed", "5")
    assert result.exit_code == 0, result.output
    return out


def test_headtail_store_holds_the_exact_head_then_the_tails_draws(headtail_store, tiny_teacher, tmp_path):
    """Issue 27: the first k entries are a top-k store's (same ids, same log-probs, same rest), then the distinct
    tail draws, none of them a head id, with log(count / draws) adding up to one; read back, the tail carries the
    rest's mass shared out by the draws, and the entries sum to one."""
    from conftest import write_corpus_manifest

    reader = CacheReader(str(headtail_store))
    capture = reader.header.capture.capture
    assert (capture.mode, capture.k, capture.draws, capture.width) == ("headtail", 4, 16, 20)
    group = zarr.open_group(str(headtail_store), mode="r")["code/train"]
    assert set(group.array_keys()) == {"tokens", "ids", "logprobs", "n_entries", "rest_logprobs", "target_logprobs", "shard_done"}
    topk = tmp_path / "topk.zarr"
    assert dump(tiny_teacher, write_corpus_manifest(tmp_path), topk, "--k", "4").exit_code == 0
    exact = CacheReader(str(topk)).read("code", "train")
    block = reader.read("code", "train")
    np.testing.assert_array_equal(block.ids[..., :4], exact.ids)
    np.testing.assert_array_equal(block.logprobs[..., :4], exact.logprobs)
    assert block.rest_logprobs is None and block.valid[..., :5].all() and (block.valid.sum(-1) <= 20).all()
    tail_ids = np.where(block.valid[..., 4:], block.ids[..., 4:], -1)
    assert not (tail_ids[..., None, :] == block.ids[..., :4, None]).any()
    assert all(np.all(np.diff(row[row >= 0]) > 0) for row in tail_ids.reshape(-1, 16))
    tail_mass = np.where(block.valid[..., 4:], np.exp(block.logprobs[..., 4:].astype(np.float64)), 0).sum(-1)
    np.testing.assert_allclose(tail_mass, np.exp(exact.rest_logprobs.astype(np.float64)), rtol=2e-3)
    total = np.where(block.valid, np.exp(block.logprobs.astype(np.float64)), 0).sum(-1)
    np.testing.assert_allclose(total, 1.0, atol=0.05)
    assert CliRunner().invoke(app, ["verify", str(headtail_store)]).exit_code == 0


@pytest.mark.parametrize(("store", "steps", "biased", "message"), [
    ("sampled_store", "6", ("--divergence", "reverse_kl"),
     "holds sampled targets: sampled targets (sampled, headtail) are unbiased only with --divergence forward_kl"),
    ("headtail_store", "4", ("--temperature", "2"), "holds headtail targets: sampled targets (sampled, headtail) are draws at temperature 1"),
])
def test_distill_on_drawn_targets_trains_and_refuses_biased_losses(request, tiny_teacher, tmp_path, store, steps, biased, message):
    store = request.getfixturevalue(store)
    student = make_student(tmp_path / "student", tiny_teacher)
    result = distill(store, student, tmp_path / "run", "--steps", steps, "--update-every", str(int(steps) // 2))
    assert result.exit_code == 0, result.output
    result = distill(store, student, tmp_path / "run2", "--steps", steps, *biased)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "run2" / "metrics.jsonl").exists()


def test_verify_finds_a_tail_id_that_repeats_a_head_id(headtail_store, tmp_path):
    import shutil

    from test_verify import rewrite

    from ddk_cache.stages.verify_store import verify_url
    from ddk_cache.store.encodings import decoded

    copy = tmp_path / "edited.zarr"
    shutil.copytree(headtail_store, copy)
    group = zarr.open_group(str(copy), mode="r+")["math/valid"]
    ids, n = decoded(group["ids"], slice(0, 8)), group["n_entries"][0, 0]
    ids[0, 0, 4:n] = ids[0, 0, 0] + np.arange(n - 4)  # still ascending, but starting at the first head id
    assert ids[0, 0, n - 1] < CacheReader(str(copy)).header.teacher.vocab_size
    rewrite(group, "ids", slice(0, 8), ids)
    report = verify_url(str(copy))
    assert report.problems == ["math/valid shard 0: a tail id repeats a head id"], report.problems


def test_topp_store_has_variable_entries_and_trains(tiny_teacher, corpus_manifest, tmp_path):
    out = tmp_path / "topp.zarr"
    result = dump(tiny_teacher, corpus_manifest, out, "--mode", "topp", "--top-p", "0.5", "--k", "12", "--logprob-scale", "16")
    assert result.exit_code == 0, result.output
    reader = CacheReader(str(out))
    block = reader.read("prose", "train")
    entries = block.valid.sum(-1)
    assert entries.min() >= 1 and entries.max() <= 12 and len(np.unique(entries)) > 1
    kept = np.where(block.valid, np.exp(block.logprobs), 0).sum(-1)
    assert (kept + np.exp(block.rest_logprobs) == pytest.approx(1.0, abs=0.05))
    # the fewest entries reaching 0.5: dropping the least likely kept entry falls below it (quantization aside)
    smallest = np.where(block.valid, np.exp(block.logprobs), np.inf).min(-1)
    assert np.all((kept - smallest < 0.5 + 0.05) | (entries == 1))
    result = distill(out, make_student(tmp_path / "student", tiny_teacher), tmp_path / "run", "--steps", "4", "--update-every", "2")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("extra", "message"), [
    (["--draws", "16"], "--draws belongs to --mode sampled or headtail, not topk"),
    (["--mode", "sampled"], "sampled mode needs --draws"),
    (["--mode", "headtail", "--k", "4"], "headtail mode needs --draws"),
    (["--mode", "headtail", "--draws", "300"], "headtail mode needs --draws between 1 and 255, got 300"),
    (["--mode", "topp"], "topp mode needs --top-p"),
    (["--logprob-scale", "5000"], "--logprob-scale must be"),
])
def test_bad_capture_flags_exit_2_with_one_line(tiny_teacher, corpus_manifest, tmp_path, extra, message):
    result = dump(tiny_teacher, corpus_manifest, tmp_path / "x.zarr", *extra)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("mode", ["sampled", "headtail"])
def test_drawn_modes_refuse_the_vllm_engine_before_reading_data(tiny_teacher, corpus_manifest, tmp_path, mode):
    args = ["teacher-dump", "--teacher", str(tiny_teacher), "--manifest", str(corpus_manifest), "--out", str(tmp_path / "x.zarr"),
            "--mode", mode, "--draws", "8", "--engine", "vllm", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "the vllm engine cannot capture --mode sampled or headtail" in result.stderr
    assert not (tmp_path / "x.zarr").exists()


def write_version_1_copy(src: Path, dst: Path) -> None:
    """The same data in the version-1 layout (rank-free int32 ids, float16 log-probs, no rest), as older ddk-cache wrote it."""
    source, reader = zarr.open_group(str(src), mode="r"), CacheReader(str(src))
    header = dict(source.attrs["ddk_cache"])
    header.pop("integrity", None)  # version 1 had no chunk checksums
    k = reader.capture.k
    identity = {key: value for key, value in header["identity"].items() if key != "capture"}
    header.update(format_version=1, capture={"mode": "topk", "k": k, "seq_len": header["capture"]["seq_len"], "temperature": 1.0},
                  identity={**identity, "format_version": 1, "k": k})
    root = zarr.open_group(str(dst), mode="w", attributes={"ddk_cache": header})
    for domain in reader.domains:
        group = root.create_group(domain, attributes=dict(source[domain].attrs))
        for split in SPLITS:
            block = reader.read(domain, split)
            target = group.create_group(split)
            for name, values in (("tokens", block.tokens), ("topk_ids", block.ids.astype(np.int32)),
                                 ("topk_logprobs", block.logprobs.astype(np.float16)), ("target_logprobs", block.target_logprobs)):
                target.create_array(name, data=values, chunks=(4, *values.shape[1:]))
            target.create_array("shard_done", data=np.ones(2, dtype=np.uint8))


def test_version_1_store_is_read_and_distilled(tiny_store, tiny_teacher, tmp_path):
    old = tmp_path / "v1.zarr"
    write_version_1_copy(tiny_store, old)
    reader = CacheReader(str(old))
    assert reader.format_version == 1 and reader.capture.mode == "topk"
    block = reader.read("math", "train")
    assert block.valid is None and block.rest_logprobs is None and block.ids.shape[-1] == 8
    result = distill(old, make_student(tmp_path / "student", tiny_teacher), tmp_path / "run", "--steps", "4", "--update-every", "2")
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["inspect", str(old)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output


def test_resuming_a_version_1_store_is_refused_naming_the_version(tiny_store, tiny_teacher, corpus_manifest, tmp_path):
    old = tmp_path / "v1.zarr"
    write_version_1_copy(tiny_store, old)
    result = dump(tiny_teacher, corpus_manifest, old, "--k", "8")
    assert result.exit_code == 2
    assert "is a cache format version 1 store and this ddk-cache writes version 3: it can be read but not resumed" in result.stderr
    assert "--overwrite" in result.stderr and "Traceback" not in result.output
    assert CacheReader(str(old)).format_version == 1  # untouched


def write_version_2_copy(src: Path, dst: Path) -> None:
    """The same store as format 2 wrote it: ids, log-probs and target log-probs transformed inside zarr by numcodecs'
    `delta` and `fixedscaleoffset` codecs (the arrays TensorStore cannot open), checksums of the decoded values.
    benchmarks/bench_format3.py's copy, which measures the two formats' sizes on the same values."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_format3", Path(__file__).parents[1] / "benchmarks" / "bench_format3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.format_2_copy(str(src), str(dst))


def test_format_2_stores_are_still_read_with_the_same_values(tiny_store, tmp_path):
    old = tmp_path / "v2.zarr"
    write_version_2_copy(tiny_store, old)
    meta = zarr.open_group(str(old), mode="r")["math/train/logprobs"].metadata.to_dict()
    assert "numcodecs.fixedscaleoffset" in str(meta)  # truly the format-2 codec chain
    v2, v3 = CacheReader(str(old)), CacheReader(str(tiny_store))
    assert v2.format_version == 2 and v3.format_version == 3
    for domain in v3.domains:
        for split in SPLITS:
            a, b = v2.read(domain, split), v3.read(domain, split)
            for field in ("tokens", "ids", "logprobs", "valid", "rest_logprobs", "target_logprobs"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{domain}/{split}/{field}")
