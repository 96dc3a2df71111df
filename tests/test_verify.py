"""`ddk-cache verify` finds missing, corrupted and malformed shards, and passes intact stores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from ddk_cache.cli.main import app


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
    assert "ok (" in result.output and "shards present, decoded and well-formed" in result.output


def test_flipped_bytes_in_a_shard_are_caught_by_the_checksum(store):
    shard = store / "code" / "train" / "ids" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first inner chunk's compressed bytes
    shard.write_bytes(bytes(data))
    result = verify(store)
    assert result.exit_code == 1
    assert "code/train shard 0: cannot be decoded: ids (" in result.stderr and "1 problem(s)" in result.stderr


def test_a_missing_shard_object_is_reported_although_it_reads_as_zeros(store):
    (store / "math" / "valid" / "logprobs" / "c" / "0" / "0" / "0").unlink()
    assert zarr.open_group(str(store), mode="r")["math/valid/logprobs"][:].max() == 0  # silently the fill value
    result = verify(store)
    assert result.exit_code == 1 and "math/valid shard 0: object missing for logprobs" in result.stderr


def test_malformed_entries_and_unmarked_shards_are_reported(store):
    group = zarr.open_group(str(store), mode="r+")["prose/train"]
    group["n_entries"][:8] = np.full_like(group["n_entries"][:8], 9)  # more entries than the width (8)
    group["shard_done"][1] = 0
    ids = group["ids"][8:16]
    group["ids"][8:16] = ids[..., ::-1]  # descending: not the documented order
    result = verify(store)
    assert result.exit_code == 1
    assert "prose/train shard 0: n_entries outside 1..8" in result.stderr
    assert "prose/train shard 1: not marked done" in result.stderr
    assert "prose/train shard 1: entry ids not strictly ascending" in result.stderr
