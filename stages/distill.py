"""Stage two: train a student from a cache alone, with the DDK domain sampler and KD losses.

One optimizer step takes one *global batch* of windows: the sampler draws a domain per window,
the planner picks each domain's next windows (the same on every rank, see `data_order.py`),
each rank trains on its contiguous slice in micro-batches (gradient accumulation), and DDP or
FSDP2 averages the gradients. Every `update_every` (K) steps the student is evaluated on each
domain's `valid/` windows (split over the ranks, sums all-reduced) and DDK reweights the domains
from the student/teacher perplexity ratio.

The shape follows torchtitan's `train.py`: every stateful piece speaks `state_dict()` /
`load_state_dict()`, one `Checkpointer` receives them all, and `train()` is a short loop of
named calls. Launched without torchrun it is a single process on one device, as before.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ddk_cache.choices import CrossTokenizer, LossImpl, Objective, parse_choice
from ddk_cache.errors import DDKCacheError, SettingError, first_line
from ddk_cache.hub import require_loadable
from ddk_cache.minillm.objective import MiniLLMConfig, MiniLLMObjective, MiniLLMParts
from ddk_cache.minillm.pretraining_data import PretrainingData
from ddk_cache.ranges import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, Range, check_ranges
from ddk_cache.store.fingerprints import weights_sha256
from ddk_cache.store.header import StoreHeader
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.checkpoint import CHECKPOINT_DIR, Checkpointer, CheckpointSettings, ModelAndOptimizer, has_checkpoint
from ddk_cache.training.cross_tokenizer_windows import CrossTokenizerView, require_coverage
from ddk_cache.training.data_order import BatchSettings, BatchShape, GlobalBatchPlanner, WindowRef, micro_batches, rank_slice
from ddk_cache.training.distributed import ParallelContext, agree, all_reduce_sum, init_parallel, launched_by_torchrun, shutdown
from ddk_cache.training.domain_samplers import COLLAPSE_WEIGHT, DDKSampler, DomainSampler, SamplerSettings
from ddk_cache.training.lora import LoRASettings, is_adapter_folder, save_merged
from ddk_cache.training.losses import KDConfig, LossParts, check_sampled_config
from ddk_cache.training.metrics_log import METRICS_NAME, MetricsLog, ReportingSettings
from ddk_cache.training.objectives import CrossTokenizerObjective, KDObjective, OnlineKDObjective, TrainingObjective, language_model_loss
from ddk_cache.training.optimizer import OptimizerSettings
from ddk_cache.training.parallelize import (
    ParallelSettings,
    clip_grad_norm,
    full_state_dict,
    gradient_sync,
    parallelize,
    reshard,
    resolve_parallel_mode,
    unwrap,
    uses_autocast,
)
from ddk_cache.training.student import check_compatible, load_student, student_context
from ddk_cache.training.student_outputs import student_outputs
from ddk_cache.training.validation_loss import DomainEval, evaluate_domains
from ddk_cache.training.window_loader import Batch, WindowLoader, domain_orders


@dataclass(frozen=True)
class DataSettings:
    """How the store is read: object-store options, and the threads decoding chunks ahead of the step."""

    storage_options: dict[str, Any] | None = None
    reader_threads: int = 2
    student_seq_len: int | None = None  # --cross-tokenizer: the student's window (None: what the first windows need)

    RANGES: ClassVar[dict[str, Range]] = {"reader_threads": Range(1, 64), "student_seq_len": Range(2)}

    def __post_init__(self) -> None:
        check_ranges({"reader_threads": self.reader_threads, "student_seq_len": self.student_seq_len}, self.RANGES)


@dataclass(frozen=True)
class ObjectiveSettings:
    """What the student minimises: KD on a cache (`kd`), MiniLLM's update on scored rollouts (`minillm`, with its
    pretraining term from `pt_store`), or KD against a live teacher as the dense reference (`online_teacher`)."""

    name: Objective = Objective.kd
    kd: KDConfig = field(default_factory=KDConfig)
    minillm: MiniLLMConfig = field(default_factory=MiniLLMConfig)
    pt_store: str | None = None  # minillm: a store of fixed text whose next-token CE is added (MiniLLM's L_PT)
    pt_weight: float = 1.0  # minillm: loss = policy gradient + single step + pt_weight * L_PT
    online_teacher: str | None = None
    loss_impl: LossImpl = LossImpl.fused  # dense: the [tokens x vocabulary] logits, the reference
    cross_tokenizer: CrossTokenizer = CrossTokenizer.off  # a student of another tokenizer (training/cross_tokenizer_loss.py)
    uld_weight: float = 1.0  # gold: the weight of ULD's term on what does not map exactly
    min_aligned: float = 0.5  # cross-tokenizer: the least share of student positions with a teacher distribution

    RANGES: ClassVar[dict[str, Range]] = {"pt_weight": NON_NEGATIVE, "uld_weight": NON_NEGATIVE, "min_aligned": FRACTION}

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", parse_choice(Objective, self.name, "--objective"))
        object.__setattr__(self, "loss_impl", parse_choice(LossImpl, self.loss_impl, "--loss-impl"))
        object.__setattr__(self, "cross_tokenizer", parse_choice(CrossTokenizer, self.cross_tokenizer, "--cross-tokenizer"))
        check_ranges({"pt_weight": self.pt_weight, "uld_weight": self.uld_weight, "min_aligned": self.min_aligned}, self.RANGES)
        if self.cross and (self.name != Objective.kd or self.online_teacher is not None):
            raise SettingError("--cross-tokenizer distils from a cache of fixed text with --objective kd (no --online-teacher)")
        if self.cross and self.kd.divergence != "forward_kl":
            raise SettingError("--cross-tokenizer compares the distributions its own way (gold, uld): drop --divergence")
        if self.pt_store is not None and self.name != Objective.minillm:
            raise SettingError("--pt-store is MiniLLM's pretraining term: it belongs to --objective minillm")

    @property
    def cross(self) -> bool:
        return self.cross_tokenizer != CrossTokenizer.off


@dataclass(frozen=True)
class DistillConfig:
    """A distill run: what it trains, on what, for how long, and one typed part per component.

    Every part checks itself when built (ranges and choices included), so a library caller gets the same
    one-line errors as the CLI; the config is never changed afterwards (frozen).
    """

    store: str
    student: str
    out: Path
    tokenizer: str | None = None
    steps: int = 200
    seed: int = 0
    batch: BatchSettings = field(default_factory=BatchSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    reporting: ReportingSettings = field(default_factory=ReportingSettings)
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)

    RANGES: ClassVar[dict[str, Range]] = {"steps": AT_LEAST_ONE, "seed": NON_NEGATIVE}

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        check_ranges({"steps": self.steps, "seed": self.seed}, self.RANGES)
        warmup = self.optimizer.warmup
        if warmup is not None and warmup > self.steps:
            raise SettingError(f"--warmup {warmup} is longer than the run (--steps {self.steps}): lower it")

    @property
    def k_steps(self) -> int:
        return self.sampler.every(self.steps)

    def run_settings(self, global_batch: int, resume: bool) -> dict[str, Any]:
        """What identifies the run: a resumed run must agree on all of it. The keys are the flags' names, as
        checkpoints of earlier versions stored them; how the work is spread over devices (ranks, micro-batch,
        accumulation, DDP/FSDP, threads) and how it is shown may change between a run and its resumption."""
        o, s, obj = self.optimizer, self.sampler, self.objective
        data = {
            "store": self.store, "student": self.student, "tokenizer": self.tokenizer, "steps": self.steps, "seed": self.seed,
            "lr": o.lr, "min_lr_ratio": o.min_lr_ratio, "warmup": o.warmup, "weight_decay": o.weight_decay, "clip": o.clip,
            "kd": dataclasses.asdict(obj.kd), "objective": obj.name.value, "minillm": dataclasses.asdict(obj.minillm),
            "pt_store": obj.pt_store, "pt_weight": obj.pt_weight, "online_teacher": obj.online_teacher,
            "sampler": s.name.value, "ddk_alpha": s.alpha, "ddk_smooth": s.smooth, "ddk_score": s.score.value,
            "ddk_temperature": s.temperature, "update_every": s.update_every, "eval_windows": s.eval_windows,
            "eval_batch_size": s.eval_batch_size, "checkpoint_every": self.checkpoint.every,
        }
        if obj.cross:  # only then: runs of the teacher's tokenizer resume checkpoints written before it existed
            data.update(cross_tokenizer=obj.cross_tokenizer.value, uld_weight=obj.uld_weight, student_seq_len=self.data.student_seq_len)
        for key in ("store", "student", "tokenizer", "online_teacher"):  # `run` and `$PWD/run` are the same folder
            if data[key] is not None and "://" not in data[key] and Path(data[key]).exists():
                data[key] = str(Path(data[key]).resolve())
        if self.lora.enabled:  # only then: runs without LoRA resume checkpoints written before it existed
            data["lora"] = self.lora.to_dict()
        return {**data, "global_batch_size": global_batch}


# Every numeric flag's range, as each part declares it: README's table states them (a test keeps it true).
DISTILL_RANGES = {**DistillConfig.RANGES, **BatchSettings.RANGES, **OptimizerSettings.RANGES, **SamplerSettings.RANGES,
                  **ObjectiveSettings.RANGES, **ParallelSettings.RANGES, **CheckpointSettings.RANGES, **DataSettings.RANGES,
                  **LoRASettings.RANGES}


@dataclass
class DistillSummary:
    out: Path
    steps: int
    first_eval: list[DomainEval]
    final_eval: list[DomainEval]
    tokens_per_second: float
    final_weights: dict[str, float]


class TrainState:
    """The loop's own progress: the next step, and the first evaluation (the "before" of the report)."""

    def __init__(self) -> None:
        self.step = 0
        self.first_eval: list[DomainEval] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "first_eval": [dataclasses.asdict(e) for e in self.first_eval or []]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.first_eval = [DomainEval(**e) for e in state["first_eval"]] or None


