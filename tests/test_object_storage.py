"""Stores on an S3-compatible server (moto's, run locally): dump, resume, inspect, distill and eval by URL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_distill import make_student
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.errors import StoreError
from ddk_cache.store.reader import CacheReader

moto_server = pytest.importorskip("moto.server", reason="the s3 tests need moto[server] (the test extra)")
pytest.importorskip("s3fs", reason="the s3 tests need s3fs (the s3 extra)")
BUCKET = "caches"


@pytest.fixture(scope="module")
def s3_options():
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    server.stop()


def dump(tiny_teacher, manifest, url, options, *extra):
    args = ["teacher-dump", "--teacher", str(tiny_teacher), "--manifest", str(manifest), "--out", url, "--k", "8",
            "--shard-windows", "8", "--chunk-windows", "4", "--device", "cpu", "--no-progress",
            "--storage-options", json.dumps(options), *extra]
    return CliRunner().invoke(app, args)


def test_store_on_s3_dumps_resumes_and_trains_a_student(s3_options, tiny_teacher, tiny_store, corpus_manifest, tmp_path):
    url = f"s3://{BUCKET}/run1/cache.zarr"
    result = dump(tiny_teacher, corpus_manifest, url, s3_options)
    assert result.exit_code == 0, result.output
    remote, local = CacheReader(url, storage_options=s3_options), CacheReader(str(tiny_store))
    assert remote.complete and remote.domains == local.domains
    for domain in local.domains:  # the same manifest and teacher as the local tiny store: the same arrays
        a, b = remote.read(domain, "train"), local.read(domain, "train")
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)

    rerun = dump(tiny_teacher, corpus_manifest, url, s3_options)
    assert rerun.exit_code == 0 and "shards written 0" in rerun.output  # resume finds the finished shards in the bucket

    options = json.dumps(s3_options)
    shown = CliRunner().invoke(app, ["inspect", url, "--storage-options", options], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "complete" in shown.output
    checked = CliRunner().invoke(app, ["verify", url, "--storage-options", options])
    assert checked.exit_code == 0 and "ok (" in checked.output, checked.output
    student, out = make_student(tmp_path / "student", tiny_teacher), tmp_path / "run"
    trained = CliRunner().invoke(app, ["distill", "--store", url, "--student", str(student), "--out", str(out), "--steps", "4",
                                       "--batch-size", "4", "--update-every", "2", "--eval-windows", "2", "--device", "cpu",
                                       "--no-progress", "--storage-options", options])
    assert trained.exit_code == 0, trained.output
    evaluated = CliRunner().invoke(app, ["eval", str(out), url, "--storage-options", options])
    assert evaluated.exit_code == 0, evaluated.output


def test_object_store_errors_are_one_line(s3_options, tiny_teacher, corpus_manifest):
    missing = CliRunner().invoke(app, ["inspect", f"s3://{BUCKET}/nothing-here.zarr", "--storage-options", json.dumps(s3_options)])
    assert missing.exit_code == 2 and "no ddk-cache store at s3://caches/nothing-here.zarr" in missing.stderr
    bad_json = CliRunner().invoke(app, ["inspect", f"s3://{BUCKET}/x.zarr", "--storage-options", "{endpoint: 1"])
    assert bad_json.exit_code == 2 and "--storage-options is not valid JSON" in bad_json.stderr
    no_bucket = dump(tiny_teacher, corpus_manifest, "s3://no-such-bucket/cache.zarr", s3_options)
    assert no_bucket.exit_code == 2, no_bucket.output
    assert "cannot write to s3://no-such-bucket/cache.zarr: The specified bucket does not exist" in no_bucket.stderr
    for result in (missing, bad_json, no_bucket):
        assert "Traceback" not in result.output


def test_three_nodes_score_one_store_in_a_bucket(s3_options, tiny_teacher, reference_store, tmp_path):
    """Three processes as three nodes write one store on the S3-compatible server: equal to the local single-process dump."""
    from test_multi_node import start_nodes

    manifest, reference = reference_store
    url = f"s3://{BUCKET}/nodes/cache.zarr"
    results = start_nodes(tiny_teacher, manifest, url, 3, extra=("--storage-options", json.dumps(s3_options)), cwd=tmp_path)
    assert all(r.returncode == 0 for r in results.values()), [r.stderr[-2000:] for r in results.values()]
    remote, local = CacheReader(url, storage_options=s3_options), CacheReader(str(reference))
    assert remote.complete and remote.domains == local.domains
    for domain in local.domains:
        assert remote.domain_info(domain) == local.domain_info(domain)
        for split in ("train", "valid"):
            a, b = remote.read(domain, split), local.read(domain, split)
            for field in ("tokens", "ids", "logprobs", "rest_logprobs", "target_logprobs"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_racing_writers_in_a_bucket_leave_one_correct_store(s3_options, tiny_teacher, reference_store, tmp_path):
    """Two identical dumps started together on one URL: one is refused by the lease (a conditional PUT), the other writes."""
    from test_writer_lease import SLOW_RUNNER, assert_one_refused, race

    manifest, reference = reference_store
    runner = tmp_path / "slow_runner.py"
    runner.write_text(SLOW_RUNNER)
    url = f"s3://{BUCKET}/raced/cache.zarr"
    assert_one_refused(race(tiny_teacher, manifest, url, runner, tmp_path, ("--storage-options", json.dumps(s3_options))))
    remote, local = CacheReader(url, storage_options=s3_options), CacheReader(str(reference))
    assert remote.complete
    for domain in local.domains:
        for split in ("train", "valid"):
            a, b = remote.read(domain, split), local.read(domain, split)
            for field in ("tokens", "ids", "logprobs", "rest_logprobs", "target_logprobs"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_open_store_and_dataset_read_a_store_in_a_bucket(s3_options, tiny_store):
    """The public API by URL: the same header and windows as the local copy."""
    import s3fs

    import ddk_cache

    fs = s3fs.S3FileSystem(**s3_options)
    fs.put(str(tiny_store), f"{BUCKET}/public.zarr", recursive=True)
    remote, local = ddk_cache.open_store(f"s3://{BUCKET}/public.zarr", storage_options=s3_options), ddk_cache.open_store(str(tiny_store))
    assert remote.summary()["domains"] == local.summary()["domains"] and remote.header == local.header
    far, near = ddk_cache.CacheDataset(remote, "math")[3], ddk_cache.CacheDataset(local, "math")[3]
    assert all(torch.equal(far[key], near[key]) for key in ("input_ids", "labels", "teacher_ids", "teacher_logprobs", "teacher_rest"))
    assert remote.load_tokenizer().get_vocab() == local.load_tokenizer().get_vocab()  # the embedded tokenizer, read from the bucket
    with pytest.raises(StoreError, match="no ddk-cache store at s3://"):
        ddk_cache.open_store(f"s3://{BUCKET}/absent.zarr", storage_options=s3_options)


def test_attach_tokenizer_writes_into_a_store_in_a_bucket(s3_options, tiny_store, tiny_teacher, tmp_path):
    import shutil

    import s3fs
    from test_embedded_tokenizer import as_before_tokenizers_were_embedded

    old = as_before_tokenizers_were_embedded(tiny_store, tmp_path / "old.zarr")
    s3fs.S3FileSystem(**s3_options).put(str(old), f"{BUCKET}/old.zarr", recursive=True)
    shutil.rmtree(old)
    url, options = f"s3://{BUCKET}/old.zarr", json.dumps(s3_options)
    result = CliRunner().invoke(app, ["attach-tokenizer", url, str(tiny_teacher), "--storage-options", options])
    assert result.exit_code == 0 and "now carries" in result.output, result.output
    assert CacheReader(url, storage_options=s3_options).load_tokenizer().get_vocab() == CacheReader(str(tiny_store)).load_tokenizer().get_vocab()


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_an_unreachable_endpoint_is_one_line_and_nothing_after_it(command, tmp_path):
    """Issue 24, class 3: the line, exit 2, and no shutdown report of zarr's abandoned reads (a real process: the
    noise came at interpreter exit, after the line)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
    result = subprocess.run([sys.executable, "-m", "ddk_cache.cli", command, f"s3://{BUCKET}/cache.zarr", "--storage-options", json.dumps(options)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: cannot reach the storage endpoint") and result.stderr.count("\n") == 1, result.stderr[-2000:]
