"""`ddk-cache minillm`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ddk_cache.choices import SingleStepDivergence
from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.options import Device, Progress, Seed
from ddk_cache.cli.output import console
from ddk_cache.tables import name_table


def minillm(
    student: Annotated[str, typer.Option(help="The starting student (a folder with weights, e.g. from prune-student).")],
    teacher: Annotated[str, typer.Option(help="The teacher that scores each round's rollouts.")],
    prompts: Annotated[Path, typer.Option(help="Prompt manifest (YAML).")],
    out: Annotated[Path, typer.Option(help="Folder for the rounds: round-R/rollouts.zarr, round-R/student, final/, rounds.jsonl.")],
    rounds: Annotated[int, typer.Option(help="Rollout -> score -> update rounds.")] = 2,
    epochs: Annotated[int, typer.Option(help="Optimizer passes over each round's rollouts.")] = 2,
    batch_size: Annotated[int, typer.Option(help="Responses per optimizer step (and per generate / scoring call).")] = 8,
    lr: Annotated[float, typer.Option(help="Learning rate (constant; a fresh AdamW each round).")] = 1e-5,
    k: Annotated[int, typer.Option(help="Teacher entries kept per response position.")] = 64,
    ppo_clip: Annotated[float, typer.Option(help="PPO clip epsilon of the importance ratios.")] = 0.2,
    single_step: Annotated[bool, typer.Option(help="Add the single-step reverse KL term.")] = True,
    divergence: Annotated[SingleStepDivergence, typer.Option(
        help="The single-step term: reverse_kl (MiniLLM) or skew_reverse_kl (DistiLLM's KL(q || (1 - a) p + a q)).")] = SingleStepDivergence.reverse_kl,
    skew_alpha: Annotated[float, typer.Option(help="skew_reverse_kl: a (DistiLLM: 0.1).")] = 0.1,
    teacher_mix: Annotated[float, typer.Option(
        help="The teacher's share of the mixture the training responses are sampled from, in [0, 1] (MiniLLM: 0.2; 0: the student alone).")] = 0.2,
    sft_steps: Annotated[Optional[int], typer.Option(
        help="Steps of CE on the reference answers before round 0 (MiniLLM starts from an SFT'd student). "
             "Default: one pass over the references of every prompt the rounds see (0 without references).",
        show_default=False)] = None,
    sft_lr: Annotated[float, typer.Option(help="The SFT start's learning rate (constant).")] = 1e-4,
    pt_store: Annotated[Optional[str], typer.Option(help="A cache of fixed text whose next-token CE is added to every update (L_PT).")] = None,
    pt_weight: Annotated[float, typer.Option(help="The weight of the --pt-store term.")] = 1.0,
    rouge: Annotated[bool, typer.Option(help="ROUGE-L of every student's greedy answers to the test prompts (needs references).")] = True,
    seed: Seed = 0,
    device: Device = "auto",
    progress: Progress = True,
) -> None:
    """MiniLLM in offline rounds on one machine: the student answers, the teacher scores, the student updates; resumable."""
    from ddk_cache.stages.minillm_rounds import (  # the stage (torch, zarr) loads when the command runs: `--help` stays fast
        MiniLLMConfig,
        MiniLLMRoundsConfig,
        run_minillm_rounds,
    )

    with user_errors():
        settings = MiniLLMConfig(clip=ppo_clip, single_step=single_step, divergence=divergence.value, skew_alpha=skew_alpha)
        records = run_minillm_rounds(MiniLLMRoundsConfig(student=student, teacher=teacher, prompts=prompts, out=out, rounds=rounds, epochs=epochs,
                                                         batch_size=batch_size, lr=lr, k=k, minillm=settings, seed=seed, device=device,
                                                         pt_store=pt_store, pt_weight=pt_weight, teacher_mix=teacher_mix,
                                                         sft_steps=sft_steps, sft_lr=sft_lr,
                                                         rouge=rouge, progress=progress),
                                     log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    table = name_table(f"MiniLLM rounds: {out}", ("student", "reverse KL", "teacher CE", "entropy", "ROUGE-L", "tokens"))
    for record in records:
        table.add_row(f"round {record.round}", f"{record.reverse_kl:.4f}", f"{record.teacher_response_loss:.4f}",
                      f"{record.entropy:.4f}" if record.entropy is not None else "",
                      f"{record.rouge_l:.2f}" if record.rouge_l is not None else "", f"{record.response_tokens:.1f}")
    console.print(table)
