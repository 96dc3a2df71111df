"""The typed store metadata: real headers round-trip exactly; malformed ones are refused in one line naming the key."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import zarr
from test_capture_modes import write_version_1_copy
from test_error_boundary import one_line_error
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.errors import StoreError
from ddk_cache.store.header import DomainInfo, StoreHeader
from ddk_cache.store.header_versions import parse_header
from ddk_cache.store.metadata import HeaderError
from ddk_cache.store.reader import CacheReader


def raw_header(store) -> dict:
    return dict(zarr.open_group(str(store), mode="r").attrs["ddk_cache"])


def test_a_dumped_header_round_trips_exactly_and_is_typed(tiny_store):
    raw = raw_header(tiny_store)
    header = StoreHeader.from_dict(raw)
    assert header.to_dict() == raw and header.extra == {}
    assert header.scored and header.complete and header.capture.capture.k == 8 and header.layout.capture == header.capture.capture
    assert header.teacher.vocab_size == header.layout.vocab_size and header.tokenizer.fingerprint.startswith("sha256:")
    assert header.engine.name == "hf" and header.identity["format_version"] == 3
    assert list(header.manifest_weights()) == list(header.domains)
    for domain in header.domains:
        info = zarr.open_group(str(tiny_store), mode="r")[domain].attrs["ddk_cache_domain"]
        assert DomainInfo.from_dict(info).to_dict() == info


def test_keys_a_newer_writer_added_are_kept_when_the_header_is_rewritten(tiny_store):
    raw = {**raw_header(tiny_store), "lineage": {"parent": "s3://x/y.zarr"}}
    header = StoreHeader.from_dict(raw)
    assert header.extra == {"lineage": {"parent": "s3://x/y.zarr"}}
    assert header.with_status("writing").to_dict() == {**raw, "status": "writing"}


def test_version_1_headers_read_through_the_adapter(tiny_store, tmp_path):
    old = tmp_path / "v1.zarr"
    write_version_1_copy(tiny_store, old)
    header = parse_header(raw_header(old))
    assert header.format_version == 1 and header.capture.capture.mode == "topk" and header.capture.capture.logprob_scale == 0
    assert header.capture.capture.k == 8 and header.seq_len == StoreHeader.from_dict(raw_header(tiny_store)).seq_len


def _without(raw: dict, path: str) -> dict:
    broken = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node = broken
    for part in parents:
        node = node[part]
    del node[last]
    return broken


def _with(raw: dict, path: str, value) -> dict:
    broken = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node = broken
    for part in parents:
        node = node[part]
    node[last] = value
    return broken


@pytest.mark.parametrize("path", ["status", "domains", "tokenizer.fingerprint", "tokenizer.size", "layout.seq_len",
                                  "layout.shard_windows", "layout.vocab_size", "capture.mode", "capture.seq_len", "teacher.vocab_size",
                                  "engine.name", "manifest_sha256"])
def test_a_missing_key_is_named(tiny_store, path):
    with pytest.raises(HeaderError, match=f"^the store header lacks '{path}'$"):
        StoreHeader.from_dict(_without(raw_header(tiny_store), path))


@pytest.mark.parametrize(("path", "value", "message"), [
    ("layout.seq_len", "256", "the store header's 'layout.seq_len' is '256', not an integer"),
    ("teacher.vocab_size", True, "the store header's 'teacher.vocab_size' is True, not an integer"),
    ("tokenizer", [], "the store header's 'tokenizer' is [], not an object"),
    ("domains", ["a", 3], "the store header's 'domains' must be a list of domain names"),
    ("status", "done", "the store header's 'status' is 'done', not one of creating, packing, packed, writing, complete"),
    ("capture.mode", "beam", "the store header's 'capture' is not a valid capture (unknown capture mode 'beam'"),
    ("capture.k", 0, "the store header's 'capture' is not a valid capture (--k must be a positive integer, got 0)"),
    ("capture.temperature", "hot", "the store header's 'capture.temperature' is 'hot', not a number"),
])
def test_a_mistyped_key_is_named(tiny_store, path, value, message):
    with pytest.raises(HeaderError) as caught:
        StoreHeader.from_dict(_with(raw_header(tiny_store), path, value))
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_a_broken_domain_attribute_is_named(tiny_store, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    domain = CacheReader(str(store)).domains[0]
    meta_path = store / domain / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["ddk_cache_domain"]["train"]["windows"] = "many"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=f"the store header's '{domain}/ddk_cache_domain.train.windows' is 'many', not an integer"):
        CacheReader(str(store)).domain_info(domain)


@pytest.mark.parametrize(("path", "value"), [("capture.seq_len", None), ("tokenizer.size", "big"), ("teacher", None)])
def test_every_command_refuses_a_damaged_header_in_one_line(tiny_store, tiny_teacher, tmp_path, path, value):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    meta = json.loads((store / "zarr.json").read_text())
    header = meta["attributes"]["ddk_cache"]
    meta["attributes"]["ddk_cache"] = _without(header, path) if value is None else _with(header, path, value)
    (store / "zarr.json").write_text(json.dumps(meta))
    for args in (["inspect", str(store)], ["verify", str(store)], ["eval", str(tiny_teacher), str(store), "--device", "cpu"]):
        one_line_error(CliRunner().invoke(app, args), f"'{path}'", "(its zarr.json was edited or damaged)")


def test_resuming_into_a_damaged_header_is_refused_and_overwrite_replaces_it(tiny_store, tiny_teacher, corpus_manifest, tmp_path):
    from test_error_boundary import dump

    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["ddk_cache"]["identity"]["seq_len"], meta["attributes"]["ddk_cache"]["layout"]["shard_windows"]
    (store / "zarr.json").write_text(json.dumps(meta))
    before = (store / "zarr.json").read_text()
    one_line_error(dump(tiny_teacher, corpus_manifest, store), "'layout.shard_windows'", "pass --overwrite")
    assert (store / "zarr.json").read_text() == before  # untouched
    result = dump(tiny_teacher, corpus_manifest, store, "--overwrite")
    assert result.exit_code == 0, result.output
    assert CacheReader(str(store)).complete
