"""User errors are one line on stderr and exit 2, never a traceback; defects keep theirs (and ask to be reported).

Each class the audit found printing a traceback, through the real CLI where this machine can produce it
(a non-UTF-8 source, a template with an unbalanced brace, truncated weights, an unknown or absent device,
an unreachable endpoint, a filesystem package that is not installed, a header missing a key, out-of-range
eval flags), and through the boundary's classifier for what a test cannot cause as root on one machine
(a full disk, a read-only filesystem, missing credentials).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_corpus_manifest, write_other_tokenizer
from typer.testing import CliRunner

from ddk_cache.cli.boundary import expected_failure
from ddk_cache.cli.main import app


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def dump(tiny_teacher: Path, manifest: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["teacher-dump", "--teacher", str(tiny_teacher), "--manifest", str(manifest), "--out", str(out),
                                    "--k", "8", "--device", "cpu", "--no-progress", *extra])


def test_a_source_with_bytes_that_are_not_utf8(tmp_path, tiny_teacher):
    manifest = write_corpus_manifest(tmp_path)
    data_file = tmp_path / "data" / "code.txt"  # the text source
    data_file.write_bytes(data_file.read_bytes() + b"\nbad \xff\xfe bytes\n")
    one_line_error(dump(tiny_teacher, manifest, tmp_path / "out.zarr"), "the file is not UTF-8 text", "load_kwargs")
    assert not (tmp_path / "out.zarr").exists()


def test_a_template_with_an_unbalanced_brace(tmp_path, tiny_teacher):
    manifest = write_corpus_manifest(tmp_path)
    document = yaml.safe_load(manifest.read_text())
    source = next(s for d in document["domains"] for s in d["sources"] if "template" in s)
    source["template"] = "{question} {answer"
    manifest.write_text(yaml.safe_dump(document))
    one_line_error(dump(tiny_teacher, manifest, tmp_path / "out.zarr"), "'template' is not a format string")


@pytest.mark.parametrize(("template", "fragment"), [
    ("{question:d} {answer}", "field {question:d} has a conversion or format spec"),
    ("{question!x} {answer}", "field {question!x} has a conversion or format spec"),
    ("{} {answer}", "field {} is not a column name"),
    ("{0} {answer}", "field {0} is not a column name"),
    ("{question.title} {answer}", "field {question.title} is not a column name"),
])
@pytest.mark.parametrize("command", ["teacher-dump", "pack"])
def test_a_template_that_format_would_accept_and_fail_on_later(tmp_path, tiny_teacher, template, fragment, command):
    """Issue 24, class 1: what str.format parses but cannot fill from a row of text columns is refused before any work."""
    manifest = write_corpus_manifest(tmp_path)
    document = yaml.safe_load(manifest.read_text())
    source = next(s for d in document["domains"] for s in d["sources"] if "template" in s)
    source["template"] = template
    manifest.write_text(yaml.safe_dump(document))
    out = tmp_path / "out.zarr"
    if command == "pack":
        result = CliRunner().invoke(app, ["pack", "--manifest", str(manifest), "--out", str(out), "--tokenizer", str(tiny_teacher), "--no-progress"])
    else:
        result = dump(tiny_teacher, manifest, out)
    one_line_error(result, fragment, "'template'")
    assert not out.exists()


def test_truncated_teacher_weights(tmp_path, tiny_teacher):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(dump(teacher, write_corpus_manifest(tmp_path), tmp_path / "out.zarr"))


@pytest.mark.parametrize(("device", "fragment"), [("tpu", "unknown --device 'tpu'"),
                                                  pytest.param("cuda", "no CUDA GPU is visible", marks=pytest.mark.skipif(
                                                      torch.cuda.is_available(), reason="this machine has a GPU"))])
def test_unknown_or_absent_device_for_the_teacher(tmp_path, tiny_teacher, device, fragment):
    result = CliRunner().invoke(app, ["teacher-dump", "--teacher", str(tiny_teacher), "--manifest", str(write_corpus_manifest(tmp_path)),
                                      "--out", str(tmp_path / "out.zarr"), "--device", device, "--engine", "hf", "--no-progress"])
    one_line_error(result, fragment)


def test_unreachable_endpoint_and_missing_filesystem_package(tmp_path, tiny_teacher):
    options = json.dumps({"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                          "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}})
    one_line_error(CliRunner().invoke(app, ["inspect", "s3://bucket/cache.zarr", "--storage-options", options]))
    one_line_error(CliRunner().invoke(app, ["inspect", "gs://bucket/cache.zarr"]), "install")


def test_a_header_missing_a_key_in_inspect_verify_distill(tiny_store, tmp_path, tiny_teacher):
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    meta = json.loads((store / "zarr.json").read_text())
    del meta["attributes"]["ddk_cache"]["layout"]["vocab_size"]
    (store / "zarr.json").write_text(json.dumps(meta))
    for args in (["inspect", str(store)], ["verify", str(store)], ["eval", str(tiny_teacher), str(store), "--device", "cpu"]):
        one_line_error(CliRunner().invoke(app, args), "the store header lacks 'layout.vocab_size'")


@pytest.mark.parametrize(("flags", "fragment"), [(("--max-windows", "-1"), "--max-windows must be >= 1, got -1"),
                                                 (("--batch-size", "0"), "--batch-size must be >= 1, got 0")])
def test_out_of_range_eval_flags(tiny_store, tiny_teacher, flags, fragment):
    one_line_error(CliRunner().invoke(app, ["eval", str(tiny_teacher), str(tiny_store), "--device", "cpu", *flags]), fragment)


@pytest.mark.parametrize(("exc", "fragment"), [
    (OSError(errno.ENOSPC, "No space left on device", "/data/cache.zarr/c/0"), "no space left on the device: /data/cache.zarr/c/0"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/run"), "read-only file system: /ro/run"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "permission denied: /root/x"),
    (type("NoCredentialsError", (Exception,), {})("Unable to locate credentials"), "no credentials for the object store"),
    (type("EndpointConnectionError", (Exception,), {})("Could not connect"), "cannot reach the storage endpoint"),
    (ImportError("Install gcsfs to access Google Storage"), "Install gcsfs"),
    (type("SafetensorError", (Exception,), {})("Error while deserializing header"), "the file is truncated or corrupt"),
])
def test_the_boundary_names_each_class_and_its_fix(exc, fragment):
    assert fragment in expected_failure(exc)


def test_a_defect_keeps_its_traceback_and_asks_to_be_reported():
    assert expected_failure(ZeroDivisionError("division by zero")) is None
    assert expected_failure(KeyError("layout")) is None


@pytest.mark.parametrize(("command", "flags", "fragment"), [
    ("teacher-dump", ("--data-parallel", "0"), "--data-parallel must be in [1, 1024], got 0"),
    ("teacher-dump", ("--writer-threads", "65"), "--writer-threads must be in [1, 64], got 65"),
    ("teacher-dump", ("--create-timeout", "0"), "--create-timeout must be > 0, got 0.0"),
    ("teacher-dump", ("--shard-windows", "0"), "--shard-windows must be >= 1, got 0"),
    ("teacher-dump", ("--chunk-windows", "-1"), "--chunk-windows must be >= 1, got -1"),
    ("teacher-dump", ("--batch-size", "0"), "--batch-size must be in [1, 65536], got 0"),
    ("teacher-dump", ("--engine", "vllm", "--gpu-memory-utilization", "1.5"), "--gpu-memory-utilization must be in (0, 1], got 1.5"),
    ("teacher-dump", ("--k", "0"), "--k must be a positive integer, got 0"),
    ("teacher-dump", ("--mode", "sampled", "--draws", "300"), "--draws between 1 and 255"),
    ("teacher-dump", ("--mode", "topp", "--top-p", "2"), "--top-p in (0, 1]"),
    ("teacher-dump", ("--logprob-scale", "-1"), "--logprob-scale must be 0"),
    ("teacher-dump", ("--seed", "-1"), "--seed must be >= 0, got -1"),
    ("pack", ("--valid-fraction", "1"), "--valid-fraction must be in (0, 1), got 1.0"),
    ("pack", ("--shard-windows", "0"), "--shard-windows must be >= 1, got 0"),
    ("quickstart", ("--steps", "0"), "--steps must be >= 1, got 0"),
    ("quickstart", ("--train-tokens", "0"), "--train-tokens must be >= 1, got 0"),
])
def test_every_numeric_flag_is_range_checked_before_anything_is_written(tmp_path, tiny_teacher, command, flags, fragment):
    manifest = write_corpus_manifest(tmp_path)
    out = tmp_path / "out.zarr"
    args = {"teacher-dump": ["--teacher", str(tiny_teacher), "--manifest", str(manifest), "--out", str(out), "--no-progress"],
            "pack": ["--manifest", str(manifest), "--out", str(out), "--tokenizer", str(tiny_teacher), "--no-progress"],
            "quickstart": ["--out", str(out), "--teacher", str(tiny_teacher), "--no-progress"]}[command]
    one_line_error(CliRunner().invoke(app, [command, *args, *flags]), fragment)
    assert not out.exists()


def test_windows_longer_than_the_teachers_context_are_refused(tmp_path, tiny_teacher):
    teacher = tmp_path / "short-teacher"
    shutil.copytree(tiny_teacher, teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8}))
    result = dump(teacher, write_corpus_manifest(tmp_path), tmp_path / "out.zarr")
    one_line_error(result, "seq_len 16 is longer than the teacher's context (8 positions)")
    assert not (tmp_path / "out.zarr").exists()


def test_readme_states_every_declared_range():
    """The README's table is the ranges' documentation: it must say what the code checks."""
    from ddk_cache.engines.options import ENGINE_RANGES
    from ddk_cache.stages.distill import DISTILL_RANGES
    from ddk_cache.stages.quickstart import QUICKSTART_RANGES
    from ddk_cache.stages.teacher_dump import DUMP_RANGES

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in readme.splitlines() if line.startswith("| `")}
    from ddk_cache.stages.minillm_rounds import ROUNDS_RANGES
    from ddk_cache.stages.rollout import ROLLOUT_RANGES

    for command, table in (("teacher-dump", {**DUMP_RANGES, **ENGINE_RANGES}), ("distill", DISTILL_RANGES), ("rollout", ROLLOUT_RANGES),
                           ("minillm", ROUNDS_RANGES)):
        for name, allowed in table.items():
            assert f"`--{name.replace('_', '-')}` {allowed.describe()}" in rows[command], (command, name)
    for name in ("steps", "train_tokens", "seed"):
        assert f"`--{name.replace('_', '-')}` {QUICKSTART_RANGES[name].describe()}" in rows["quickstart"], name


def test_a_store_missing_a_domain_group_is_one_line_everywhere(tiny_store, tmp_path, tiny_teacher):
    """What two writers on one URL used to leave behind (before the writer lease): a store without some groups."""
    store = tmp_path / "store.zarr"
    shutil.copytree(tiny_store, store)
    shutil.rmtree(store / "math")
    shown = CliRunner().invoke(app, ["inspect", str(store)])  # inspect describes the damage instead of failing
    assert shown.exit_code == 0 and any(line.split()[:3] == ["math", "not", "created"] for line in shown.output.splitlines())
    checked = CliRunner().invoke(app, ["verify", str(store)])
    assert checked.exit_code == 1 and "problem: math: group missing" in checked.stderr
    resumed = CliRunner().invoke(app, ["teacher-dump", "--teacher", str(tiny_teacher), "--manifest", str(tiny_store.parent / "manifest.yaml"),
                                       "--out", str(store), "--k", "8", "--shard-windows", "8", "--chunk-windows", "4", "--device", "cpu",
                                       "--no-progress"])
    one_line_error(resumed, "lacks domain 'math'", "--overwrite")


def test_a_tokenizer_that_is_not_the_teachers_own_is_refused(tmp_path, tiny_teacher):
    """Issue 24, class 5: a --tokenizer smaller than the teacher's vocabulary passed the size check and scored other text."""
    other = write_other_tokenizer(tmp_path / "other")
    out, manifest = tmp_path / "out.zarr", write_corpus_manifest(tmp_path)
    result = dump(tiny_teacher, manifest, out, "--tokenizer", str(other))
    one_line_error(result, f"--tokenizer {other}", "is not the teacher's own tokenizer", "drop --tokenizer")
    assert not out.exists()
    same = dump(tiny_teacher, manifest, tmp_path / "same.zarr", "--tokenizer", str(tiny_teacher))
    assert same.exit_code == 0, same.output  # the teacher's own tokenizer, named again, is fine


