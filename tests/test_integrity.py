"""A damaged store is never trained on: every class of corruption the audit found is caught by `verify`
and refused by the readers (`distill`, `eval`) in one line, exit 2, naming what is damaged.

The classes: a deleted shard object (reads back as zeros), a shard copied over another shard of the same
array, a shard copied from another domain, a valid shard copied into train, an edited codec parameter in an
array's zarr.json (`scale`), a truncated chunk, deleted array metadata, deleted checksums.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_distill import make_student
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.errors import StoreError
from ddk_cache.store.reader import CacheReader


def shard_object(store: Path, path: str, shard: int) -> Path:
    """The object of shard `shard` of a sharded array (zarr v3 default chunk keys)."""
    array = zarr.open_array(str(store / path), mode="r")
    return store / path / "c" / str(shard) / "/".join("0" * (array.ndim - 1))


def delete_shard(store: Path) -> tuple[str, str]:
    shard_object(store, "code/train/ids", 1).unlink()
    return "code/train/ids chunk 2 (shard 1) does not match its checksum", "code/train shard 1: object missing for ids"


def copied(store: Path, source: str, source_shard: int, target: str, target_shard: int) -> tuple[str, str]:
    """Copy one shard object over another; the reader's and verify's messages for it (2 chunks per shard here)."""
    shutil.copyfile(shard_object(store, source, source_shard), shard_object(store, target, target_shard))
    mismatch = f"{target} chunk {2 * target_shard} (shard {target_shard}) does not match its checksum"
    return mismatch, f"{target.rsplit('/', 1)[0]} shard {target_shard}: {mismatch}"


def shard_over_shard(store: Path) -> tuple[str, str]:
    return copied(store, "code/train/logprobs", 0, "code/train/logprobs", 1)


def shard_from_other_domain(store: Path) -> tuple[str, str]:
    return copied(store, "prose/train/ids", 0, "code/train/ids", 0)


def valid_into_train(store: Path) -> tuple[str, str]:
    return copied(store, "code/valid/tokens", 0, "code/train/tokens", 0)


def edited_scale(store: Path) -> tuple[str, str]:
    meta_path = store / "code" / "train" / "logprobs" / "zarr.json"
    text = meta_path.read_text()
    assert '"scale": 32' in text
    meta_path.write_text(text.replace('"scale": 32', '"scale": 16'))
    return "code/train/logprobs has encoding", "code/train/logprobs has encoding {'name': 'fixed_scale', 'scale': 16}"


def truncated_chunk(store: Path) -> tuple[str, str]:
    path = shard_object(store, "code/train/ids", 0)
    path.write_bytes(path.read_bytes()[:-100])  # the shard index at the end is cut
    return "code/train/ids rows 0-20 cannot be decoded (Stored and computed checksum do not match", "code/train shard 0: code/train/ids rows 0-8 cannot be decoded"


def deleted_metadata(store: Path) -> tuple[str, str]:
    (store / "code" / "train" / "rest_logprobs" / "zarr.json").unlink()
    return "code/train/rest_logprobs is missing", "code/train/rest_logprobs is missing"


def deleted_checksums(store: Path) -> tuple[str, str]:
    shutil.rmtree(store / "code" / "train" / "crc32")
    return "code/train: the checksums of tokens are missing", "code/train: the checksums of tokens are missing"  # once per array, not per shard


CORRUPTIONS = [delete_shard, shard_over_shard, shard_from_other_domain, valid_into_train, edited_scale, truncated_chunk,
               deleted_metadata, deleted_checksums]


@pytest.fixture
def store(tiny_store, tmp_path) -> Path:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    return copy


def read_everything(store: Path) -> None:
    reader = CacheReader(str(store))
    for domain in reader.domains:
        for split in ("train", "valid"):
            reader.read(domain, split)


def test_an_intact_store_reads_and_its_checksums_are_declared(store):
    read_everything(store)
    assert CacheReader(str(store)).header.integrity is not None


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=[c.__name__ for c in CORRUPTIONS])
def test_every_corruption_is_refused_by_the_reader_and_found_by_verify(store, corrupt):
    refused_with, reported_as = corrupt(store)
    with pytest.raises(StoreError) as refused:
        read_everything(store)
    message = str(refused.value)
    assert refused_with in message and "ddk-cache verify" in message and "\n" not in message
    result = CliRunner().invoke(app, ["verify", str(store)])
    assert result.exit_code == 1, result.output
    assert f"problem: {reported_as}" in result.stderr, result.stderr


def test_distill_refuses_a_damaged_store_in_one_line_and_eval_of_intact_valid_runs(store, tiny_teacher, tmp_path):
    for domain in ("code", "prose", "math"):  # every training shard gone: the first batch reads one
        for shard in (store / domain / "train" / "ids" / "c").iterdir():
            shutil.rmtree(shard)
    student = make_student(tmp_path / "student", tiny_teacher)
    result = CliRunner().invoke(app, ["distill", "--store", str(store), "--student", str(student), "--out", str(tmp_path / "run"),
                                      "--steps", "4", "--batch-size", "4", "--eval-windows", "2", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "/train/ids chunk" in result.stderr and "does not match its checksum" in result.stderr
    evaluated = CliRunner().invoke(app, ["eval", str(tiny_teacher), str(store), "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output  # eval reads valid/ only, which is intact


def test_a_damaged_validation_shard_stops_eval_in_one_line(store, tiny_teacher):
    shard_object(store, "prose/valid/target_logprobs", 0).unlink()
    result = CliRunner().invoke(app, ["eval", str(tiny_teacher), str(store), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "prose/valid/target_logprobs chunk 0 (shard 0) does not match its checksum" in result.stderr


def test_lossless_codec_settings_may_differ(store):
    """Re-compressing with another blosc level changes bytes, not values: still accepted."""
    meta_path = store / "code" / "train" / "ids" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    text = json.dumps(meta).replace('"clevel": 6', '"clevel": 3')
    assert text != json.dumps(meta)
    meta_path.write_text(text)
    read_everything(store)


def test_stores_without_checksums_still_read_and_verify_says_what_it_cannot_check(store):
    header_path = store / "zarr.json"
    meta = json.loads(header_path.read_text())
    del meta["attributes"]["ddk_cache"]["integrity"]
    header_path.write_text(json.dumps(meta))
    for crc in store.rglob("crc32"):
        shutil.rmtree(crc)
    read_everything(store)
    result = CliRunner().invoke(app, ["verify", str(store)])
    assert result.exit_code == 0 and "note: written before chunk checksums existed" in result.stderr
    assert np.isfinite(CacheReader(str(store)).read("code", "train").logprobs).all()


def test_a_corrupted_checksum_object_is_one_line(store):
    checksums = store / "code" / "train" / "crc32" / "ids" / "c" / "0"
    checksums.write_bytes(b"\x01\x02\x03")  # not the 2 uint32 of a shard: undecodable
    with pytest.raises(StoreError, match=r"code/train/checksums of ids rows 0-20 cannot be decoded .*ddk-cache verify"):
        read_everything(store)
