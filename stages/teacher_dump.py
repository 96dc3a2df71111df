"""Stage one: manifest -> packed windows -> teacher top-k -> Zarr v3 store.

Order of work is chosen so that mistakes surface before the expensive part: the
manifest, the data and the tokenizer are checked, and the store's identity compared,
before any window is scored. Scoring of shard i + 1 overlaps the compression and
writing of shard i (one writer thread), so the teacher never waits on I/O. With
`processes.data_parallel = N`, N engine processes share the pending shards (`data_parallel.py`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ddk_cache.choices import EngineName, parse_choice
from ddk_cache.data.manifest import load_manifest
from ddk_cache.data.packing import pack_domain
from ddk_cache.data.sources import load_domain_documents
from ddk_cache.engines import EngineInfo, EngineOptions, TeacherEngine, create_engine
from ddk_cache.engines.options import check_applicable
from ddk_cache.engines.registry import EngineChoice, choose_engine
from ddk_cache.errors import DDKCacheError, EngineError
from ddk_cache.hub import require_loadable
from ddk_cache.stages.data_parallel import run_data_parallel
from ddk_cache.stages.nodes import NodePlace, NodeSettings, all_shards_done, open_as_follower, wait_for_store
from ddk_cache.stages.pack import check_same_tokenizer, load_tokenizer, open_packed, packing_header
from ddk_cache.stages.scoring import ProcessSettings, ScoringPlan, ShardJob, pending_jobs, progress_bar, score_jobs
from ddk_cache.store.capture import Capture
from ddk_cache.store.embedded_tokenizer import tokenizer_files
from ddk_cache.store.fingerprints import teacher_description, tokenizer_fingerprint
from ddk_cache.store.format import FORMAT_VERSION, SPLITS, LayoutSettings, StoreLayout
from ddk_cache.store.header import PERMUTATION_RULE, CaptureInfo, EngineRecord, LayoutInfo, PackingInfo, StoreHeader, TeacherInfo
from ddk_cache.store.lease import WriterLease
from ddk_cache.store.provenance import package_versions
from ddk_cache.store.writer import CacheWriter

# Every numeric setting's range (ranges.py); the engine's and the capture's are checked by their own types
DUMP_RANGES = {**ProcessSettings.RANGES, **NodeSettings.RANGES, **LayoutSettings.RANGES}


@dataclass(frozen=True)
class TeacherDumpConfig:
    """A teacher-dump run: which teacher scores what into where, with the capture and the engine's options as typed
    parts of their own, each checked when built: `Capture`, `EngineOptions`, the store's `LayoutSettings`, the
    `NodeSettings` of several nodes and the `ProcessSettings` of one node's engine processes."""

    teacher: str
    manifest: Path | None  # None: score the store at `out` that `ddk-cache pack` wrote
    out: str
    capture: Capture = field(default_factory=Capture)  # what is kept per position (mode, k, draws, quantization)
    engine: EngineName = EngineName.auto
    engine_options: EngineOptions = field(default_factory=EngineOptions)
    layout: LayoutSettings = field(default_factory=LayoutSettings)
    nodes: NodeSettings = field(default_factory=NodeSettings)
    processes: ProcessSettings = field(default_factory=ProcessSettings)
    tokenizer: str | None = None
    overwrite: bool = False
    storage_options: dict[str, Any] | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "engine", parse_choice(EngineName, self.engine, "--engine"))

    @property
    def revision(self) -> str | None:
        return self.engine_options.revision


@dataclass
class DumpSummary:
    url: str
    domains: list[dict[str, Any]] = field(default_factory=list)
    tokens_scored: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    node: NodePlace = field(default_factory=NodePlace)
    complete: bool = True  # False: this node's shards are done, other nodes' are not yet
    engine: EngineChoice | None = None  # which engine scored, and why

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_scored / self.seconds if self.seconds > 0 else 0.0


def run_teacher_dump(config: TeacherDumpConfig, engine: TeacherEngine | None = None) -> DumpSummary:
    """`engine`: a teacher already loaded (a notebook or benchmark scoring several stores with one model);
    it must be the one `config.teacher` names. By default the run loads its own."""
    capture = config.capture
    if engine is not None and config.processes.data_parallel > 1:
        raise DDKCacheError("a loaded engine scores in this process only: use --data-parallel 1")
    node = config.nodes.resolve()
    if node.count > 1 and config.overwrite:
        raise DDKCacheError("--overwrite with several nodes would let a node write into a store that node 0 is replacing: "
                            "delete the store (or run node 0 alone with --overwrite) first")
    # what the options and the capture mode decide, before the data is read: a wrong flag fails at once. `auto` with
    # no engine option decides in `_dump`, knowing the job's size (tokens=0 here: no vLLM import for this check)
    engine_name = choose_engine(config.engine.value, config.engine_options, drawn=capture.drawn, tokens=0).name
    check_applicable(engine_name, config.engine_options)
    if capture.drawn and engine_name == "vllm":
        from ddk_cache.engines.vllm_engine import SAMPLING_UNSUPPORTED  # the engine a run does not use is never imported (torch / vLLM)

        raise EngineError(SAMPLING_UNSUPPORTED)
    # this node's place in the store, held until the end: a second writer of it stops here, before touching anything
    with WriterLease(config.out, f"node-{node.rank}", "teacher-dump", config.storage_options):
        return _dump(config, engine, node)


