"""`ddk-cache inspect`: what a store holds and where it came from, as readable tables."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table

from ddk_cache.store.format import SPLITS
from ddk_cache.store.header import FORMAT_NAME, PackingInfo
from ddk_cache.store.reader import CacheReader
from ddk_cache.tables import name_table


def domain_rows(reader: CacheReader) -> list[dict[str, Any]]:
    """One row per domain and split: windows, tokens, shards written, bytes stored per token."""
    rows = []
    for domain in reader.domains:
        if not reader.has_domain(domain):  # a dump killed while creating the store's groups
            rows.append({"domain": domain, "split": "not created", "windows": 0, "tokens": 0, "documents": 0,
                         "shards": "0/0", "bytes_per_token": 0.0, "entries_per_position": 0.0, "teacher_valid_ppl": None, "teacher_valid_loss": None})
            continue
        info = reader.domain_info(domain)
        for split in SPLITS:
            recorded = info.split(split)
            if recorded is None:  # `pack` is still writing this domain
                rows.append({"domain": domain, "split": f"{split} (packing)", "windows": 0, "tokens": 0, "documents": 0, "shards": "",
                             "bytes_per_token": 0.0, "entries_per_position": 0.0, "teacher_valid_ppl": None, "teacher_valid_loss": None})
                continue
            tokens = recorded.tokens
            stored = reader.bytes_stored(domain, split)
            done, total = reader.shards_done(domain, split)
            rows.append(
                {
                    "domain": domain,
                    "split": split,
                    "windows": recorded.windows,
                    "tokens": tokens,
                    "documents": recorded.documents,
                    "shards": f"{done}/{total}",
                    "bytes_per_token": stored / tokens if tokens else 0.0,
                    "entries_per_position": reader.mean_entries(domain, split),
                    "teacher_valid_ppl": info.teacher_valid_ppl if split == "valid" else None,
                    "teacher_valid_loss": info.teacher_valid_loss if split == "valid" else None,
                }
            )
    return rows


def render_inspection(reader: CacheReader) -> Group:
    header = reader.header
    rows = domain_rows(reader)
    table = name_table(f"ddk-cache store {reader.url} ({header.status})",
                       ("domain", "split", "windows", "tokens", "docs", "shards", "entries", "B/token", "teacher ppl"), name_columns=2)
    for row in rows:
        ppl = row["teacher_valid_ppl"]
        table.add_row(
            row["domain"],
            row["split"],
            f"{row['windows']:,}",
            f"{row['tokens']:,}",
            f"{row['documents']:,}",
            row["shards"],
            f"{row['entries_per_position']:.1f}",
            f"{row['bytes_per_token']:.1f}",
            f"{ppl:.3f}" if ppl is not None else "",
        )
    provenance = Table(title="provenance", show_header=False)
    provenance.add_column("field")
    provenance.add_column("value", overflow="fold")
    tokenizer = header.tokenizer
    rows = [
        ("format", f"{FORMAT_NAME} v{header.format_version}"),
        ("tokenizer", f"{tokenizer.name_or_path} ({tokenizer.class_name}, {tokenizer.size} tokens)"),
        ("tokenizer fingerprint", tokenizer.fingerprint),
        ("tokenizer files", f"in the store: {', '.join(tokenizer.files)}" if tokenizer.files
         else "not in the store (written before stores carried them): add them with `ddk-cache attach-tokenizer`"),
    ]
    teacher, engine, capture = header.teacher, header.engine, header.capture
    if teacher is None or capture is None:
        rows.append(("teacher", "none yet: packed windows only (score them with teacher-dump --out this store, no --manifest)"))
    else:
        rows += [
            ("teacher", teacher.name_or_path),
            ("teacher weights", teacher.weights_sha256 or f"revision {teacher.revision}"),
            ("teacher arch / vocab / dtype", f"{teacher.architecture} / {teacher.vocab_size} / {teacher.dtype}"),
            ("engine", f"{engine.name} {engine.version} {engine.settings}" if engine else "not recorded"),
            ("capture", f"{capture.capture.describe()}; seq_len={capture.seq_len} T={capture.temperature}"),
        ]
    if header.rollout is not None:
        rollout = header.rollout
        rows.append(("rollout", f"round {rollout.round}: {rollout.generator} responses of {rollout.student} "
                                f"({rollout.student_weights_sha256 or 'weights not hashed'}), seed {rollout.seed}, "
                                f"{rollout.train_prompts} train / {rollout.test_prompts} test prompts"
                                + (f"; train responses sampled from {1 - rollout.teacher_mix:g} student + {rollout.teacher_mix:g} "
                                   f"teacher {rollout.mix_teacher}" if rollout.teacher_mix else "")))
    rows += [
        ("layout", str(header.layout.to_dict())),
        ("packing", str((header.packing or PackingInfo()).to_dict())),
        ("manifest sha256", header.manifest_sha256),
        ("created", f"{header.created_at} by {header.created_by}"),
        ("packed", header.packed_at or "with the scoring (one command)"),
        ("completed", header.completed_at or "not yet"),
        ("versions", ", ".join(f"{k} {v}" for k, v in header.versions.items() if v)),
    ]
    for field, value in rows:
        provenance.add_row(field, value)
    return Group(table, provenance)


def open_for_inspection(url: str, storage_options: dict | None = None) -> CacheReader:
    """A store opened as `inspect` reads it: incomplete stores too, since inspecting one is how you learn why."""
    return CacheReader(url, storage_options=storage_options, allow_incomplete=True)


def inspection_json(reader: CacheReader) -> dict[str, Any]:
    """`inspect --json`: the header and the per-split sizes."""
    return {"url": reader.url, "status": reader.header.status, "header": reader.header.to_dict(), "splits": domain_rows(reader)}
