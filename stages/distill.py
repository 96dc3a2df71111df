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
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ddk_cache.errors import DDKCacheError, first_line, require_local_if_path
from ddk_cache.minillm.objective import MiniLLMConfig, MiniLLMParts, minillm_loss
from ddk_cache.minillm.pretraining_data import PretrainingData
from ddk_cache.ranges import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, Range, check_ranges
from ddk_cache.store.fingerprints import weights_sha256
from ddk_cache.store.header import StoreHeader
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.checkpoint import CHECKPOINT_DIR, Checkpointer, ModelAndOptimizer, has_checkpoint
from ddk_cache.training.data_order import GlobalBatchPlanner, WindowRef, micro_batches, rank_slice
from ddk_cache.training.distributed import ParallelContext, agree, all_reduce_sum, init_parallel, launched_by_torchrun, shutdown
from ddk_cache.training.domain_samplers import DDK_SCORES, SAMPLER_NAMES, DomainSampler, create_sampler
from ddk_cache.training.losses import KDConfig, LossParts, check_sampled_config, dense_distillation_loss, distillation_loss
from ddk_cache.training.metrics_log import METRICS_NAME, REPORT_TARGETS, MetricsLog
from ddk_cache.training.optimizer import build_optimizer, build_scheduler
from ddk_cache.training.parallelize import (
    clip_grad_norm,
    full_state_dict,
    gradient_sync,
    parallelize,
    reshard,
    resolve_parallel_mode,
    unwrap,
    uses_autocast,
)
from ddk_cache.training.student import check_compatible, load_student
from ddk_cache.training.validation_loss import DomainEval, evaluate_domains
from ddk_cache.training.window_loader import Batch, WindowLoader, domain_orders

# Settings that may differ between a run and its resumption: how the work is spread over
# devices (world size, micro-batch, accumulation, DDP/FSDP) and how it is shown. The global
# batch, the data, the model and the optimisation must match.
RESUMABLE_CHANGES = ("out", "resume", "progress", "storage_options", "batch_size", "grad_accum", "global_batch_size",
                     "parallel", "device", "dist_timeout", "reader_threads", "report_to")


