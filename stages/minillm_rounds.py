"""`ddk-cache minillm --rounds R`: MiniLLM as offline rounds, rollout -> score -> update, repeated.

Each round r lives in `OUT/round-r/`: `rollouts.zarr` (the round's student answering this round's training
prompts and the held-out test prompts, then scored by the teacher in place) and `student/` (the distill run
that updates the round's student on it; its saved weights are the next round's student). After the last
update, `OUT/round-R/rollouts.zarr` holds the final student's scored samples, so every policy, the first and
the last included, gets the same measure (and a later `--rounds R + n` goes on from there). `OUT/rounds.jsonl` has a line per evaluated student: its reverse
KL estimate on the held-out prompts (from its scored samples) and the ROUGE-L of its greedy answers.

Resumable: a step whose output is complete is skipped (a rollout store already packed or scored, a scoring
that `teacher-dump` resumes shard by shard, an update `distill --resume auto` continues from its checkpoint),
so the same command after a kill goes on where it stopped. This command runs the three jobs on one machine;
on a cluster run them as separate jobs (README, "MiniLLM rounds") -- the loop is the same.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ddk_cache.devices import resolve_device
from ddk_cache.engines import EngineOptions, create_engine
from ddk_cache.errors import DDKCacheError, StoreError
from ddk_cache.minillm.objective import MiniLLMConfig
from ddk_cache.minillm.prompts import apply_chat_template, load_prompt_manifest, load_prompts
from ddk_cache.minillm.response_quality import evaluate_responses, reverse_kl_estimate
from ddk_cache.ranges import AT_LEAST_ONE, NON_NEGATIVE, Range, check_ranges
from ddk_cache.stages.distill import DistillConfig, ObjectiveSettings, run_distill
from ddk_cache.stages.rollout import RolloutConfig, run_rollout
from ddk_cache.stages.teacher_dump import TeacherDumpConfig, run_teacher_dump
from ddk_cache.store.capture import Capture
from ddk_cache.store.fingerprints import weights_sha256
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.checkpoint import CheckpointSettings, has_checkpoint
from ddk_cache.training.data_order import BatchSettings
from ddk_cache.training.domain_samplers import SamplerSettings
from ddk_cache.training.metrics_log import ReportingSettings
from ddk_cache.training.optimizer import OptimizerSettings
from ddk_cache.training.parallelize import ParallelSettings
from ddk_cache.training.student import load_student

ROUNDS_LOG = "rounds.jsonl"


@dataclass
class MiniLLMRoundsConfig:
    student: str
    teacher: str
    prompts: Path
    out: Path
    rounds: int = 2
    epochs: int = 2  # optimizer passes over each round's rollouts (MiniLLM: several PPO epochs per batch of samples)
    batch_size: int = 8  # windows per optimizer step
    lr: float = 1e-5
    k: int = 64  # teacher entries per response position
    minillm: MiniLLMConfig = field(default_factory=MiniLLMConfig)
    pt_store: str | None = None  # MiniLLM's L_PT on this cache of fixed text (distill --pt-store)
    pt_weight: float = 1.0
    seed: int = 0
    device: str = "auto"
    rouge: bool = True  # ROUGE-L of each student's greedy answers (needs references)
    progress: bool = True


@dataclass
class RoundRecord:
    round: int  # the student's round: 0 = the starting student, R = after R updates
    student: str
    reverse_kl: float
    teacher_response_loss: float  # the teacher's CE on the student's sampled responses
    rouge_l: float | None
    response_tokens: float
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items()}


ROUNDS_RANGES = {"rounds": AT_LEAST_ONE, "epochs": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "lr": Range(0, 1, open_low=True), "k": AT_LEAST_ONE,
                 "seed": NON_NEGATIVE, "pt_weight": NON_NEGATIVE}


def run_minillm_rounds(config: MiniLLMRoundsConfig, log: Callable[[str], None] = print) -> list[RoundRecord]:
    check_ranges({name: getattr(config, name) for name in ROUNDS_RANGES}, ROUNDS_RANGES)
    manifest = load_prompt_manifest(config.prompts)
    if config.rouge and manifest.reference_field is None:
        raise DDKCacheError("ROUGE-L needs reference answers: set 'reference_field' in the prompt manifest, or pass --no-rouge")
    config.out.mkdir(parents=True, exist_ok=True)
    done = _read_log(config.out)
    student = config.student
    records = []
    engine = None  # the teacher, loaded once when the first scoring needs it
    for r in range(config.rounds + 1):
        final = r == config.rounds
        folder = config.out / f"round-{r}"
        times: dict[str, float] = {}
        store = folder / "rollouts.zarr"
        with _timed(times, "rollout"):
            if _status(store) not in ("packed", "writing", "complete") or not _sampled_by(store, student):
                log(f"round {r}: {Path(student).name} answers {manifest.train_prompts} training and {manifest.test_prompts} test prompts")
                run_rollout(RolloutConfig(student=student, prompts=config.prompts, out=str(store), round=r, seed=config.seed,
                                          batch_size=config.batch_size, device=config.device, overwrite=True, progress=config.progress))
        with _timed(times, "score"):
            if _status(store) != "complete":
                log(f"round {r}: the teacher scores the rollouts")
                options = EngineOptions(device=config.device, batch_size=config.batch_size)
                engine = engine or create_engine("hf", config.teacher, options, max_k=config.k)
                run_teacher_dump(TeacherDumpConfig(teacher=config.teacher, manifest=None, out=str(store), capture=Capture(k=config.k),
                                                   engine="hf", engine_options=options, progress=config.progress), engine=engine)
        if r not in done:
            done[r] = _evaluate(config, manifest, r, student, store, times)
            with (config.out / ROUNDS_LOG).open("a") as handle:
                handle.write(json.dumps(done[r].to_dict()) + "\n")
            log(f"round {r}: reverse KL {done[r].reverse_kl:.4f}" + (f", ROUGE-L {done[r].rouge_l:.2f}" if done[r].rouge_l is not None else ""))
        records.append(done[r])
        if final:
            break
        update = folder / "student"
        if not _finished(update):
            windows = CacheReader(str(store)).domain_info(manifest.name).train.windows
            steps = config.epochs * math.ceil(windows / config.batch_size)
            log(f"round {r}: MiniLLM update, {config.epochs} epochs = {steps} steps")
            started = time.perf_counter()
            run_distill(DistillConfig(
                store=str(store), student=student, out=update, steps=steps, seed=config.seed + r,
                batch=BatchSettings(batch_size=config.batch_size),
                optimizer=OptimizerSettings(lr=config.lr, warmup=0, min_lr_ratio=1.0, weight_decay=0.0),  # MiniLLM's constant LR
                objective=ObjectiveSettings(name="minillm", minillm=config.minillm, pt_store=config.pt_store, pt_weight=config.pt_weight),
                sampler=SamplerSettings(name="uniform", update_every=steps), parallel=ParallelSettings(device=config.device),
                checkpoint=CheckpointSettings(resume="auto"), reporting=ReportingSettings(progress=config.progress)))
            times["update"] = time.perf_counter() - started
            _append_times(config.out, r, times)
        student = str(update)
    return records


def _evaluate(config: MiniLLMRoundsConfig, manifest, r: int, student: str, store: Path, times: dict[str, float]) -> RoundRecord:
    reader = CacheReader(str(store))
    rouge, tokens = None, float("nan")
    if config.rouge:

        with _timed(times, "rouge"):
            model, tokenizer = load_student(student, None)
            model.to(resolve_device(config.device))
            prompts = apply_chat_template(manifest, load_prompts(manifest, "test"), tokenizer, f"the student {student}")  # as eval-responses
            result = evaluate_responses(model, tokenizer, prompts, manifest.max_prompt_tokens, manifest.max_new_tokens, config.batch_size)
            rouge, tokens = result.rouge_l, result.mean_response_tokens
    return RoundRecord(r, student, reverse_kl_estimate(reader), reader.domain_info(manifest.name).teacher_valid_loss, rouge, tokens,
                       dict(times))


def _status(store: Path) -> str | None:
    try:
        return CacheReader(str(store), allow_incomplete=True).header.status
    except StoreError:
        return None


def _sampled_by(store: Path, student: str) -> bool:
    """Whether the rollouts at `store` came from these weights (else they belong to an earlier, replaced student)."""
    rollout = CacheReader(str(store), allow_incomplete=True).header.rollout
    return rollout is not None and rollout.student_weights_sha256 == weights_sha256(student)


def _finished(run: Path) -> bool:
    """A distill run that saved its student and left no checkpoint behind."""
    return run.is_dir() and any(run.glob("*.safetensors")) and not has_checkpoint(run)


def _read_log(out: Path) -> dict[int, RoundRecord]:
    path = out / ROUNDS_LOG
    records = {}
    if path.exists():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if "reverse_kl" in entry:
                records[entry["round"]] = RoundRecord(**entry)
    return records


def _append_times(out: Path, r: int, times: dict[str, float]) -> None:
    with (out / ROUNDS_LOG).open("a") as handle:
        handle.write(json.dumps({"round": r, "update_seconds": times}) + "\n")


class _timed:
    """Adds the seconds a block took to `times[name]`."""

    def __init__(self, times: dict[str, float], name: str) -> None:
        self.times, self.name = times, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.times[self.name] = self.times.get(self.name, 0.0) + time.perf_counter() - self.start
