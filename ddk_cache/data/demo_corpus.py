"""A small multi-domain corpus from text every Python installation carries.

The quickstart must run on a machine that reaches only a package registry, so its data
cannot come from a dataset hub. Three real domains are always at hand:

- `python_code`: the standard library's own source files (real code);
- `python_docs`: the interpreter's documentation topics shipped in `pydoc_data` (English
  technical prose);
- `licenses`: the licence texts of the installed distributions (legal text), de-duplicated
  because many packages ship the very same MIT or Apache text.

Each domain becomes a JSON-lines file with one document per line, and a manifest that
`teacher-dump` reads like any other.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sysconfig
from pathlib import Path

import yaml

MAX_DOCUMENT_CHARS = 20_000  # long files are cut: the demo budgets are small, variety matters more


def python_code_documents() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [_clip(path.read_text(encoding="utf-8", errors="replace")) for path in sorted(stdlib.glob("*.py"))]


def python_docs_documents() -> list[str]:
    from pydoc_data.topics import topics  # large: the Python docs' text, read only for the demo corpus

    return [_clip(topics[name]) for name in sorted(topics)]


def license_documents() -> list[str]:
    seen, documents = set(), []
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        for file in dist.files or []:
            if not _is_license_file(file):
                continue
            try:
                text = Path(file.locate()).read_text(encoding="utf-8", errors="replace").strip()
            except OSError:
                continue
            digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
            if text and digest not in seen:
                seen.add(digest)
                documents.append(_clip(text))
    return documents


DOMAINS = {"python_code": python_code_documents, "python_docs": python_docs_documents, "licenses": license_documents}


def write_demo_corpus(out_dir: Path, seq_len: int, train_tokens: int, valid_windows: int, seed: int = 0) -> Path:
    """Write one JSON-lines file per domain and a manifest over them; returns the manifest's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    domains = []
    for name, documents in DOMAINS.items():
        docs = list(dict.fromkeys(doc for doc in documents() if doc.strip()))  # a repeat could land in train and valid
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs), encoding="utf-8")
        domains.append({
            "name": name,
            "sources": [{"path": "json", "data_files": path.name, "split": "train", "text_field": "text"}],
            "token_budget": train_tokens,
            "valid_sequences": valid_windows,
        })
    manifest = out_dir / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"seq_len": seq_len, "seed": seed, "domains": domains}, sort_keys=False))
    return manifest


def _is_license_file(file: importlib.metadata.PackagePath) -> bool:
    name = file.name.lower()
    in_metadata = any(part.endswith(".dist-info") for part in file.parts)
    return in_metadata and (name.startswith(("license", "licence", "copying")) or "licenses" in (p.lower() for p in file.parts))


def _clip(text: str) -> str:
    return text[:MAX_DOCUMENT_CHARS]
