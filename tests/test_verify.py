"""`ddk-cache verify` finds missing, corrupted and malformed shards, and passes intact stores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.store.encodings import array_encoding, decoded
from ddk_cache.store.integrity import checksum_array, decoded_like_zarr, write_checksums


@pytest.fixture
def store(tiny_store, tmp_path) -> Path:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, copy)
    return copy


def verify(store: Path):
    return CliRunner().invoke(app, ["verify", str(store)])


def test_intact_store_passes(store):
    result = verify(store)
    assert result.exit_code == 0, result.output
    assert "ok (" in result.output and "shards present, decoded, matching their checksums and well-formed" in result.output


def test_flipped_bytes_in_a_shard_are_caught_by_the_checksum(store):
    shard = store / "code" / "train" / "ids" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first inner chunk's compressed bytes
    shard.write_bytes(bytes(data))
    result = verify(store)
    assert result.exit_code == 1
    assert "code/train shard 0: code/train/ids rows 0-" in result.stderr and "cannot be decoded (" in result.stderr
    assert "1 problem(s)" in result.stderr


def test_a_missing_shard_object_is_reported_although_it_reads_as_zeros(store):
    (store / "math" / "valid" / "logprobs" / "c" / "0" / "0" / "0").unlink()
    assert zarr.open_group(str(store), mode="r")["math/valid/logprobs"][:].max() == 0  # silently the fill value
    result = verify(store)
    assert result.exit_code == 1 and "math/valid shard 0: object missing for logprobs" in result.stderr


def rewrite(group: zarr.Group, name: str, rows: slice, values: np.ndarray) -> None:
    """What a faulty writer would do: store malformed values *with* matching checksums (so the form checks see them);
    `values` are the array's values, stored through its format-3 encoding where it has one."""
    array = group[name]
    encoding = array_encoding(array.attrs)
    stored = values if encoding is None else encoding.encode(values, array.dtype)
    array[rows] = stored
    write_checksums(checksum_array(group, name), rows.start, decoded_like_zarr(stored, array.dtype, array.filters), array.chunks[0])


def test_malformed_entries_and_unmarked_shards_are_reported(store):
    group = zarr.open_group(str(store), mode="r+")["prose/train"]
    rewrite(group, "n_entries", slice(0, 8), np.full_like(group["n_entries"][:8], 9))  # more entries than the width (8)
    group["shard_done"][1] = 0
    rewrite(group, "ids", slice(8, 16), decoded(group["ids"], slice(8, 16))[..., ::-1])  # descending: not the documented order
    result = verify(store)
    assert result.exit_code == 1
    assert "prose/train shard 0: n_entries outside 1..8" in result.stderr
    assert "prose/train shard 1: not marked done" in result.stderr
    assert "prose/train shard 1: entry ids not strictly ascending" in result.stderr


def _delete(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    path.write_text(path.read_text()[:40])


@pytest.mark.parametrize(("damage", "node", "fragment"), [
    (_delete, "math/train", "math/train is missing (its zarr.json was deleted?)"),
    (_truncate, "math/train/ids", "math/train/ids's zarr.json is unreadable"),
    (_truncate, "math/train/crc32/ids", "math/train/crc32/ids's zarr.json is unreadable"),
    (_truncate, "math/valid/target_logprobs", "math/valid/target_logprobs's zarr.json is unreadable"),
])
def test_damaged_metadata_is_one_problem_in_verify_and_one_line_in_distill_and_eval(store, tiny_teacher, tmp_path, damage, node, fragment):
    """Issue 24, class 4: a deleted or truncated zarr.json ended verify and distill in a traceback."""
    from test_distill import distill, make_student
    from test_error_boundary import one_line_error

    damage(store / node / "zarr.json")
    checked = verify(store)
    assert checked.exit_code == 1 and "Traceback" not in checked.output, checked.output
    problems = [line for line in checked.stderr.splitlines() if line.startswith("problem: ")]
    assert problems == [f"problem: {fragment}" if "missing" in fragment else problems[0]] and fragment in problems[0], checked.stderr
    student = make_student(tmp_path / "student", tiny_teacher)
    one_line_error(distill(store, student, tmp_path / "run", "--steps", "2"), fragment, "ddk-cache verify")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    evaluated = CliRunner().invoke(app, ["eval", str(student), str(store), "--device", "cpu", "--random-init"])  # a config-only student
    if "/valid" in node:  # eval reads valid/ only: damage elsewhere does not change its numbers
        one_line_error(evaluated, fragment)
    else:
        assert evaluated.exit_code == 0, evaluated.output


def test_an_edited_teacher_loss_or_marker_is_found_by_verify_and_refused_by_readers(store, tiny_teacher, tmp_path):
    """Issue 24, class 7: the domain info (sizes, the teacher validation loss DDK divides by) is sealed by a sha256;
    a marker is 0 or 1. verify missed both edits, and distill trained with the edited loss."""
    import json

    from test_distill import distill, make_student
    from test_error_boundary import one_line_error

    group = zarr.open_group(str(store), mode="r+")
    raw = dict(group["math"].attrs["ddk_cache_domain"])
    assert raw["sha256"].startswith("sha256:")
    group["math"].attrs["ddk_cache_domain"] = {**raw, "teacher_valid_loss": raw["teacher_valid_loss"] / 2}
    group["code/train/shard_done"][0] = 2
    checked = verify(store)
    assert checked.exit_code == 1 and "Traceback" not in checked.output, checked.output
    assert "problem: the domain attribute 'math/ddk_cache_domain' does not match its sha256" in checked.stderr
    assert "problem: code/train shard 0: marker is 2, not 0 or 1 (edited?)" in checked.stderr
    one_line_error(distill(store, make_student(tmp_path / "student", tiny_teacher), tmp_path / "run", "--steps", "2"),
                   "'math/ddk_cache_domain' does not match its sha256")
    assert not (tmp_path / "run").exists()
    group["math"].attrs["ddk_cache_domain"] = {key: value for key, value in raw.items() if key != "sha256"}  # as older stores have it
    group["code/train/shard_done"][0] = 1
    older = verify(store)
    assert older.exit_code == 0, older.output
    assert "note: domain info of math written before its sha256 existed" in older.stderr
    assert json.dumps(raw)  # the sealed attribute is plain JSON
