"""What the commands print: tables readable at 80 columns, and JSON for scripts (`--json -`)."""

from __future__ import annotations

import json

import yaml
from conftest import write_corpus_manifest
from test_distill import distill, make_student
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.engines import EngineOptions
from ddk_cache.stages.teacher_dump import TeacherDumpConfig, run_teacher_dump
from ddk_cache.store.capture import Capture

LONG_NAMES = {"prose": "medicine_pubmed_abstracts", "code": "python_github_permissive", "math": "math_word_problems_gsm8k"}


def test_inspect_at_80_columns_keeps_domain_names_and_headers_whole(tiny_teacher, tmp_path):
    manifest = write_corpus_manifest(tmp_path)
    document = yaml.safe_load(manifest.read_text())
    for domain in document["domains"]:
        domain["name"] = LONG_NAMES[domain["name"]]
    manifest.write_text(yaml.safe_dump(document, sort_keys=False))
    store = tmp_path / "long.zarr"
    run_teacher_dump(TeacherDumpConfig(teacher=str(tiny_teacher), manifest=manifest, out=str(store), capture=Capture(k=4),
                                       engine_options=EngineOptions(device="cpu"), progress=False))
    result = CliRunner().invoke(app, ["inspect", str(store)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.output
    # a long name folds onto the next line rather than losing characters: the first column, read down, has it whole
    first_column = "".join(line.split()[0] for line in lines if line.strip() and not line.startswith(("─", "ddk-cache", "/", "(")))
    for name in LONG_NAMES.values():
        assert first_column.count(name) == 2  # one row per split
    for word in ("windows", "tokens", "docs", "shards", "entries", "B/token", "teacher", "1/1"):
        assert word in result.output


def test_inspect_json_is_the_header_and_sizes(tiny_store):
    result = CliRunner().invoke(app, ["inspect", str(tiny_store), "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout holds the JSON alone
    assert data["status"] == "complete" and data["header"]["format_version"] == 3
    assert {(row["domain"], row["split"]) for row in data["splits"]} == {(d, s) for d in ("prose", "code", "math") for s in ("train", "valid")}
    assert all(row["bytes_per_token"] > 0 for row in data["splits"])


def test_eval_json_to_stdout_and_to_a_file(tiny_store, tiny_teacher, tmp_path):
    run = tmp_path / "run"
    assert distill(tiny_store, make_student(tmp_path / "student", tiny_teacher), run, "--steps", "2").exit_code == 0
    result = CliRunner().invoke(app, ["eval", str(run), str(tiny_store), "--device", "cpu", "--json", "-"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["domain"] for row in rows] == ["prose", "code", "math"] and all(row["student_loss"] > 0 for row in rows)
    result = CliRunner().invoke(app, ["eval", str(run), str(tiny_store), "--device", "cpu", "--json", str(tmp_path / "e.json")], env={"COLUMNS": "80"})
    assert result.exit_code == 0 and json.loads((tmp_path / "e.json").read_text()) == rows
    assert "…" not in result.output and max(len(line) for line in result.output.splitlines()) <= 80
    result = CliRunner().invoke(app, ["eval", str(run), str(tiny_store), "--json", str(tmp_path / "nowhere" / "e.json")])
    assert result.exit_code == 2 and "folder" in result.stderr and "does not exist" in result.stderr


def test_usage_errors_are_one_line_and_exit_2():
    for args, fragment in [
        (["distill", "--store", "x"], "error: Missing option '--student'. (see ddk-cache distill --help)"),
        (["teacher-dump", "--teacher", "t", "--out", "o", "--mode", "beam"], "'beam' is not one of 'topk', 'topp', 'sampled', 'headtail'."),
        (["distill", "--store", "x", "--student", "y", "--out", "z", "--lr", "fast"], "Invalid value for '--lr'"),
        (["distill", "--store", "x", "--student", "y", "--out", "z", "--no-such-flag"], "No such option: --no-such-flag"),
    ]:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and fragment in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert CliRunner().invoke(app, []).exit_code == 0  # no arguments: the help


def test_help_lists_choices_and_groups_engine_and_training_flags():
    dump = CliRunner().invoke(app, ["teacher-dump", "--help"], env={"COLUMNS": "200"}).output
    for panel in ("Capture", "HF engine", "vLLM engine", "Many nodes", "Store layout"):
        assert f"\n{panel}:\n" in dump, panel
    assert "topk|topp|sampled" in dump and "auto|hf|vllm" in dump and "vLLM:" not in dump
    distill_help = CliRunner().invoke(app, ["distill", "--help"], env={"COLUMNS": "200"}).output
    for panel in ("Optimiser", "KD loss", "DDK domain sampler", "Devices and ranks"):
        assert f"\n{panel}:\n" in distill_help, panel
    assert "ddk|static|uniform" in distill_help and "ppl-ratio|ce-ratio" in distill_help and "rest|renorm" in distill_help