@dataclass
class DistillConfig:
    store: str
    student: str
    out: Path
    tokenizer: str | None = None
    steps: int = 200
    batch_size: int = 8  # micro-batch: windows per forward pass on each rank
    grad_accum: int | None = None  # micro-batches per rank per step; default: what the global batch implies, else 1
    global_batch_size: int | None = None  # windows per optimizer step over all ranks; default: batch_size x grad_accum x ranks
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # DDK: 3e-5 -> 3e-6
    warmup: int | None = None  # default: min(1000, steps // 10)
    weight_decay: float = 0.1
    clip: float = 1.0
    kd: KDConfig = field(default_factory=KDConfig)
    objective: str = "kd"  # "kd": CE + KD on a cache; "minillm": MiniLLM's update on a scored rollout store (minillm/objective.py)
    minillm: MiniLLMConfig = field(default_factory=MiniLLMConfig)
    pt_store: str | None = None  # minillm: a store of fixed text whose next-token CE is added (MiniLLM's L_PT)
    pt_weight: float = 1.0  # minillm: loss = policy gradient + single step + pt_weight * L_PT
    sampler: str = "ddk"
    ddk_alpha: float = 0.5
    ddk_smooth: bool = True
    ddk_score: str = "ppl-ratio"  # the paper's rule; "ce-ratio": cross-entropy ratios (see training/domain_samplers.py)
    ddk_temperature: float = 1.0  # scores are divided by it before DDK's softmax
    update_every: int | None = None  # K; default: min(1000, max(1, steps // 10))
    eval_windows: int = 32
    eval_batch_size: int = 8
    checkpoint_every: int = 0  # 0: every K steps
    seed: int = 0
    device: str = "auto"
    parallel: str = "auto"  # none, ddp or fsdp; auto: ddp under torchrun with several ranks
    dist_timeout: float = 600.0  # seconds a collective may wait for a rank before the job fails
    reader_threads: int = 2
    resume: bool | str = False  # True: continue the run in `out`; "auto": continue it if it has a checkpoint, else start
    online_teacher: str | None = None  # reference mode: dense KD from the live teacher, not the cache
    storage_options: dict[str, Any] | None = None
    progress: bool = True
    report_to: tuple[str, ...] = ()  # beside metrics.jsonl: "tensorboard" (OUT/tensorboard)

    @property
    def k_steps(self) -> int:
        return self.update_every or min(1000, max(1, self.steps // 10))

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(1000, self.steps // 10)

    def run_settings(self, global_batch: int) -> dict[str, Any]:
        """What identifies the run: a resumed run must agree on all of it."""
        data = dataclasses.asdict(self)
        for key in RESUMABLE_CHANGES:
            data.pop(key)
        for key in ("store", "student", "tokenizer", "online_teacher"):  # `run` and `$PWD/run` are the same folder
            if data[key] is not None and "://" not in data[key] and Path(data[key]).exists():
                data[key] = str(Path(data[key]).resolve())
        return {**data, "global_batch_size": global_batch}


@dataclass(frozen=True)
class BatchShape:
    """A global batch of `global_size` windows = ranks x `accum` micro-batches x `micro` windows."""

    global_size: int
    micro: int
    accum: int

    @classmethod
    def resolve(cls, config: DistillConfig, world_size: int) -> "BatchShape":
        micro = config.batch_size
        if config.global_batch_size is None:
            accum = config.grad_accum or 1
            return cls(micro * accum * world_size, micro, accum)
        per_step = world_size * micro
        if config.global_batch_size % per_step:
            raise DDKCacheError(
                f"--global-batch-size {config.global_batch_size} is not a multiple of {world_size} ranks x --batch-size {micro} = {per_step}: "
                "change one of them"
            )
        accum = config.global_batch_size // per_step
        if config.grad_accum is not None and config.grad_accum != accum:
            raise DDKCacheError(
                f"--grad-accum {config.grad_accum} contradicts --global-batch-size {config.global_batch_size} "
                f"({world_size} ranks x --batch-size {micro} x {accum}): give one of them"
            )
        return cls(config.global_batch_size, micro, accum)


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
        ctx = init_parallel(config.device, config.dist_timeout)
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
        config = self.config
        _validate(config)
        self.shape = BatchShape.resolve(config, self.ctx.world_size)
        self.mode = resolve_parallel_mode(config.parallel, self.ctx)
        self.reader = CacheReader(config.store, storage_options=config.storage_options)
        if self.reader.capture.mode == "sampled" and config.online_teacher is None:
            try:
                check_sampled_config(config.kd)
            except ValueError as exc:
                raise DDKCacheError(f"{config.store} holds sampled targets: {exc}") from None
        _check_out(config)
        _check_objective(config, self.reader)
        self.pt_reader = None
        if config.pt_store is not None:
            if config.objective != "minillm":
                raise DDKCacheError("--pt-store is MiniLLM's pretraining term: it belongs to --objective minillm")
            self.pt_reader = CacheReader(config.pt_store, storage_options=config.storage_options)
            if self.pt_reader.header.rollout is not None:
                raise DDKCacheError(f"--pt-store {config.pt_store} is a rollout store: give a cache of fixed text (teacher-dump or pack)")
        torch.manual_seed(config.seed)  # a student built from a config starts from the same seeded weights on every rank
        self.model, self.tokenizer, _ = load_student(config.student, config.tokenizer)
        check_compatible(self.model, self.tokenizer, self.reader.header)
        if self.pt_reader is not None:
            check_compatible(self.model, self.tokenizer, self.pt_reader.header)
        self.online_teacher = _load_online_teacher(config.online_teacher, self.reader.header, self.ctx.device) if config.online_teacher else None
        config.out.mkdir(parents=True, exist_ok=True)  # only once everything was checked: a refused run writes nothing

    def _build(self) -> None:
        config, reader = self.config, self.reader
        self.domains = reader.domains
        self.model.train()
        self.model = parallelize(self.model, self.mode, self.ctx)
        self.autocast_dtype = uses_autocast(self.mode, self.ctx.device)
        self.optimizer = build_optimizer(self.model, config.lr, config.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, config.warmup_steps, config.steps, config.min_lr_ratio)
        manifest_weights = list(reader.header.manifest_weights().values())
        self.sampler: DomainSampler = create_sampler(config.sampler, self.domains, manifest_weights, alpha=config.ddk_alpha, smooth=config.ddk_smooth,
                                                     score=config.ddk_score, temperature=config.ddk_temperature)
        orders = domain_orders(reader, self.domains, config.seed)
        self.planner = GlobalBatchPlanner(orders, self.shape.global_size, config.seed)
        self.loader = WindowLoader(reader, orders, threads=config.reader_threads)
        self.state = TrainState()
        self.teacher_vocab = reader.header.teacher.vocab_size
        self.tokens_per_step = self.shape.global_size * reader.header.seq_len
        self.pretraining = None if self.pt_reader is None else PretrainingData(self.pt_reader, self.shape.global_size, config.seed + 1)
        states = {"model_and_optimizer": ModelAndOptimizer(self.model, self.optimizer), "lr_scheduler": self.scheduler,
                  "sampler": self.sampler, "data": self.planner, "train_state": self.state}
        if self.pretraining is not None:
            states["pretraining_data"] = self.pretraining
        self.checkpointer = Checkpointer(
            config.out,
            states,
            config.run_settings(self.shape.global_size),
            self.ctx,
        )
        self.metrics = MetricsLog(config.out, config.report_to, enabled=self.ctx.is_main)
        self.train_seconds, self._start_step = 0.0, 0

    # -- the loop -------------------------------------------------------------------------

    def train(self) -> DistillSummary:
        config = self.config
        self.load_checkpoint()
        bar = tqdm(total=config.steps, initial=self.state.step, desc="distill", unit="step",
                   disable=not (config.progress and self.ctx.is_main))
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
        step = self.checkpointer.latest_step() if self.config.resume else None
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
            for name, value in logged_parts(parts).items():
                sums[name] = sums.get(name, 0.0) + value / shape.accum
        record: dict[str, float] = {}
        if self.config.clip > 0:
            record["grad_norm"] = clip_grad_norm(self.model, self.config.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        reduced = all_reduce_sum(self.ctx, torch.tensor(list(sums.values()), dtype=torch.float64)) / self.ctx.world_size
        elapsed = time.perf_counter() - started
        self.train_seconds += elapsed
        return {**dict(zip(sums, (float(v) for v in reduced))), **record, "lr": self.scheduler.get_last_lr()[0],
                "tokens_per_s": self.tokens_per_step / elapsed}

    def forward_loss(self, batch: Batch) -> LossParts | MiniLLMParts:
        autocast = torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with autocast:
            logits = self.model(input_ids=batch.input_ids, use_cache=False).logits
            if self.online_teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.online_teacher(input_ids=batch.input_ids, use_cache=False).logits
        if self.online_teacher is not None:
            return dense_distillation_loss(logits, batch.targets, teacher_logits, self.config.kd)
        if self.config.objective == "minillm":
            rollout = batch.rollout
            return minillm_loss(logits, batch.targets, batch.teacher, rollout.teacher_logprobs, rollout.behaviour_logprobs,
                                rollout.response_mask, self.config.minillm, teacher_vocab=self.teacher_vocab)
        mask = batch.rollout.response_mask if batch.rollout is not None else None  # a store of reference answers: train on the answers
        return distillation_loss(logits, batch.targets, batch.teacher, self.config.kd, teacher_vocab=self.teacher_vocab, mask=mask)

    def add_pretraining(self, parts: MiniLLMParts, batch: Batch) -> MiniLLMParts:
        """MiniLLM's L_PT: the student's next-token CE on a pretraining batch, weighted by `pt_weight`."""
        autocast = torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with autocast:
            logits = self.model(input_ids=batch.input_ids, use_cache=False).logits
        lm = distillation_loss(logits, batch.targets, None, self.config.kd).ce
        return dataclasses.replace(parts, total=parts.total + self.config.pt_weight * lm, pretraining=lm)

    def validate(self) -> dict[str, Any]:
        """DDK's update: evaluate every domain, reweight the sampler (identically on every rank)."""
        evals = self.evaluate()
        self.state.first_eval = self.state.first_eval or evals
        self.sampler.update([e.student_ppl for e in evals], [e.teacher_ppl for e in evals])
        return {"eval": {e.domain: {"student_ppl": e.student_ppl, "teacher_ppl": e.teacher_ppl} for e in evals},
                "domain_weights": self.sampler.weights_by_domain()}

    def evaluate(self) -> list[DomainEval]:
        model = unwrap(self.model)  # DDP needs no wrapper to run forwards; FSDP2 is the module itself
        evals = evaluate_domains(model, self.reader, self.domains, self.config.eval_windows, self.config.eval_batch_size,
                                 self.autocast_dtype, self.ctx)
        reshard(self.model)
        return evals

    def maybe_checkpoint(self) -> None:
        done, config = self.state.step, self.config
        if done < config.steps and done % (config.checkpoint_every or config.k_steps) == 0:
            self.checkpointer.save(done)

    def save_student(self) -> None:
        """`save_pretrained` by rank 0, with the full weights gathered from every rank under FSDP."""
        weights = full_state_dict(self.model) if self.mode == "fsdp" else None
        if self.ctx.is_main:
            if not self.config.progress:  # transformers draws its own "Writing model shards" bar otherwise
                from transformers.utils import logging as hf_logging  # heavy: transformers loads only when a model or tokenizer does

                hf_logging.disable_progress_bar()
            unwrap(self.model).save_pretrained(self.config.out, state_dict=weights)
            self.tokenizer.save_pretrained(self.config.out)

    def _read_ahead(self, mine: list[WindowRef]) -> None:
        """Decode this step's chunks now and the next step's behind it (with today's weights)."""
        step = self.state.step
        ahead = rank_slice(self.planner.peek(step + 1, self.sampler), self.ctx.rank, self.ctx.world_size) if step + 1 < self.config.steps else []
        self.loader.retain(mine + ahead)
        self.loader.prefetch(mine)
        self.loader.prefetch(ahead)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _load_online_teacher(path: str, header: StoreHeader, device: torch.device) -> torch.nn.Module:
    """The live teacher for the dense reference; it must be the teacher that made the cache."""
    from transformers import AutoModelForCausalLM  # heavy: transformers loads only when a model or tokenizer does

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    require_local_if_path(path, "online teacher")
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


# Every numeric setting's range (flags as the CLI names them); see ranges.py for why.
DISTILL_RANGES = {
    "steps": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "grad_accum": AT_LEAST_ONE, "global_batch_size": AT_LEAST_ONE,
    "lr": Range(0, 1, open_low=True), "min_lr_ratio": FRACTION, "warmup": NON_NEGATIVE, "weight_decay": Range(0, 1), "clip": NON_NEGATIVE,
    "ddk_alpha": FRACTION, "ddk_temperature": Range(0, 1000, open_low=True), "update_every": AT_LEAST_ONE, "eval_windows": AT_LEAST_ONE, "eval_batch_size": AT_LEAST_ONE,
    "checkpoint_every": NON_NEGATIVE, "seed": NON_NEGATIVE, "dist_timeout": POSITIVE, "reader_threads": Range(1, 64),
    "pt_weight": NON_NEGATIVE,
}


def _validate(config: DistillConfig) -> None:
    check_ranges(dataclasses.asdict(config), DISTILL_RANGES)
    if config.sampler not in SAMPLER_NAMES:
        raise DDKCacheError(f"unknown sampler {config.sampler!r}: choose {', '.join(SAMPLER_NAMES)}")
    for target in config.report_to:
        if target not in REPORT_TARGETS:
            raise DDKCacheError(f"unknown --report-to {target!r}: choose {', '.join(REPORT_TARGETS)} (metrics.jsonl is always written)")
    MetricsLog.check_available(config.report_to)
    if config.ddk_score not in DDK_SCORES:
        raise DDKCacheError(f"unknown --ddk-score {config.ddk_score!r}: choose {' or '.join(DDK_SCORES)} (the paper's rule)")
    if config.warmup is not None and config.warmup > config.steps:
        raise DDKCacheError(f"--warmup {config.warmup} is longer than the run (--steps {config.steps}): lower it")


def logged_parts(parts: LossParts | MiniLLMParts) -> dict[str, float]:
    """The named scalars a step logs (metrics.jsonl): the loss and its parts."""
    if isinstance(parts, MiniLLMParts):
        return {"loss": float(parts.total.detach()), "policy_gradient": float(parts.policy_gradient.detach()),
                "single_step": float(parts.single_step.detach()), "reward": float(parts.reward), "reverse_kl": float(parts.reverse_kl),
                "clipped_fraction": float(parts.clipped_fraction),
                **({"pretraining_lm": float(parts.pretraining.detach())} if parts.pretraining is not None else {})}
    return {"loss": float(parts.total.detach()), "ce": float(parts.ce.detach()), "kd": float(parts.kd.detach()) if parts.kd is not None else 0.0}


OBJECTIVES = ("kd", "minillm")


def _check_objective(config: DistillConfig, reader: CacheReader) -> None:
    """A rollout store only trains MiniLLM's update, and MiniLLM only trains on one, from the policy that sampled it."""
    rollout = reader.header.rollout
    if config.objective not in OBJECTIVES:
        raise DDKCacheError(f"unknown --objective {config.objective!r}: choose {' or '.join(OBJECTIVES)}")
    if config.objective == "kd" and rollout is not None and rollout.sampled:
        raise DDKCacheError(f"{config.store} is a rollout store (MiniLLM round {rollout.round}): train on it with --objective minillm")
    if config.objective == "kd" and rollout is not None and config.online_teacher is not None:
        raise DDKCacheError("--online-teacher is the dense KD reference on fixed text; a store of reference answers trains with the cache")
    if config.objective == "minillm":
        if rollout is not None and not rollout.sampled:
            raise DDKCacheError(f"{config.store} holds the reference answers, not the student's samples: MiniLLM's policy gradient needs "
                                "`ddk-cache rollout` without --responses references (train on this one with --objective kd)")
        if rollout is None:
            raise DDKCacheError(f"--objective minillm trains on the student's own scored samples; {config.store} is a cache of fixed text: "
                                "make one with `ddk-cache rollout`, then score it with teacher-dump")
        if config.online_teacher is not None:
            raise DDKCacheError("--online-teacher is the dense KD reference; it does not apply to --objective minillm")
        if reader.capture.mode == "sampled":
            raise DDKCacheError(f"{config.store} holds sampled teacher targets: MiniLLM's single-step reverse KL needs the teacher's "
                                "probabilities; score the rollouts with --mode topk or topp")
        student = weights_sha256(config.student) if Path(config.student).is_dir() else None
        if rollout.student_weights_sha256 and student and student != rollout.student_weights_sha256 and not config.resume:
            raise DDKCacheError(f"{config.student} is not the student that sampled {config.store} (round {rollout.round}, "
                                f"{rollout.student}): update the weights that sampled, or roll out again with this student")


def _check_out(config: DistillConfig) -> None:
    """`--out` is a new run, or (with --resume) a killed one; never a finished run or a regular file."""
    if config.out.exists() and not config.out.is_dir():
        raise DDKCacheError(f"--out {config.out} is a file: choose a folder")
    checkpoint = config.out.is_dir() and has_checkpoint(config.out)
    entries = {entry.name for entry in config.out.iterdir()} if config.out.is_dir() else set()
    if entries and not entries & {METRICS_NAME, CHECKPOINT_DIR}:
        raise DDKCacheError(f"--out {config.out} holds other files, not a distill run: choose a new or empty folder")
    if config.resume == "auto":  # for job scripts that run the same command after every preemption
        config.resume = checkpoint
    if config.resume and not checkpoint:
        raise DDKCacheError(f"{config.out} holds no checkpoint to resume: run without --resume")
    if not config.resume and checkpoint:
        raise DDKCacheError(f"{config.out} already holds a distill run: pass --resume to continue it, or choose another --out")
    if not checkpoint and (config.out / METRICS_NAME).exists() and (config.out / "config.json").exists():
        raise DDKCacheError(f"{config.out} already holds a finished distill run: choose another --out")
