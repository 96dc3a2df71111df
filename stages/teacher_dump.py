"""Stage one: manifest -> packed windows -> teacher top-k -> Zarr v3 store.

Order of work is chosen so that mistakes surface before the expensive part: the
manifest, the data and the tokenizer are checked, and the store's identity compared,
before any window is scored. Scoring of shard i + 1 overlaps the compression and
writing of shard i (one writer thread), so the teacher never waits on I/O.
"""

from __future__ import annotations

import datetime as dt
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ddk_cache import __version__
from ddk_cache.cache_format import FORMAT_NAME, FORMAT_VERSION, SPLITS, StoreLayout
from ddk_cache.cache_writer import CacheWriter
from ddk_cache.engines import TeacherEngine, create_engine
from ddk_cache.errors import DDKCacheError, EngineError, first_line
from ddk_cache.fingerprints import teacher_description, tokenizer_description
from ddk_cache.manifest import Manifest, load_manifest
from ddk_cache.packing import PackedDomain, pack_domain
from ddk_cache.provenance import package_versions
from ddk_cache.text_sources import load_domain_documents


@dataclass
class TeacherDumpConfig:
    teacher: str
    manifest: Path
    out: str
    k: int = 64
    engine: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    chunk_windows: int | None = None
    shard_windows: int | None = None
    tokenizer: str | None = None
    revision: str | None = None
    overwrite: bool = False
    storage_options: dict[str, Any] | None = None
    show_progress: bool = True


@dataclass
class DumpSummary:
    url: str
    domains: list[dict[str, Any]] = field(default_factory=list)
    tokens_scored: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_scored / self.seconds if self.seconds > 0 else 0.0


def run_teacher_dump(config: TeacherDumpConfig) -> DumpSummary:
    if config.k <= 0:
        raise DDKCacheError(f"--k must be a positive integer, got {config.k}")
    manifest = load_manifest(config.manifest)
    tokenizer = load_tokenizer(config.tokenizer or config.teacher, config.revision)
    domains = [
        pack_domain(d.name, load_domain_documents(d), tokenizer, manifest.seq_len, d.valid_sequences, d.token_budget, manifest.seed)
        for d in manifest.domains
    ]
    try:
        layout = StoreLayout.choose(manifest.seq_len, config.k, config.chunk_windows, config.shard_windows)
    except ValueError as exc:
        raise DDKCacheError(f"{exc}: fix --chunk-windows / --shard-windows") from None
    engine = create_engine(
        config.engine, config.teacher, device=config.device, dtype=config.dtype, batch_size=config.batch_size, revision=config.revision
    )
    vocab = int(engine.config.vocab_size)
    if len(tokenizer) > vocab:
        raise EngineError(f"tokenizer has {len(tokenizer)} tokens but the teacher only {vocab}: pass the teacher's own tokenizer")
    if config.k > vocab:
        raise EngineError(f"--k {config.k} exceeds the teacher's vocabulary size {vocab}")
    header = build_header(config, manifest, tokenizer, engine, layout, [d.name for d in domains])
    writer = CacheWriter.create_or_resume(config.out, header, domains, layout, config.overwrite, config.storage_options)
    return _score_all(writer, engine, domains, layout, config)


def load_tokenizer(name_or_path: str, revision: str | None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except (OSError, ValueError) as exc:
        raise DDKCacheError(f"cannot load tokenizer {name_or_path!r}: {first_line(exc)}") from None


def build_header(
    config: TeacherDumpConfig, manifest: Manifest, tokenizer, engine: TeacherEngine, layout: StoreLayout, domain_names: list[str]
) -> dict[str, Any]:
    """The store's self-description; `identity` is the part a resumed run must match exactly."""
    teacher = teacher_description(config.teacher, config.revision, engine.config)
    tokenizer_info = tokenizer_description(tokenizer)
    identity = {
        "format_version": FORMAT_VERSION,
        "teacher": teacher["weights_sha256"] or f"{teacher['name_or_path']}@{teacher['revision']}",
        "tokenizer": tokenizer_info["fingerprint"],
        "engine": engine.value_settings(),
        "k": config.k,
        "seq_len": manifest.seq_len,
        "manifest_sha256": manifest.sha256(),
        "layout": {key: value for key, value in layout.to_attrs().items() if key not in ("k", "seq_len")},
    }
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"ddk-cache {__version__}",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "identity": identity,
        "teacher": {**teacher, "dtype": engine.value_settings().get("dtype")},
        "tokenizer": tokenizer_info,
        "engine": engine.describe(),
        "capture": {
            "mode": "topk",
            "k": config.k,
            "seq_len": manifest.seq_len,
            "temperature": 1.0,
            "logprobs": "raw log_softmax of the teacher's logits, float32 before storage",
        },
        "layout": layout.to_attrs(),
        "manifest": manifest.raw,
        "manifest_sha256": manifest.sha256(),
        "seed": manifest.seed,
        "domains": domain_names,
        "versions": package_versions(),
    }


def _score_all(
    writer: CacheWriter, engine: TeacherEngine, domains: list[PackedDomain], layout: StoreLayout, config: TeacherDumpConfig
) -> DumpSummary:
    summary = DumpSummary(url=config.out)
    plan = [(d, split, writer.pending_shards(d.name, split)) for d in domains for split in SPLITS]
    summary.shards_skipped = sum(layout.n_shards(getattr(d, s).n_windows) for d, s, _ in plan) - sum(len(p) for *_, p in plan)
    total_windows = sum(layout.shard_size(i, getattr(d, s).n_windows) for d, s, shards in plan for i in shards)
    bar = tqdm(total=total_windows * layout.seq_len, unit="tok", unit_scale=True, desc="teacher-dump", disable=not config.show_progress)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddk-writer") as pool:
        in_flight: Future | None = None
        for domain, split, shards in plan:
            packed = getattr(domain, split)
            for shard in shards:
                bar.set_postfix_str(f"{domain.name}/{split} shard {shard}")
                windows = packed.windows[layout.shard_slice(shard, packed.n_windows)]
                result = engine.score(windows, config.k, progress=bar.update)
                if in_flight is not None:
                    in_flight.result()  # at most one shard buffered: bounded memory, errors surface promptly
                in_flight = pool.submit(writer.write_shard, domain.name, split, shard, windows, result)
                summary.tokens_scored += windows.shape[0] * layout.seq_len
                summary.shards_written += 1
            if split == SPLITS[-1]:
                if in_flight is not None:
                    in_flight.result()
                    in_flight = None
                summary.domains.append(writer.finish_domain(domain.name))
    summary.seconds = time.perf_counter() - start
    bar.close()
    writer.finish()
    return summary