def run_distill(config: DistillConfig) -> DistillSummary:
    """Train, on one device or on every rank torchrun started; every rank returns the summary."""
    started_group = launched_by_torchrun() and not torch.distributed.is_initialized()
    try:
        ctx = init_parallel(config.parallel.device, config.parallel.dist_timeout)
        return Trainer(config, ctx).train()
    finally:
        if started_group:
            shutdown()


class Trainer:
    """Components built once; `train()` runs the loop."""

    def __init__(self, config: DistillConfig, ctx: ParallelContext) -> None:
        self.config, self.ctx = config, ctx
        # Set-up that can fail on one rank alone (a store a node cannot open, a bad flag): every
        # rank fails with the same one-line error instead of the others waiting in a collective.
        agree(ctx, self._set_up)
        self._build()

    def _set_up(self) -> None:
        config, objective = self.config, self.config.objective
        self.shape = BatchShape.resolve(config.batch, self.ctx.world_size)
        self.mode = resolve_parallel_mode(config.parallel.mode.value, self.ctx)
        self.reader = CacheReader(config.store, storage_options=config.data.storage_options)
        self.reader.check_metadata()  # a damaged zarr.json is refused now, before the run writes anything
        if self.reader.capture.drawn and objective.online_teacher is None:
            try:
                check_sampled_config(objective.kd)
            except ValueError as exc:
                raise DDKCacheError(f"{config.store} holds {self.reader.capture.mode} targets: {exc}") from None
        self.resume = resolve_resume(config.out, config.checkpoint.resume)
        check_objective(config, self.reader, self.resume)
        self.pt_reader = None
        if objective.pt_store is not None:
            self.pt_reader = CacheReader(objective.pt_store, storage_options=config.data.storage_options, accept_packed=True)  # windows alone
            self.pt_reader.check_metadata()
            if self.pt_reader.header.rollout is not None:
                raise DDKCacheError(f"--pt-store {objective.pt_store} is a rollout store: give a cache of fixed text (teacher-dump or pack)")
        torch.manual_seed(config.seed)  # a student built from a config starts from the same seeded weights on every rank
        self.model, self.tokenizer = load_student(config.student, config.tokenizer, trainable_adapter=True)
        adapter_student = is_adapter_folder(config.student)
        if config.lora.enabled and adapter_student:
            raise SettingError(f"--student {config.student} is a LoRA adapter already: drop --lora-rank to train it further")
        if (config.lora.enabled or adapter_student) and self.mode == "fsdp":  # new adapters, or an adapter folder trained on
            raise SettingError("LoRA students train with --parallel ddp (FSDP2 over peft's wrapped layers is not supported yet)")
        if config.lora.enabled:
            self.model = config.lora.apply(self.model)
        self.view = self._cross_tokenizer_view() if objective.cross else None
        check_compatible(self.model, self.tokenizer, self.reader.header, cross_tokenizer=objective.cross,
                         seq_len=self.view.seq_len if self.view else None)
        if self.pt_reader is not None:
            check_compatible(self.model, self.tokenizer, self.pt_reader.header)
        self.online_teacher = (_load_online_teacher(objective.online_teacher, self.reader.header, self.ctx.device)
                               if objective.online_teacher else None)
        config.out.mkdir(parents=True, exist_ok=True)  # only once everything was checked: a refused run writes nothing

    def _cross_tokenizer_view(self) -> CrossTokenizerView:
        """The cache in the student's tokens, refused in one line when too few of its positions align."""
        config = self.config
        if self.reader.header.rollout is not None:
            raise DDKCacheError(f"{config.store} is a rollout store: --cross-tokenizer distils from a cache of fixed text")
        view = CrossTokenizerView.for_store(self.reader, self.tokenizer, config.data.student_seq_len, context=student_context(self.model))
        self.coverage = view.coverage(self.reader, self.reader.domains)
        require_coverage(self.coverage, config.objective.min_aligned, config.student)
        if self.ctx.is_main and config.reporting.progress:
            tqdm.write(f"cross-tokenizer: student windows of {view.seq_len} tokens; {self.coverage.aligned_share:.1%} of positions "
                       f"aligned, {self.coverage.exact_mass_share:.1%} of the teacher's mass there maps exactly, "
                       f"{self.coverage.cut_share:.1%} of student tokens cut", file=sys.stderr)
        return view

    def _build(self) -> None:
        config, reader = self.config, self.reader
        self.domains = reader.domains
        self.model.train()
        self.model = parallelize(self.model, self.mode, self.ctx)
        self.autocast_dtype = uses_autocast(self.mode, self.ctx.device)
        self.optimizer, self.scheduler = config.optimizer.build(self.model, config.steps)
        self.sampler: DomainSampler = config.sampler.build(self.domains, list(reader.header.manifest_weights().values()))
        orders = domain_orders(reader, self.domains, config.seed)
        self.planner = GlobalBatchPlanner(orders, self.shape.global_size, config.seed)
        self.loader = WindowLoader(reader, orders, threads=config.data.reader_threads, view=self.view)
        self.state = TrainState()
        self.objective = build_objective(config.objective, reader.header.teacher.vocab_size, self.online_teacher, self._autocast)
        self.tokens_per_step = self.shape.global_size * (self.view.seq_len if self.view else reader.header.seq_len)
        self.pretraining = None if self.pt_reader is None else PretrainingData(self.pt_reader, self.shape.global_size, config.seed + 1)
        states = {"model_and_optimizer": ModelAndOptimizer(self.model, self.optimizer), "lr_scheduler": self.scheduler,
                  "sampler": self.sampler, "data": self.planner, "train_state": self.state}
        if self.pretraining is not None:
            states["pretraining_data"] = self.pretraining
        self.checkpointer = Checkpointer(config.out, states, config.run_settings(self.shape.global_size, self.resume), self.ctx)
        self.metrics = MetricsLog(config.out, tuple(t.value for t in config.reporting.report_to), enabled=self.ctx.is_main)
        self.train_seconds, self._start_step = 0.0, 0
        self.collapse_warned: str | None = None  # the domain DDK's factor collapsed onto, once said

    # -- the loop -------------------------------------------------------------------------

    def train(self) -> DistillSummary:
        config = self.config
        self.load_checkpoint()
        bar = tqdm(total=config.steps, initial=self.state.step, desc="distill", unit="step",
                   disable=not (config.reporting.progress and self.ctx.is_main))
        try:
            while self.state.step < config.steps:
                record: dict[str, Any] = {"step": self.state.step}
                if self.state.step % config.k_steps == 0:
                    record.update(self.validate())
                record.update(self.train_step())
                self.state.step += 1
                self.metrics.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                self.maybe_checkpoint()
            final_eval = self.evaluate()
            self.metrics.write({"step": config.steps, "final_eval": [e.to_dict() for e in final_eval]})
        finally:
            bar.close()
            self.loader.close()
            if self.pretraining is not None:
                self.pretraining.close()
            self.metrics.close()
        self.save_student()
        self.checkpointer.remove_all()
        return DistillSummary(
            out=config.out,
            steps=config.steps,
            first_eval=self.state.first_eval or final_eval,
            final_eval=final_eval,
            tokens_per_second=self.tokens_per_step * (config.steps - self._start_step) / self.train_seconds if self.train_seconds else 0.0,
            final_weights=self.sampler.weights_by_domain(),
        )

    def load_checkpoint(self) -> None:
        step = self.checkpointer.latest_step() if self.resume else None
        if step is not None:
            self.checkpointer.load(step)
        self.metrics.open(self.state.step)
        self._start_step = self.state.step

    def train_step(self) -> dict[str, float]:
        """One optimizer step over this rank's share of the global batch; returns the logged parts."""
        step, shape = self.state.step, self.shape
        torch.manual_seed(_step_seed(self.config.seed, step, self.ctx.rank))  # dropout, if the student has any
        started = time.perf_counter()
        mine = rank_slice(self.planner.plan(step, self.sampler), self.ctx.rank, self.ctx.world_size)
        self._read_ahead(mine)
        sums: dict[str, float] = {}
        micro = micro_batches(mine, shape.micro)
        pretraining = self.pretraining.micro_batches(step, self.ctx, shape.micro) if self.pretraining is not None else None
        for index, refs in enumerate(micro):
            batch = self.loader.batch(refs).to(self.ctx.device)
            with gradient_sync(self.model, last_micro_batch=index == len(micro) - 1):
                parts = self.forward_loss(batch)
                if pretraining is not None:
                    parts = self.add_pretraining(parts, self.pretraining.batch(pretraining[index]).to(self.ctx.device))
                (parts.total / shape.accum).backward()
            for name, value in self.objective.log_parts(parts).items():
                sums[name] = sums.get(name, 0.0) + value / shape.accum
        record: dict[str, float] = {}
        clip = self.config.optimizer.clip
        if clip > 0:
            record["grad_norm"] = clip_grad_norm(self.model, clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        reduced = all_reduce_sum(self.ctx, torch.tensor(list(sums.values()), dtype=torch.float64)) / self.ctx.world_size
        elapsed = time.perf_counter() - started
        self.train_seconds += elapsed
        return {**dict(zip(sums, (float(v) for v in reduced))), **record, "lr": self.scheduler.get_last_lr()[0],
                "tokens_per_s": self.tokens_per_step / elapsed}

    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()

    def forward_loss(self, batch: Batch) -> LossParts | MiniLLMParts:
        with self._autocast():
            outputs = student_outputs(self.model, batch.input_ids, self.config.objective.loss_impl)
        return self.objective.loss(outputs, batch)

    def add_pretraining(self, parts: MiniLLMParts, batch: Batch) -> MiniLLMParts:
        """MiniLLM's L_PT: the student's next-token CE on a pretraining batch, weighted by `pt_weight`."""
        with self._autocast():
            outputs = student_outputs(self.model, batch.input_ids, self.config.objective.loss_impl)
        lm = language_model_loss(outputs, batch.targets)
        return dataclasses.replace(parts, total=parts.total + self.config.objective.pt_weight * lm, pretraining=lm)

    def validate(self) -> dict[str, Any]:
        """DDK's update: evaluate every domain, reweight the sampler (identically on every rank)."""
        evals = self.evaluate()
        self.state.first_eval = self.state.first_eval or evals
        self.sampler.update([e.student_ppl for e in evals], [e.teacher_ppl for e in evals])
        record = {"eval": {e.domain: {"student_ppl": e.student_ppl, "teacher_ppl": e.teacher_ppl} for e in evals},
                  "domain_weights": self.sampler.weights_by_domain()}
        collapsed = self.sampler.collapsed_onto() if isinstance(self.sampler, DDKSampler) else None
        if collapsed is not None:
            record["ddk_collapsed"] = collapsed
            self.warn_collapse(collapsed)
        return record

    def warn_collapse(self, domain: str) -> None:
        """One line on stderr, the first time (and when the domain changes): a collapsed sampler trains one domain."""
        if not self.ctx.is_main or self.collapse_warned == domain:
            return
        self.collapse_warned = domain
        tqdm.write(f"warning: step {self.state.step}: DDK's factor puts >= {COLLAPSE_WEIGHT} on {domain!r} (collapsed: the other "
                   "domains get the floor); see README, 'When DDK's factor collapses' (--sampler uniform first, or --ddk-score "
                   "ce-ratio)", file=sys.stderr)

    def evaluate(self) -> list[DomainEval]:
        model = unwrap(self.model)  # DDP needs no wrapper to run forwards; FSDP2 is the module itself
        sampler = self.config.sampler
        evals = evaluate_domains(model, self.reader, self.domains, sampler.eval_windows, sampler.eval_batch_size, self.autocast_dtype, self.ctx,
                                 self.config.objective.loss_impl, self.view)
        reshard(self.model)
        return evals

    def maybe_checkpoint(self) -> None:
        done, config = self.state.step, self.config
        if done < config.steps and done % (config.checkpoint.every or config.k_steps) == 0:
            self.checkpointer.save(done)

    def save_student(self) -> None:
        """`save_pretrained` by rank 0, with the full weights gathered from every rank under FSDP."""
        weights = full_state_dict(self.model) if self.mode == "fsdp" else None
        if self.ctx.is_main:
            if not self.config.reporting.progress:  # transformers draws its own "Writing model shards" bar otherwise
                from transformers.utils import logging as hf_logging  # heavy: transformers loads only when a model or tokenizer does

                hf_logging.disable_progress_bar()
            unwrap(self.model).save_pretrained(self.config.out, state_dict=weights)  # a LoRA student: the adapter alone
            self.tokenizer.save_pretrained(self.config.out)
            if self.config.lora.merge:
                save_merged(unwrap(self.model), self.tokenizer, self.config.out)

    def _read_ahead(self, mine: list[WindowRef]) -> None:
        """Decode this step's chunks now and the next step's behind it (with today's weights)."""
        step = self.state.step
        ahead = rank_slice(self.planner.peek(step + 1, self.sampler), self.ctx.rank, self.ctx.world_size) if step + 1 < self.config.steps else []
        self.loader.retain(mine + ahead)
        self.loader.prefetch(mine)
        self.loader.prefetch(ahead)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def build_objective(settings: ObjectiveSettings, teacher_vocab: int, online_teacher: torch.nn.Module | None,
                    autocast: Callable[[], AbstractContextManager]) -> TrainingObjective:
    """The one place that turns `--objective` (and `--online-teacher`) into the object `train_step` calls."""
    if online_teacher is not None:
        return OnlineKDObjective(online_teacher, settings.kd, autocast)
    if settings.name == Objective.minillm:
        return MiniLLMObjective(settings.minillm, teacher_vocab)
    if settings.cross:
        return CrossTokenizerObjective(settings.kd, settings.cross_tokenizer.value, settings.uld_weight)
    return KDObjective(settings.kd, teacher_vocab)


def _load_online_teacher(path: str, header: StoreHeader, device: torch.device) -> torch.nn.Module:
    """The live teacher for the dense reference; it must be the teacher that made the cache."""
    from transformers import AutoModelForCausalLM  # heavy: transformers loads only when a model or tokenizer does

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    require_loadable(path, "online teacher")
    try:
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise DDKCacheError(f"cannot load the online teacher {path!r}: {first_line(exc)}") from None
    cached_vocab = header.teacher.vocab_size
    if int(teacher.config.vocab_size) != cached_vocab:
        raise DDKCacheError(
            f"the online teacher has vocabulary {teacher.config.vocab_size}, the cache's teacher {cached_vocab}: pass the teacher that made the cache"
        )
    return teacher.to(device).eval().requires_grad_(False)


def check_objective(config: DistillConfig, reader: CacheReader, resume: bool) -> None:
    """A rollout store only trains MiniLLM's update, and MiniLLM only trains on one, from the policy that sampled it."""
    rollout, objective = reader.header.rollout, config.objective
    if objective.name == Objective.kd and rollout is not None and rollout.sampled:
        raise DDKCacheError(f"{config.store} is a rollout store (MiniLLM round {rollout.round}): train on it with --objective minillm")
    if objective.name == Objective.kd and rollout is not None and objective.online_teacher is not None:
        raise DDKCacheError("--online-teacher is the dense KD reference on fixed text; a store of reference answers trains with the cache")
    if objective.name == Objective.minillm:
        if rollout is not None and not rollout.sampled:
            raise DDKCacheError(f"{config.store} holds the reference answers, not the student's samples: MiniLLM's policy gradient needs "
                                "`ddk-cache rollout` without --responses references (train on this one with --objective kd)")
        if rollout is None:
            raise DDKCacheError(f"--objective minillm trains on the student's own scored samples; {config.store} is a cache of fixed text: "
                                "make one with `ddk-cache rollout`, then score it with teacher-dump")
        if objective.online_teacher is not None:
            raise DDKCacheError("--online-teacher is the dense KD reference; it does not apply to --objective minillm")
        if reader.capture.drawn:
            raise DDKCacheError(f"{config.store} holds {reader.capture.mode} teacher targets: MiniLLM's single-step reverse KL needs the "
                                "teacher's probabilities; score the rollouts with --mode topk or topp")
        student = weights_sha256(config.student) if Path(config.student).is_dir() else None
        if rollout.student_weights_sha256 and student and student != rollout.student_weights_sha256 and not resume:
            raise DDKCacheError(f"{config.student} is not the student that sampled {config.store} (round {rollout.round}, "
                                f"{rollout.student}): update the weights that sampled, or roll out again with this student")


def resolve_resume(out: Path, resume: bool | str) -> bool:
    """Whether this run continues the one in `out`: `--out` is a new run, or (with --resume) a killed one;
    never a finished run or a regular file. "auto" (job scripts re-run after every preemption) continues
    it if it has a checkpoint."""
    if out.exists() and not out.is_dir():
        raise DDKCacheError(f"--out {out} is a file: choose a folder")
    checkpoint = out.is_dir() and has_checkpoint(out)
    entries = {entry.name for entry in out.iterdir()} if out.is_dir() else set()
    if entries and not entries & {METRICS_NAME, CHECKPOINT_DIR}:
        raise DDKCacheError(f"--out {out} holds other files, not a distill run: choose a new or empty folder")
    resume = checkpoint if resume == "auto" else bool(resume)
    if resume and not checkpoint:
        raise DDKCacheError(f"{out} holds no checkpoint to resume: run without --resume")
    if not resume and checkpoint:
        raise DDKCacheError(f"{out} already holds a distill run: pass --resume to continue it, or choose another --out")
    if not checkpoint and (out / METRICS_NAME).exists() and (out / "config.json").exists():
        raise DDKCacheError(f"{out} already holds a finished distill run: choose another --out")
    return resume
