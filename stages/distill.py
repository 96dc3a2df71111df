"""Stage two: train a student from a cache alone, with the DDK domain sampler and KD losses.

One step: the sampler draws a domain for each window of the batch, the batcher hands over
the decoded windows (decoding runs ahead in reader threads), the student's logits give CE on
the true next token plus the KD divergence on the cached top-k. Every `update_every` (K)
steps the student is evaluated on each domain's `valid/` windows; DDK reweights domains from
the student/teacher perplexity ratio.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ddk_cache.cache_reader import CacheReader
from ddk_cache.checkpoint import load_checkpoint, remove_checkpoint, restore_rng_state, rng_state, save_checkpoint
from ddk_cache.engines.hf import resolve_device
from ddk_cache.errors import DDKCacheError, first_line
from ddk_cache.evaluation import DomainEval, evaluate_domains
from ddk_cache.losses import KDConfig, check_sampled_config, dense_distillation_loss, distillation_loss
from ddk_cache.optim import build_optimizer, build_scheduler
from ddk_cache.samplers import create_sampler
from ddk_cache.streaming import CacheBatcher
from ddk_cache.student import check_compatible, load_student

METRICS_NAME = "metrics.jsonl"
# Fields that may differ between a run and its resumption; everything else must match.
RESUMABLE_CHANGES = ("resume", "show_progress", "storage_options")


@dataclass
class DistillConfig:
    store: str
    student: str
    out: Path
    tokenizer: str | None = None
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # DDK: 3e-5 -> 3e-6
    warmup: int | None = None  # default: min(1000, steps // 10)
    weight_decay: float = 0.1
    clip: float = 1.0
    kd: KDConfig = field(default_factory=KDConfig)
    sampler: str = "ddk"
    ddk_alpha: float = 0.5
    ddk_smooth: bool = True
    update_every: int | None = None  # K; default: min(1000, max(1, steps // 10))
    eval_windows: int = 32
    eval_batch_size: int = 8
    checkpoint_every: int = 0  # 0: every K steps
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    online_teacher: str | None = None  # reference mode: dense KD from the live teacher, not the cache
    storage_options: dict[str, Any] | None = None
    show_progress: bool = True

    @property
    def k_steps(self) -> int:
        return self.update_every or min(1000, max(1, self.steps // 10))

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(1000, self.steps // 10)

    def comparable(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in RESUMABLE_CHANGES:
            data.pop(key)
        data["out"] = str(data["out"])
        return data


@dataclass
class DistillSummary:
    out: Path
    steps: int
    first_eval: list[DomainEval]
    final_eval: list[DomainEval]
    tokens_per_second: float
    final_weights: dict[str, float]


def run_distill(config: DistillConfig) -> DistillSummary:
    _validate(config)
    reader = CacheReader(config.store, storage_options=config.storage_options)
    if reader.capture.mode == "sampled" and config.online_teacher is None:
        try:
            check_sampled_config(config.kd)
        except ValueError as exc:
            raise DDKCacheError(f"{config.store} holds sampled targets: {exc}") from None
    domains = reader.domains
    device = resolve_device(config.device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    config.out.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(config.out)
    if config.resume and checkpoint is None:
        raise DDKCacheError(f"{config.out} holds no checkpoint to resume: run without --resume")
    if not config.resume and checkpoint is not None:
        raise DDKCacheError(f"{config.out} already holds a distill run: pass --resume to continue it, or choose another --out")
    if checkpoint is None and (config.out / METRICS_NAME).exists() and (config.out / "config.json").exists():
        raise DDKCacheError(f"{config.out} already holds a finished distill run: choose another --out")
    if checkpoint is not None:
        _check_same_run(checkpoint["config"], config.comparable(), config.out)

    torch.manual_seed(config.seed)  # a student built from a config starts from seeded weights
    model, tokenizer, _ = load_student(config.student, config.tokenizer)
    check_compatible(model, tokenizer, reader.header)
    model.to(device).train()
    online_teacher = _load_online_teacher(config.online_teacher, reader.header, device) if config.online_teacher else None
    optimizer = build_optimizer(model, config.lr, config.weight_decay)
    scheduler = build_scheduler(optimizer, config.warmup_steps, config.steps, config.min_lr_ratio)
    weights = [(reader.header["manifest"]["domains"][i].get("weight", 1.0)) for i in range(len(domains))]
    sampler = create_sampler(config.sampler, domains, weights, alpha=config.ddk_alpha, smooth=config.ddk_smooth)
    generator = np.random.default_rng(config.seed)
    batcher = CacheBatcher(reader, domains, config.seed)
    teacher_vocab = int(reader.header["teacher"]["vocab_size"])
    metrics_path = config.out / METRICS_NAME

    start_step, first_eval = 0, None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        sampler.load_state_dict(checkpoint["sampler"])
        batcher.restore(checkpoint["batcher"])
        restore_rng_state(checkpoint["rng"], generator)
        start_step = checkpoint["step"]
        first_eval = [DomainEval(**e) for e in checkpoint["first_eval"]]
        _truncate_metrics(metrics_path, start_step)
    else:
        metrics_path.write_text("")

    def evaluate() -> list[DomainEval]:
        return evaluate_domains(model, reader, domains, config.eval_windows, config.eval_batch_size, autocast_dtype)

    micro_batch = config.batch_size
    tokens_per_step = micro_batch * config.grad_accum * int(reader.header["capture"]["seq_len"])
    train_seconds, trained_tokens = 0.0, 0
    bar = tqdm(total=config.steps, initial=start_step, desc="distill", unit="step", disable=not config.show_progress)
    try:
        with metrics_path.open("a") as metrics:
            for step in range(start_step, config.steps):
                record: dict[str, Any] = {"step": step}
                if step % config.k_steps == 0:
                    evals = evaluate()
                    first_eval = first_eval or evals
                    sampler.update([e.student_ppl for e in evals], [e.teacher_ppl for e in evals])
                    record["eval"] = {e.domain: {"student_ppl": e.student_ppl, "teacher_ppl": e.teacher_ppl} for e in evals}
                    record["domain_weights"] = sampler.weights_by_domain()
                started = time.perf_counter()
                parts = _train_step(
                    model, optimizer, batcher, sampler, generator, config, micro_batch, teacher_vocab, device, autocast_dtype, online_teacher
                )
                scheduler.step()
                elapsed = time.perf_counter() - started
                train_seconds += elapsed
                trained_tokens += tokens_per_step
                record.update(parts, lr=scheduler.get_last_lr()[0], tokens_per_s=tokens_per_step / elapsed)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.3f}")
                done = step + 1
                if done < config.steps and done % (config.checkpoint_every or config.k_steps) == 0:
                    save_checkpoint(config.out, {
                        "step": done,
                        "config": config.comparable(),
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "sampler": sampler.state_dict(),
                        "batcher": batcher.state(),
                        "rng": rng_state(generator),
                        "first_eval": [dataclasses.asdict(e) for e in first_eval],
                    })
            final_eval = evaluate()
            metrics.write(json.dumps({"step": config.steps, "final_eval": [e.to_dict() for e in final_eval]}) + "\n")
    finally:
        bar.close()
        batcher.close()
    model.save_pretrained(config.out)
    tokenizer.save_pretrained(config.out)
    remove_checkpoint(config.out)  # the run is finished: the saved student is its result
    return DistillSummary(
        out=config.out,
        steps=config.steps,
        first_eval=first_eval or final_eval,
        final_eval=final_eval,
        tokens_per_second=trained_tokens / train_seconds if train_seconds else 0.0,
        final_weights=sampler.weights_by_domain(),
    )


def _train_step(
    model, optimizer, batcher, sampler, generator, config, micro_batch, teacher_vocab, device, autocast_dtype, online_teacher=None
) -> dict[str, float]:
    """One optimizer step over `grad_accum` micro-batches; returns the logged loss parts."""
    totals = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    for _ in range(config.grad_accum):
        batch = batcher.next_batch(sampler.draw(generator, micro_batch)).to(device)
        autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
        with autocast:
            logits = model(input_ids=batch.input_ids, use_cache=False).logits
            if online_teacher is not None:
                with torch.no_grad():
                    teacher_logits = online_teacher(input_ids=batch.input_ids, use_cache=False).logits
        if online_teacher is not None:
            parts = dense_distillation_loss(logits, batch.targets, teacher_logits, config.kd)
        else:
            parts = distillation_loss(logits, batch.targets, batch.teacher, config.kd, teacher_vocab=teacher_vocab)
        (parts.total / config.grad_accum).backward()
        totals["loss"] += float(parts.total.detach()) / config.grad_accum
        totals["ce"] += float(parts.ce.detach()) / config.grad_accum
        totals["kd"] += float(parts.kd.detach()) / config.grad_accum if parts.kd is not None else 0.0
    if config.clip > 0:
        totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def _load_online_teacher(path: str, header: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The live teacher for the dense reference; it must be the teacher that made the cache."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise DDKCacheError(f"cannot load the online teacher {path!r}: {first_line(exc)}") from None
    cached_vocab = int(header["teacher"]["vocab_size"])
    if int(teacher.config.vocab_size) != cached_vocab:
        raise DDKCacheError(
            f"the online teacher has vocabulary {teacher.config.vocab_size}, the cache's teacher {cached_vocab}: pass the teacher that made the cache"
        )
    return teacher.to(device).eval().requires_grad_(False)


def _validate(config: DistillConfig) -> None:
    for name in ("steps", "batch_size", "grad_accum", "eval_windows", "eval_batch_size"):
        if getattr(config, name) <= 0:
            raise DDKCacheError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if config.lr <= 0:
        raise DDKCacheError(f"--lr must be positive, got {config.lr}")


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], out: Path) -> None:
    differing = [key for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
    if differing:
        key = differing[0]
        raise DDKCacheError(
            f"{out} was trained with a different {', '.join(differing)} (checkpoint: {saved.get(key)}, now: {current.get(key)}): "
            "resume with the original settings, or choose another --out"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines a killed run wrote after its last checkpoint; the resumed run rewrites them."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < step]
    path.write_text("".join(line + "\n" for line in kept))
