"""Manifest validation: every mistake gets one precise line, through the library and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.data.manifest import DEFAULT_VALID_SEQUENCES, load_manifest
from ddk_cache.data.sources import load_domain_documents
from ddk_cache.errors import ManifestError


def write_manifest(tmp_path: Path, document) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False) if not isinstance(document, str) else document)
    return path


def one_domain(**source) -> dict:
    return {"seq_len": 8, "seed": 1, "domains": [{"name": "d", "sources": [source]}]}


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hello world"}\n{"text": "second doc"}\n')
    return path


def test_valid_manifest_resolves_paths_and_defaults(tmp_path, text_file):
    manifest = load_manifest(write_manifest(tmp_path, one_domain(path="json", data_files="d.jsonl")))
    (domain,) = manifest.domains
    assert domain.valid_sequences == DEFAULT_VALID_SEQUENCES
    assert domain.weight == 1.0 and domain.token_budget is None
    assert domain.sources[0].data_files == (str(text_file.resolve()),)
    assert load_domain_documents(domain) == ["hello world", "second doc"]


def test_manifest_hash_ignores_location_but_not_content(tmp_path, text_file):
    doc = one_domain(path="json", data_files=str(text_file))
    first = load_manifest(write_manifest(tmp_path, doc))
    other_dir = tmp_path / "elsewhere"
    other_dir.mkdir()
    assert load_manifest(write_manifest(other_dir, doc)).sha256() == first.sha256()
    doc["seed"] = 2
    assert load_manifest(write_manifest(other_dir, doc)).sha256() != first.sha256()


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (one_domain(path="json", data_files="d.jsonl", txt_field="x"), "unknown key 'txt_field'"),
        ({"seq_len": 8, "domains": [{"name": "d"}]}, "missing required field 'sources'"),
        ({"seed": 1, "domains": []}, "missing required field 'seq_len'"),
        ({"seq_len": 8, "domains": [{"sources": [{"path": "json"}]}]}, "missing required field 'name'"),
        (
            {"seq_len": 8, "domains": [{"name": "d", "sources": ["json"]}, {"name": "d", "sources": ["json"]}]},
            "builder 'json' needs 'data_files'",
        ),
        (
            {
                "seq_len": 8,
                "domains": [
                    {"name": "d", "sources": [{"path": "json", "data_files": "d.jsonl"}]},
                    {"name": "d", "sources": [{"path": "json", "data_files": "d.jsonl"}]},
                ],
            },
            "duplicate domain name 'd'",
        ),
        (one_domain(path="json", data_files="missing.jsonl"), "data file 'missing.jsonl' does not exist"),
        (one_domain(path="json", data_files="d.jsonl", text_field="t", template="{a}"), "either 'text_field' or 'template'"),
        ({"seq_len": -3, "domains": [{"name": "d", "sources": ["x/y"]}]}, "'seq_len' must be a positive integer"),
        (
            {"seq_len": 8, "domains": [{"name": "d", "token_budget": 4, "sources": [{"path": "json", "data_files": "d.jsonl"}]}]},
            "token_budget 4 < seq_len 8",
        ),
        ({"seq_len": 8, "domains": [{"name": "a/b", "sources": ["x/y"]}]}, "domain name 'a/b' is not allowed"),
        ("seq_len: [unclosed", "not valid YAML"),
    ],
)
def test_invalid_manifests_name_the_problem(tmp_path, text_file, document, expected):
    with pytest.raises(ManifestError) as info:
        load_manifest(write_manifest(tmp_path, document))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_text_field_is_reported_with_columns(tmp_path, text_file):
    manifest = load_manifest(write_manifest(tmp_path, one_domain(path="json", data_files="d.jsonl", text_field="body")))
    with pytest.raises(ManifestError, match=r"text field 'body' is not a column \(columns: text\)"):
        load_domain_documents(manifest.domains[0])


def test_template_with_missing_field_is_reported(tmp_path, text_file):
    manifest = load_manifest(write_manifest(tmp_path, one_domain(path="json", data_files="d.jsonl", template="{text} {answer}")))
    with pytest.raises(ManifestError, match="text field 'answer' is not a column"):
        load_domain_documents(manifest.domains[0])


def test_blank_domain_is_empty(tmp_path):
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n{"text": ""}\n')
    manifest = load_manifest(write_manifest(tmp_path, one_domain(path="json", data_files="blank.jsonl")))
    with pytest.raises(ManifestError, match="domain 'd' has no text"):
        load_domain_documents(manifest.domains[0])


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"path": "json", "data_files": "d.jsonl", "txt_field": "x"}, "unknown key 'txt_field'"),
        ({"path": "json", "data_files": "d.jsonl", "text_field": "body"}, "text field 'body' is not a column"),
        ({"path": "json", "data_files": "blank.jsonl"}, "has no text"),
    ],
)
def test_cli_reports_manifest_errors_in_one_line_with_exit_code_2(tmp_path, text_file, tiny_teacher, source, expected):
    (tmp_path / "blank.jsonl").write_text('{"text": " "}\n')
    manifest = write_manifest(tmp_path, one_domain(**source))
    out = tmp_path / "store.zarr"
    result = CliRunner().invoke(
        app, ["teacher-dump", "--teacher", str(tiny_teacher), "--manifest", str(manifest), "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_cli_reports_missing_manifest_file(tmp_path, tiny_teacher):
    result = CliRunner().invoke(
        app, ["teacher-dump", "--teacher", str(tiny_teacher), "--manifest", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 2
    assert "manifest file" in result.stderr and "does not exist" in result.stderr


REPO = Path(__file__).resolve().parent.parent


def test_shipped_ddk_paper_manifest_is_valid():
    manifest = load_manifest(REPO / "data_manifests" / "ddk_paper_ten_domains.yaml")
    assert len(manifest.domains) == 10 and manifest.seq_len == 4096
    assert all(d.valid_sequences == DEFAULT_VALID_SEQUENCES for d in manifest.domains)


@pytest.mark.skipif(not (REPO.parent / "shared" / "corpora").is_dir(), reason="../shared/corpora is not beside the checkout")
def test_shipped_benchmark_manifest_points_at_shared_corpora():
    manifest = load_manifest(REPO / "data_manifests" / "shared_corpora.yaml")
    assert [d.name for d in manifest.domains] == ["wikipedia", "literature", "code", "math"]
    assert all(Path(f).is_file() for d in manifest.domains for s in d.sources for f in s.data_files)
