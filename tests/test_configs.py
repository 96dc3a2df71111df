"""Typed settings per component: checked once where built, for library callers as for the CLI, and never changed.

And the objective a step minimises is one object chosen in one place; the run's identity that checkpoints store
keeps the keys earlier versions wrote, so a run checkpointed before the restructuring still resumes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ddk_cache.errors import SettingError
from ddk_cache.minillm.objective import MiniLLMObjective
from ddk_cache.stages.distill import (
    DISTILL_RANGES,
    BatchSettings,
    CheckpointSettings,
    DistillConfig,
    ObjectiveSettings,
    OptimizerSettings,
    ParallelSettings,
    ReportingSettings,
    SamplerSettings,
    build_objective,
)
from ddk_cache.stages.teacher_dump import LayoutSettings, NodeSettings, ProcessSettings, TeacherDumpConfig
from ddk_cache.store.capture import Capture
from ddk_cache.training.lora import LoRASettings
from ddk_cache.training.objectives import KDObjective, OnlineKDObjective


@pytest.mark.parametrize(("build", "message"), [
    (lambda: SamplerSettings(name="random"), "unknown sampler 'random': choose ddk, static, uniform"),
    (lambda: SamplerSettings(score="kl"), "unknown --ddk-score 'kl': choose ppl-ratio, ce-ratio"),
    (lambda: SamplerSettings(alpha=1.5), "--ddk-alpha"),
    (lambda: BatchSettings(batch_size=0), "--batch-size"),
    (lambda: OptimizerSettings(lr=0), "--lr"),
    (lambda: ParallelSettings(mode="zero3"), "unknown --parallel 'zero3'"),
    (lambda: ParallelSettings(dist_timeout=0), "--dist-timeout"),
    (lambda: CheckpointSettings(every=-1), "--checkpoint-every"),
    (lambda: CheckpointSettings(resume="maybe"), "resume must be True, False or 'auto'"),
    (lambda: ReportingSettings(report_to=("mlflow",)), "unknown --report-to 'mlflow': choose tensorboard, wandb"),
    (lambda: LoRASettings(rank=0, merge=True), "--lora-targets and --lora-merge need --lora-rank"),
    (lambda: LoRASettings(rank=4, dropout=1.0), "--lora-dropout"),
    (lambda: ObjectiveSettings(name="dpo"), "unknown --objective 'dpo': choose kd, minillm"),
    (lambda: ObjectiveSettings(pt_store="pt.zarr"), "--pt-store is MiniLLM's pretraining term"),
    (lambda: DistillConfig("s", "t", "o", steps=0), "--steps"),
    (lambda: DistillConfig("s", "t", "o", steps=10, optimizer=OptimizerSettings(warmup=20)), "--warmup 20 is longer than the run"),
    (lambda: ProcessSettings(data_parallel=0), "--data-parallel"),
    (lambda: NodeSettings(create_timeout=0), "--create-timeout"),
    (lambda: LayoutSettings(shard_windows=0), "--shard-windows"),
    (lambda: TeacherDumpConfig("t", None, "o", engine="tgi"), "unknown --engine 'tgi'"),
    (lambda: Capture(mode="topk", top_p=0.9), "--top-p belongs to --mode topp, not topk"),
    (lambda: Capture(mode="topp", top_p=0.9, draws=4), "--draws belongs to --mode sampled or headtail, not topp"),
])
def test_a_bad_setting_is_refused_where_it_is_built(build, message):
    with pytest.raises(SettingError) as caught:
        build()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_settings_hold_the_choices_and_are_never_changed():
    config = DistillConfig("s", "t", "o", sampler=SamplerSettings(name="uniform"), parallel=ParallelSettings(mode="ddp"))
    assert config.sampler.name.value == "uniform" and config.parallel.mode.value == "ddp" and config.objective.name.value == "kd"
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.checkpoint.resume = True


def test_every_numeric_distill_flag_has_a_range():
    flags = {"steps", "seed", "batch_size", "grad_accum", "global_batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay", "clip",
             "ddk_alpha", "ddk_temperature", "update_every", "eval_windows", "eval_batch_size", "pt_weight", "dist_timeout",
             "checkpoint_every", "reader_threads", "lora_rank", "lora_alpha", "lora_dropout", "student_seq_len", "uld_weight", "min_aligned"}
    assert set(DISTILL_RANGES) == flags


def test_the_run_identity_keeps_the_keys_checkpoints_were_written_with():
    """The flat keys of the config before it had parts (a checkpoint stores them and compares them on resume)."""
    keys = {"store", "student", "tokenizer", "steps", "lr", "min_lr_ratio", "warmup", "weight_decay", "clip", "kd", "objective", "minillm",
            "pt_store", "pt_weight", "sampler", "ddk_alpha", "ddk_smooth", "ddk_score", "ddk_temperature", "update_every", "eval_windows",
            "eval_batch_size", "checkpoint_every", "seed", "online_teacher", "global_batch_size"}
    settings = DistillConfig("s", "t", "o", sampler=SamplerSettings(name="static")).run_settings(16, resume=False)
    assert set(settings) == keys
    assert settings["sampler"] == "static" and settings["objective"] == "kd" and settings["ddk_score"] == "ppl-ratio"
    assert settings["kd"]["divergence"] == "forward_kl" and settings["global_batch_size"] == 16


def test_one_place_chooses_the_objective_the_step_calls():
    kd = ObjectiveSettings()
    assert isinstance(build_objective(kd, 32, None, lambda: torch.autocast("cpu", enabled=False)), KDObjective)
    assert isinstance(build_objective(ObjectiveSettings(name="minillm"), 32, None, lambda: torch.autocast("cpu", enabled=False)),
                      MiniLLMObjective)
    teacher = torch.nn.Linear(2, 2)
    assert isinstance(build_objective(kd, 32, teacher, lambda: torch.autocast("cpu", enabled=False)), OnlineKDObjective)