def test_a_misspelled_file_builder_is_refused_before_the_hub_is_asked(tmp_path, tiny_teacher):
    """Issue 24, class 8: `path: jsonn` with data_files went through datasets' hub retries (~45 s) before failing."""
    manifest = write_corpus_manifest(tmp_path)
    document = yaml.safe_load(manifest.read_text())
    source = next(s for d in document["domains"] for s in d["sources"] if s.get("path") == "json")
    source["path"] = "jsonn"
    manifest.write_text(yaml.safe_dump(document))
    one_line_error(dump(tiny_teacher, manifest, tmp_path / "out.zarr"), "'path' 'jsonn' with 'data_files' is not a file builder",
                   "did you mean 'json'?")
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("offline", [True, False])
def test_a_bare_teacher_name_with_no_hub_fails_at_once_in_one_line(tmp_path, tiny_teacher, monkeypatch, offline):
    """Issue 25: `--teacher nonexistent_dir` (a valid hub id form) retried the hub for 59-75 s, 23 lines, before its error."""
    from huggingface_hub import constants

    from ddk_cache.hub import hub_unreachable_reason

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    hub_unreachable_reason.cache_clear()
    manifest = write_corpus_manifest(tmp_path)
    result = CliRunner().invoke(app, ["teacher-dump", "--teacher", "nonexistent_dir", "--manifest", str(manifest), "--out",
                                      str(tmp_path / "out.zarr"), "--k", "8", "--no-progress"])
    expected = "not in the hub cache (HF_HUB_OFFLINE is set)" if offline else "http://127.0.0.1:9 is not reachable"
    one_line_error(result, "teacher 'nonexistent_dir' is not a local folder", expected)
    assert "Retrying" not in result.output and not (tmp_path / "out.zarr").exists()
    hub_unreachable_reason.cache_clear()
