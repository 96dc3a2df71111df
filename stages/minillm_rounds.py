"""`ddk-cache minillm --rounds R`: MiniLLM as offline rounds, rollout -> score -> update, repeated.

The paper's recipe, as far as the measurements of benchmarks/RESULTS.md ("MiniLLM rounds") support it: an SFT
start (`--sft-steps`: CE on the reference answers of the prompts the rounds will see, in `OUT/sft/`), training
responses sampled from 0.8 q + 0.2 p (`--teacher-mix`, the rollout job holding both models) and L_PT when a
`--pt-store` is given. After each evaluated student the driver says in one line when the entropy failure shows
(entropy and the teacher's CE on the samples both up), and at round 0 when the student is far from the task.

Each round r lives in `OUT/round-r/`: `rollouts.zarr` (the round's student answering this round's training
prompts and the held-out test prompts, then scored by the teacher in place) and `student/` (the distill run
that updates the round's student on it; its saved weights are the next round's student). After the last
update, `OUT/round-R/rollouts.zarr` holds the final student's scored samples, so every policy, the first and
the last included, gets the same measure (and a later `--rounds R + n` goes on from there). `OUT/rounds.jsonl` has a line per evaluated student: its reverse
KL estimate on the held-out prompts (from its scored samples), the teacher's CE on those samples, the student's
own NLL of them (its entropy) and the ROUGE-L of its greedy answers; `ddk-cache plot OUT` draws them per round.

Resumable: a step whose output is complete is skipped (a rollout store already packed or scored, a scoring
that `teacher-dump` resumes shard by shard, an update `distill --resume auto` continues from its checkpoint),
so the same command after a kill goes on where it stopped. This command runs the three jobs on one machine;
on a cluster run them as separate jobs (README, "MiniLLM rounds") -- the loop is the same.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ddk_cache.devices import resolve_device
from ddk_cache.engines import EngineOptions, create_engine
from ddk_cache.errors import DDKCacheError, StoreError
from ddk_cache.minillm.objective import MiniLLMConfig
from ddk_cache.minillm.prompts import apply_chat_template, load_prompt_manifest, load_prompts
from ddk_cache.minillm.response_quality import evaluate_responses, reverse_kl_estimate, sample_entropy
from ddk_cache.ranges import AT_LEAST_ONE, NON_NEGATIVE, Range, check_ranges
from ddk_cache.stages.distill import DistillConfig, ObjectiveSettings, run_distill
from ddk_cache.stages.plot_rounds import ROUNDS_LOG
from ddk_cache.stages.rollout import RolloutConfig, run_rollout
from ddk_cache.stages.teacher_dump import TeacherDumpConfig, run_teacher_dump
from ddk_cache.store.capture import Capture
from ddk_cache.store.fingerprints import weights_sha256
from ddk_cache.store.reader import CacheReader
from ddk_cache.training.checkpoint import CheckpointSettings, has_checkpoint
from ddk_cache.training.data_order import BatchSettings
from ddk_cache.training.domain_samplers import SamplerSettings
from ddk_cache.training.losses import KDConfig
from ddk_cache.training.metrics_log import ReportingSettings
from ddk_cache.training.optimizer import OptimizerSettings
from ddk_cache.training.parallelize import ParallelSettings
from ddk_cache.training.student import load_student


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
    teacher_mix: float = 0.2  # the teacher's share of the training rollouts' sampling mixture (MiniLLM: 0.2); 0: the student alone
    sft_steps: int | None = None  # SFT on the references before round 0 (MiniLLM starts from an SFT'd student); None: `default_sft_steps`
    sft_lr: float = 1e-4
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
    entropy: float | None = None  # the student's own NLL of its sampled test responses (None: logs older than this field)

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items()}


ROUNDS_RANGES = {"rounds": AT_LEAST_ONE, "epochs": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "lr": Range(0, 1, open_low=True), "k": AT_LEAST_ONE,
                 "seed": NON_NEGATIVE, "pt_weight": NON_NEGATIVE, "teacher_mix": Range(0, 1), "sft_steps": NON_NEGATIVE,
                 "sft_lr": Range(0, 1, open_low=True)}
SFT_FOLDER = "sft"
UNTUNED_GAP = 1.0  # nats/token: a round-0 student whose samples the teacher finds this much less likely than the references


def default_sft_steps(rounds: int, train_prompts: int, batch_size: int, has_references: bool) -> int:
    """One pass over the reference answers of every prompt the rounds will see (0 without references).

    Why on by default: rounds from a student not fine-tuned on the task lower the reverse KL by spreading the
    student's mass where the teacher is unsure, and the answers get worse (RESULTS.md, "MiniLLM rounds"); the paper
    starts from an SFT'd student. One pass over those prompts is what the benchmark's recipe arm spends on it.
    """
    return math.ceil(rounds * train_prompts / batch_size) if has_references else 0


def run_minillm_rounds(config: MiniLLMRoundsConfig, log: Callable[[str], None] = print) -> list[RoundRecord]:
    manifest = load_prompt_manifest(config.prompts)
    explicit_sft = config.sft_steps is not None
    if not explicit_sft:
        config = replace(config, sft_steps=default_sft_steps(config.rounds, manifest.train_prompts, max(config.batch_size, 1),
                                                             manifest.reference_field is not None))
    check_ranges({name: getattr(config, name) for name in ROUNDS_RANGES}, ROUNDS_RANGES)
    if config.rouge and manifest.reference_field is None:
        raise DDKCacheError("ROUGE-L needs reference answers: set 'reference_field' in the prompt manifest, or pass --no-rouge")
    if config.sft_steps and manifest.reference_field is None:
        raise DDKCacheError("--sft-steps trains on reference answers: set 'reference_field' in the prompt manifest, or pass --sft-steps 0")
    config.out.mkdir(parents=True, exist_ok=True)
    done = _read_log(config.out)
    engine = None  # the teacher, loaded once when the first scoring needs it

    def score(store: Path) -> None:
        nonlocal engine
        options = EngineOptions(device=config.device, batch_size=config.batch_size)
        engine = engine or create_engine("hf", config.teacher, options, max_k=config.k)
        run_teacher_dump(TeacherDumpConfig(teacher=config.teacher, manifest=None, out=str(store), capture=Capture(k=config.k),
                                           engine="hf", engine_options=options, progress=config.progress), engine=engine)

    student, reference_ce = config.student, None
    if manifest.reference_field is not None:
        default = "" if explicit_sft else (f" (the default: one pass over the references of the {config.rounds} x {manifest.train_prompts} "
                                           "prompts the rounds see; --sft-steps 0 starts from --student as it is)")
        student, reference_ce = _sft_start(config, manifest, score, log, default)
    records = []
    for r in range(config.rounds + 1):
        final = r == config.rounds
        folder = config.out / f"round-{r}"
        times: dict[str, float] = {}
        store = folder / "rollouts.zarr"
        with _timed(times, "rollout"):
            if _status(store) not in ("packed", "writing", "complete") or not _sampled_by(store, student, config.teacher_mix):
                log(f"round {r}: {Path(student).name} answers {manifest.train_prompts} training and {manifest.test_prompts} test prompts")
                mixed = {"teacher": config.teacher, "teacher_mix": config.teacher_mix} if config.teacher_mix > 0 else {}
                run_rollout(RolloutConfig(student=student, prompts=config.prompts, out=str(store), round=r, seed=config.seed,
                                          batch_size=config.batch_size, device=config.device, overwrite=True, progress=config.progress,
                                          **mixed))
        with _timed(times, "score"):
            if _status(store) != "complete":
                log(f"round {r}: the teacher scores the rollouts")
                score(store)
        if r not in done:
            done[r] = _evaluate(config, manifest, r, student, store, times)
            with (config.out / ROUNDS_LOG).open("a") as handle:
                handle.write(json.dumps(done[r].to_dict()) + "\n")
            log(f"round {r}: reverse KL {done[r].reverse_kl:.4f}, entropy {done[r].entropy:.3f}, teacher CE {done[r].teacher_response_loss:.3f}"
                + (f", ROUGE-L {done[r].rouge_l:.2f}" if done[r].rouge_l is not None else ""))
            warning = entropy_failure(done.get(r - 1), done[r]) or (untuned_start(done[r], reference_ce) if r == 0 and not config.sft_steps else None)
            if warning:
                log(warning)
        records.append(done[r])
        if final:
            break
        update = folder / "student"
        if not _finished(update):
            windows = CacheReader(str(store)).domain_info(manifest.name).train.windows
            steps = config.epochs * math.ceil(windows / config.batch_size)
            log(f"round {r}: MiniLLM update, {config.epochs} epochs = {steps} steps")
            started = time.perf_counter()
            _train(config, store, student, update, steps, config.seed + r, config.lr,
                   ObjectiveSettings(name="minillm", minillm=config.minillm, pt_store=config.pt_store, pt_weight=config.pt_weight))
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
                       dict(times), sample_entropy(reader))


def _sft_start(config: MiniLLMRoundsConfig, manifest, score: Callable[[Path], None], log: Callable[[str], None],
               default: str = "") -> tuple[str, float]:
    """MiniLLM's first stage: `--sft-steps` of CE on the reference answers of the prompts the rounds will see (`OUT/sft/`).

    Returns the student round 0 starts from, and the teacher's CE on the test prompts' references (the yardstick of
    `untuned_start`). The references are written and scored even with `--sft-steps 0`, for that yardstick alone.
    """
    folder = config.out / SFT_FOLDER
    store = folder / "references.zarr"
    if _status(store) != "complete":
        count = max(config.sft_steps * config.batch_size, config.batch_size)
        log(f"references: {count} training and {manifest.test_prompts} test answers, scored by the teacher")
        run_rollout(RolloutConfig(student=config.student, prompts=config.prompts, out=str(store), responses="references", train_prompts=count,
                                  batch_size=config.batch_size, device=config.device, overwrite=True, progress=config.progress))
        score(store)
    reference_ce = CacheReader(str(store)).domain_info(manifest.name).teacher_valid_loss
    if not config.sft_steps:
        return config.student, reference_ce
    update = folder / "student"
    if not _finished(update):
        log(f"SFT start: {config.sft_steps} steps of CE on the reference answers{default}")
        _train(config, store, config.student, update, config.sft_steps, config.seed, config.sft_lr, ObjectiveSettings(kd=KDConfig(gamma=0.0)))
    return str(update), reference_ce


def _train(config: MiniLLMRoundsConfig, store: Path, student: str, out: Path, steps: int, seed: int, lr: float,
           objective: ObjectiveSettings) -> None:
    """One of the driver's distill runs (the SFT start, a round's update): a fresh AdamW at a constant LR (MiniLLM's), no
    weight decay, uniform over the store's one domain, resumed from its checkpoint after a kill."""
    run_distill(DistillConfig(
        store=str(store), student=student, out=out, steps=steps, seed=seed, batch=BatchSettings(batch_size=config.batch_size),
        optimizer=OptimizerSettings(lr=lr, warmup=0, min_lr_ratio=1.0, weight_decay=0.0), objective=objective,
        sampler=SamplerSettings(name="uniform", update_every=steps), parallel=ParallelSettings(device=config.device),
        checkpoint=CheckpointSettings(resume="auto"), reporting=ReportingSettings(progress=config.progress)))


def entropy_failure(before: RoundRecord | None, after: RoundRecord) -> str | None:
    """One line when an update raised both the student's entropy and the teacher's CE on its samples.

    The reverse KL is CE_p(samples) - H(q): it can fall because the student spreads its mass (entropy up) over answers
    the teacher finds unlikely too (CE up), which lowers the objective and worsens the answers (benchmarks/RESULTS.md,
    "MiniLLM rounds"). Both rising at once is that failure's signature; either alone is ordinary training.
    """
    if before is None or before.entropy is None or after.entropy is None:
        return None
    if after.entropy > before.entropy and after.teacher_response_loss > before.teacher_response_loss:
        return (f"round {after.round}: warning: the student's entropy rose ({before.entropy:.3f} -> {after.entropy:.3f}) and so did the "
                f"teacher's CE on its samples ({before.teacher_response_loss:.3f} -> {after.teacher_response_loss:.3f}): the reverse KL is "
                "falling by spreading the student's mass where the teacher is unsure, which worsens its answers; start from an SFT'd "
                "student (--sft-steps), keep --teacher-mix, add --pt-store, or lower --lr")
    return None


def untuned_start(start: RoundRecord, reference_ce: float | None) -> str | None:
    """One line when round 0's student is far from the task: the teacher finds its samples `UNTUNED_GAP` nats per token less
    likely than the reference answers. MiniLLM starts from an SFT'd student; from a merely pretrained or pruned one the
    rounds measured here raised the entropy instead of the answers' quality."""
    if reference_ce is None or start.teacher_response_loss - reference_ce <= UNTUNED_GAP:
        return None
    return (f"round 0: warning: the teacher's CE on the student's samples is {start.teacher_response_loss:.2f} nats/token against "
            f"{reference_ce:.2f} on the reference answers: this student has not been fine-tuned on the task; MiniLLM starts from "
            "one that has (--sft-steps N)")


def _status(store: Path) -> str | None:
    try:
        return CacheReader(str(store), allow_incomplete=True).header.status
    except StoreError:
        return None


def _sampled_by(store: Path, student: str, teacher_mix: float) -> bool:
    """Whether the rollouts at `store` came from these weights and this mixture (else an earlier run's settings made them)."""
    rollout = CacheReader(str(store), allow_incomplete=True).header.rollout
    return rollout is not None and rollout.student_weights_sha256 == weights_sha256(student) and rollout.teacher_mix == teacher_mix


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