def _dump(config: TeacherDumpConfig, engine: TeacherEngine | None, node: NodePlace) -> DumpSummary:
    capture = config.capture
    if config.manifest is not None:  # pack in memory, then score: one command on one node
        manifest = load_manifest(config.manifest)
        tokenizer = teacher_tokenizer(config)
        domains: list = [
            pack_domain(d.name, load_domain_documents(d), tokenizer, manifest.seq_len, d.valid_sequences, d.token_budget, manifest.seed)
            for d in manifest.domains
        ]
        try:
            layout = StoreLayout.choose(manifest.seq_len, capture, None, config.layout.chunk_windows, config.layout.shard_windows)
        except ValueError as exc:
            raise DDKCacheError(f"{exc}: fix --chunk-windows / --shard-windows") from None
        # packing.py's in-memory rule
        files = tokenizer_files(tokenizer)  # embedded in the store, so its ids stay readable without the teacher's folder
        packed_header = packing_header(manifest, tokenizer, layout, [d.name for d in domains], PackingInfo(PERMUTATION_RULE), files)
    else:  # score a store that `ddk-cache pack` wrote: its windows, tokenizer and layout are fixed
        packed_header, domains = open_packed(config.out, config.storage_options)
        files = None  # `pack` embedded the tokenizer (stores packed before it did can have it attached)
        if config.layout.given:
            raise DDKCacheError(f"{config.out} is packed: its chunks and shards are fixed; drop --chunk-windows / --shard-windows")
        tokenizer = teacher_tokenizer(config, packed_header)
        geometry = packed_header.layout
        layout = StoreLayout(geometry.seq_len, capture, None, geometry.chunk_windows, geometry.shard_windows)

    choice = engine_choice(config, engine, domains, layout.seq_len, node)
    if config.progress:
        print(f"teacher-dump: engine {choice.name} ({choice.reason})", file=sys.stderr, flush=True)

    def open_writer(info: EngineInfo) -> CacheWriter:
        """Called once the engine is up (its identity is part of the store's), before any scoring."""
        if info.context_length is not None and layout.seq_len > info.context_length:
            raise EngineError(f"seq_len {layout.seq_len} is longer than the teacher's context ({info.context_length} positions): "
                              "lower seq_len in the manifest (or pack again)")
        if len(tokenizer) > info.vocab_size:
            raise EngineError(f"tokenizer has {len(tokenizer)} tokens but the teacher only {info.vocab_size}: pass the teacher's own tokenizer")
        if capture.mode != "sampled" and capture.k > info.vocab_size:
            raise EngineError(f"--k {capture.k} exceeds the teacher's vocabulary size {info.vocab_size}")
        if capture.mode == "headtail" and capture.k >= info.vocab_size:
            raise EngineError(f"--k {capture.k} leaves no tail to draw from in the teacher's {info.vocab_size}-token vocabulary: lower --k")
        sized = replace(layout, vocab_size=info.vocab_size)  # the id dtype follows the teacher's vocabulary
        header = scoring_header(packed_header, config, info, sized, choice)
        if node.creates_store:
            if config.manifest is None:
                return CacheWriter.add_targets(config.out, header, domains, sized, config.overwrite, config.storage_options)
            return CacheWriter.create_or_resume(config.out, header, domains, sized, config.overwrite, config.storage_options,
                                                clean_partial=node.count == 1, tokenizer_files=files)
        wait_for_store(config.out, header.identity, config.storage_options, config.nodes.create_timeout)
        return open_as_follower(config.out, sized, domains if config.manifest is not None else [], config.storage_options)

    summary = DumpSummary(url=config.out, node=node, engine=choice)

    def plan_jobs(writer: CacheWriter) -> list[ShardJob]:
        """This node's pending shards, counted into the summary, once the store is open."""
        jobs, summary.shards_skipped = pending_jobs(writer, domains, layout, node)
        summary.shards_written, summary.tokens_scored = len(jobs), sum(job.n_windows for job in jobs) * layout.seq_len
        return jobs

    plan = scoring_plan(config)
    if config.processes.data_parallel > 1:
        writer, summary.seconds = run_data_parallel(plan, choice.name, layout, open_writer, plan_jobs)
    else:
        own = engine is None  # an engine passed in stays open for the caller's next store
        engine = engine or create_engine(choice.name, config.teacher, config.engine_options, max_k=capture.engine_k)
        try:
            writer = open_writer(EngineInfo.of(engine))
            jobs = plan_jobs(writer)
            start = time.perf_counter()  # scoring and writing only: model loading is not throughput
            with progress_bar(jobs, layout, config.progress) as bar:
                score_jobs(engine, writer, jobs, capture, bar.update, plan.processes.threads_per_process())
            summary.seconds = time.perf_counter() - start
        finally:
            if own:
                engine.close()
    # whichever node sees every shard marked completes the store (idempotent: same values from any node)
    summary.complete = node.count == 1 or all_shards_done(writer, domains)
    if summary.complete:
        summary.domains = [writer.finish_domain(d.name) for d in domains]
        writer.finish()
    return summary


