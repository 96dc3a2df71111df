"""`ddk-cache rollout`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ddk_cache.choices import Generator, Responses
from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.options import Device, Overwrite, Progress, Seed, StorageOptions, parse_storage_options
from ddk_cache.cli.output import console


def rollout(
    student: Annotated[str, typer.Option(help="The current student (a folder with weights): it samples the responses.")],
    prompts: Annotated[Path, typer.Option(help="Prompt manifest (YAML): prompt template, reference field, train/test sources.")],
    out: Annotated[str, typer.Option(help="New rollout store: a local path or an object-store URL (s3://...).")],
    round_index: Annotated[int, typer.Option("--round", help="MiniLLM round: picks this round's training prompts, recorded in the store.")] = 0,
    seed: Seed = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts per generate call.")] = 8,
    device: Device = "auto",
    shard_windows: Annotated[Optional[int], typer.Option(help="Responses per shard (the unit the teacher scores and resumes).")] = None,
    responses: Annotated[Responses, typer.Option(
        help="sampled: the student answers (MiniLLM); references: the manifest's answers in the same windows (SFT and word-level "
             "KD train on them with distill --objective kd).")] = Responses.sampled,
    generator: Annotated[Generator, typer.Option(help="Who samples: auto (vLLM where installed with a GPU, else hf), hf or vllm.")] = Generator.auto,
    teacher: Annotated[Optional[str], typer.Option(
        help="Teacher-mixed sampling (MiniLLM): draw the training responses from (1 - a) student + a teacher, both on this node "
             "(transformers; the test prompts stay the student's alone).")] = None,
    teacher_mix: Annotated[Optional[float], typer.Option(help="a, the teacher's share of the mixture, in (0, 1] (default with --teacher: "
                                                              "0.2, MiniLLM's).")] = None,
    overwrite: Overwrite = False,
    storage_options: StorageOptions = None,
    progress: Progress = True,
) -> None:
    """The student answers the prompts (temperature 1): a rollout store for the teacher to score (MiniLLM, step 1 of a round)."""
    from ddk_cache.stages.rollout import RolloutConfig, run_rollout  # the stage (torch, zarr) loads when the command runs: `--help` stays fast

    with user_errors():
        summary = run_rollout(RolloutConfig(student=student, prompts=prompts, out=out, round=round_index, seed=seed, batch_size=batch_size,
                                            device=device, shard_windows=shard_windows, responses=responses.value, generator=generator.value, teacher=teacher, teacher_mix=teacher_mix,
                                            overwrite=overwrite,
                                            storage_options=parse_storage_options(storage_options), progress=progress))
    for split, count in summary.responses.items():
        console.print(f"{split}: {count} responses, {summary.mean_response_tokens[split]:.1f} tokens on average", highlight=False)
    console.print(f"rollouts written to {summary.url} in {summary.seconds:.1f} s; score them: "
                  f"ddk-cache teacher-dump --teacher T --out {summary.url}", soft_wrap=True, highlight=False)