def scoring_plan(config: TeacherDumpConfig) -> ScoringPlan:
    return ScoringPlan(config.teacher, config.engine_options, config.capture, config.out, config.storage_options,
                       config.processes, config.progress)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def teacher_tokenizer(config: TeacherDumpConfig, packed: StoreHeader | None = None):
    """The tokenizer the windows are made (or were packed) with: a packed store's first, since its windows are fixed.
    `--tokenizer` is for a teacher folder without one; where the teacher has its own, a different one is refused:
    its ids would mean other tokens to the teacher (a smaller vocabulary passes the size check and silently scores
    the wrong text)."""
    require_loadable(config.teacher, "teacher", config.revision)  # before its tokenizer: the name the user gave, said at once
    tokenizer = load_tokenizer(config.tokenizer or config.teacher, config.revision)
    if packed is not None:
        check_same_tokenizer(tokenizer, packed, config.out)
    folder = Path(config.teacher)
    if config.tokenizer is not None and folder.is_dir() and any((folder / name).exists() for name in TOKENIZER_FILES):
        own = load_tokenizer(config.teacher, config.revision)
        if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(own):
            raise DDKCacheError(f"--tokenizer {config.tokenizer} ({len(tokenizer)} tokens) is not the teacher's own tokenizer "
                                f"({len(own)} tokens in {config.teacher}): its ids would mean other tokens to the teacher; "
                                "drop --tokenizer")
    return tokenizer


def engine_choice(config: TeacherDumpConfig, engine: TeacherEngine | None, domains: list, seq_len: int, node: NodePlace) -> EngineChoice:
    """The engine this node runs: a loaded one as given; `auto` decides knowing the tokens this node scores
    (its share of every domain's windows; shards already done on a resume are counted too)."""
    if engine is not None:
        return EngineChoice(engine.name, "a loaded engine was passed to run_teacher_dump")
    windows = sum(getattr(domain, split).n_windows for domain in domains for split in SPLITS)
    tokens = windows * seq_len // node.count
    return choose_engine(config.engine.value, config.engine_options, drawn=config.capture.drawn, tokens=tokens)


def scoring_header(packed: StoreHeader, config: TeacherDumpConfig, engine: EngineInfo, layout: StoreLayout,
                   choice: EngineChoice | None = None) -> StoreHeader:
    """The packed header with what scoring adds; `identity` is the part a resumed run must match exactly."""
    teacher = TeacherInfo.from_dict({**teacher_description(config.teacher, config.revision, engine),
                                     "dtype": engine.value_settings.get("dtype")})
    identity = {
        "format_version": FORMAT_VERSION,
        "teacher": teacher.weights_sha256 or f"{teacher.name_or_path}@{teacher.revision}",
        "tokenizer": packed.tokenizer.fingerprint,
        "engine": engine.value_settings,
        "capture": config.capture.to_attrs(),
        "seq_len": layout.seq_len,
        "manifest_sha256": packed.manifest_sha256,
        "layout": {key: value for key, value in layout.to_attrs().items() if key not in ("capture", "seq_len")},
    }
    return replace(
        packed,
        status="writing",
        identity=identity,
        teacher=teacher,
        engine=EngineRecord.from_dict({**engine.description, "data_parallel": config.processes.data_parallel,
                                       "selected_by": None if choice is None else choice.reason}),
        capture=CaptureInfo(config.capture, layout.seq_len),
        layout=LayoutInfo(layout.seq_len, layout.chunk_windows, layout.shard_windows, layout.capture, layout.vocab_size),  # + the codecs, once written
        versions=package_versions(),
    )


