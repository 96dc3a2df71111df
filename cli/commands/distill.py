"""`ddk-cache distill`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ddk_cache.choices import CrossTokenizer, DDKScore, Divergence, LossImpl, Objective, ParallelMode, ReportTarget, SamplerName, Tail
from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.options import Device, LossImplOption, Progress, Seed, StorageOptions, parse_storage_options
from ddk_cache.cli.output import console, say
from ddk_cache.devices import is_main_process
from ddk_cache.tables import name_table


def distill(
    store: Annotated[str, typer.Option(help="Cache store written by teacher-dump (path or URL).")],
    student: Annotated[str, typer.Option(help="Student: a folder or hub id with weights, or a folder with only config.json.")],
    out: Annotated[Path, typer.Option(help="Output folder: student (save_pretrained), metrics.jsonl, checkpoints/ (while running).")],
    tokenizer: Annotated[Optional[str], typer.Option(help="Student tokenizer, if not in the student folder.")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Windows per micro-batch (per rank, per forward pass).")] = 8,
    global_batch_size: Annotated[Optional[int], typer.Option(
        help="Windows per optimizer step over all ranks; the data order, DDK weights and loss curve depend on it, not on the "
             "number of ranks (default: batch-size x grad-accum x ranks).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(
        help="Micro-batches per rank per optimizer step (default: what --global-batch-size implies, else 1).")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (DDK: 3e-5 for large pretrained students).", rich_help_panel="Optimiser")] = 3e-4,
    min_lr_ratio: Annotated[float, typer.Option(help="Final LR as a fraction of the peak (DDK: 0.1).", rich_help_panel="Optimiser")] = 0.1,
    warmup: Annotated[Optional[int], typer.Option(help="Warmup steps (default min(1000, steps/10)).", rich_help_panel="Optimiser")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.", rich_help_panel="Optimiser")] = 0.1,
    clip: Annotated[float, typer.Option(help="Gradient-norm clip (0: off).", rich_help_panel="Optimiser")] = 1.0,
    divergence: Annotated[Optional[Divergence], typer.Option(
        help="The divergence between teacher and student on the cached entries (default forward_kl; --objective minillm: its single-step "
             "term's, reverse_kl or skew_reverse_kl, default reverse_kl).", rich_help_panel="KD loss")] = None,
    tail: Annotated[Tail, typer.Option(help="rest (keep the missing mass as a bucket) or renorm.", rich_help_panel="KD loss")] = Tail.rest,
    temperature: Annotated[float, typer.Option(help="KD temperature T.", rich_help_panel="KD loss")] = 1.0,
    gamma: Annotated[float, typer.Option(help="loss = CE + gamma * KD (DDK: 0.2; 0 = CE only).", rich_help_panel="KD loss")] = 0.2,
    mix: Annotated[Optional[float], typer.Option(help="Use loss = (1 - mix) * CE + mix * KD instead (MiniLLM baseline: 0.5).", rich_help_panel="KD loss")] = None,
    jsd_beta: Annotated[float, typer.Option(help="jsd: the mixture weight.", rich_help_panel="KD loss")] = 0.5,
    skew_alpha: Annotated[float, typer.Option(help="skew_*_kl: the skew (DistiLLM: 0.1).", rich_help_panel="KD loss")] = 0.1,
    loss_impl: LossImplOption = LossImpl.fused,
    cross_tokenizer: Annotated[CrossTokenizer, typer.Option(
        help="A student whose tokenizer differs from the cache's: gold (tokens with the same bytes compared exactly, the rest by "
             "sorted probabilities) or uld (sorted probabilities only); the store must carry its tokenizer.",
        rich_help_panel="Cross-tokenizer")] = CrossTokenizer.off,
    uld_weight: Annotated[float, typer.Option(help="gold: the weight of the sorted-probability term on what does not map exactly.",
                                              rich_help_panel="Cross-tokenizer")] = 1.0,
    min_aligned: Annotated[float, typer.Option(help="Refuse a student tokenizer whose share of positions aligned with the teacher's "
                                               "is below this.", rich_help_panel="Cross-tokenizer")] = 0.5,
    student_seq_len: Annotated[Optional[int], typer.Option(
        help="The student's window in its own tokens (default: the most the first windows of each domain need; longer is cut).",
        rich_help_panel="Cross-tokenizer")] = None,
    objective: Annotated[Objective, typer.Option(
        help="kd: CE + KD on a cache of fixed text; minillm: MiniLLM's update (policy gradient + single-step reverse KL) on a "
             "scored rollout store (ddk-cache rollout, then teacher-dump).", rich_help_panel="MiniLLM")] = Objective.kd,
    ppo_clip: Annotated[float, typer.Option(help="minillm: PPO clip epsilon of the importance ratios.", rich_help_panel="MiniLLM")] = 0.2,
    single_step: Annotated[bool, typer.Option(help="minillm: add the single-step reverse KL term (MiniLLM's default).", rich_help_panel="MiniLLM")] = True,
    whiten: Annotated[bool, typer.Option(help="minillm: whiten the advantages over the batch (MiniLLM's default).", rich_help_panel="MiniLLM")] = True,
    pt_store: Annotated[Optional[str], typer.Option(
        help="minillm: a cache of fixed text whose next-token CE is added to every update (MiniLLM's L_PT).", rich_help_panel="MiniLLM")] = None,
    pt_weight: Annotated[float, typer.Option(help="minillm: the weight of the --pt-store term.", rich_help_panel="MiniLLM")] = 1.0,
    sampler: Annotated[SamplerName, typer.Option(help="ddk, static (the manifest's weights) or uniform.", rich_help_panel="DDK domain sampler")] = SamplerName.ddk,
    ddk_alpha: Annotated[float, typer.Option(help="DDK smoothing alpha.", rich_help_panel="DDK domain sampler")] = 0.5,
    ddk_smooth: Annotated[bool, typer.Option(help="DDK factor smooth updating (off = the paper's ablation).", rich_help_panel="DDK domain sampler")] = True,
    ddk_score: Annotated[DDKScore, typer.Option(
        help="DDK's discrepancy score: ppl-ratio (the paper: student/teacher perplexity) or ce-ratio (student/teacher "
             "cross-entropy: linear in the gap, not exponential; see README on when the paper's factor collapses).",
        rich_help_panel="DDK domain sampler")] = DDKScore.ppl_ratio,
    ddk_temperature: Annotated[float, typer.Option(help="Divide DDK's scores by this before its softmax (> 1 flattens the weights).", rich_help_panel="DDK domain sampler")] = 1.0,
    update_every: Annotated[Optional[int], typer.Option(help="K: evaluate and reweight every K steps (default min(1000, steps/10)).", rich_help_panel="DDK domain sampler")] = None,
    eval_windows: Annotated[int, typer.Option(help="Validation windows per domain per evaluation (split over the ranks).", rich_help_panel="DDK domain sampler")] = 32,
    eval_batch_size: Annotated[int, typer.Option(help="Windows per forward pass in evaluations.", rich_help_panel="DDK domain sampler")] = 8,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: every K steps).")] = 0,
    seed: Seed = 0,
    device: Device = "auto",
    parallel: Annotated[ParallelMode, typer.Option(
        help="Under torchrun: ddp (whole student on every rank) or fsdp (FSDP2: weights, gradients and optimizer state sharded); "
             "auto = ddp with several ranks, none alone.", rich_help_panel="Devices and ranks")] = ParallelMode.auto,
    dist_timeout: Annotated[float, typer.Option(help="Seconds a collective waits for a missing rank before the job fails.", rich_help_panel="Devices and ranks")] = 600.0,
    reader_threads: Annotated[int, typer.Option(help="Threads decoding cache chunks ahead of the training step.")] = 2,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint.")] = False,
    auto_resume: Annotated[bool, typer.Option(
        help="Continue the run in --out if it has a checkpoint, else start it: for job scripts re-run after preemption.")] = False,
    online_teacher: Annotated[Optional[str], typer.Option(
        help="Reference mode: KD against this live teacher's full distribution instead of the cache (loads the teacher).")] = None,
    storage_options: StorageOptions = None,
    report_to: Annotated[Optional[list[ReportTarget]], typer.Option(
        help="Also report to: tensorboard (OUT/tensorboard; the tensorboard extra), wandb (project WANDB_PROJECT, files in "
             "OUT/wandb; WANDB_MODE=offline without network; the wandb extra). metrics.jsonl is always written.")] = None,
    lora_rank: Annotated[int, typer.Option(help="Train LoRA adapters of this rank on the frozen student (0: the whole student "
                                                "trains; the lora extra). --out then holds the adapter.", rich_help_panel="LoRA")] = 0,
    lora_alpha: Annotated[float, typer.Option(help="LoRA scaling alpha (the update is scaled by alpha / rank).", rich_help_panel="LoRA")] = 16.0,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the LoRA inputs.", rich_help_panel="LoRA")] = 0.0,
    lora_targets: Annotated[Optional[str], typer.Option(
        help="Comma-separated module names to adapt, e.g. q_proj,v_proj (default: peft's choice for the architecture).",
        rich_help_panel="LoRA")] = None,
    lora_merge: Annotated[bool, typer.Option(help="Also save the adapter merged into the weights, in OUT/merged.", rich_help_panel="LoRA")] = False,
    progress: Progress = True,
) -> None:
    """Train a student from a cache alone, with the DDK domain sampler and KD on the cached top-k."""
    from ddk_cache.stages import distill as stage  # the stage (torch, zarr) loads when the command runs: `--help` stays fast

    with user_errors():
        minillm = objective == Objective.minillm  # --divergence is the single-step term's there, the KD term's otherwise
        kd_divergence = divergence.value if divergence is not None and not minillm else "forward_kl"
        single_step_divergence = divergence.value if divergence is not None and minillm else "reverse_kl"
        config = stage.DistillConfig(
            store=store, student=student, out=out, tokenizer=tokenizer, steps=steps, seed=seed,
            batch=stage.BatchSettings(batch_size=batch_size, grad_accum=grad_accum, global_batch_size=global_batch_size),
            optimizer=stage.OptimizerSettings(lr=lr, min_lr_ratio=min_lr_ratio, warmup=warmup, weight_decay=weight_decay, clip=clip),
            objective=stage.ObjectiveSettings(
                name=objective, kd=stage.KDConfig.from_flags(kd_divergence, tail.value, temperature, gamma, mix, jsd_beta, skew_alpha),
                minillm=stage.MiniLLMConfig(clip=ppo_clip, whiten=whiten, single_step=single_step, divergence=single_step_divergence,
                                            skew_alpha=skew_alpha), pt_store=pt_store, pt_weight=pt_weight,
                online_teacher=online_teacher, loss_impl=loss_impl, cross_tokenizer=cross_tokenizer, uld_weight=uld_weight,
                min_aligned=min_aligned),
            sampler=stage.SamplerSettings(name=sampler, alpha=ddk_alpha, smooth=ddk_smooth, score=ddk_score, temperature=ddk_temperature,
                                          update_every=update_every, eval_windows=eval_windows, eval_batch_size=eval_batch_size),
            parallel=stage.ParallelSettings(mode=parallel, device=device, dist_timeout=dist_timeout),
            checkpoint=stage.CheckpointSettings(every=checkpoint_every, resume="auto" if auto_resume else resume),
            reporting=stage.ReportingSettings(progress=progress, report_to=tuple(report_to or ())),
            data=stage.DataSettings(storage_options=parse_storage_options(storage_options), reader_threads=reader_threads,
                                    student_seq_len=student_seq_len),
            lora=stage.LoRASettings(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=tuple((lora_targets or "").split(",")),
                                    merge=lora_merge),
        )
        say(progress, "distill: opening the store and loading the student ...")
        summary = stage.run_distill(config)
    if not is_main_process():
        return
    before = {e.domain: e for e in summary.first_eval}
    table = name_table(f"distill: {summary.steps} steps, {summary.tokens_per_second:,.0f} student tokens/s",
                       ("domain", "teacher ppl", "student ppl before", "student ppl after", "final weight"))
    for e in summary.final_eval:
        table.add_row(e.domain, f"{e.teacher_ppl:.3f}", f"{before[e.domain].student_ppl:.3f}", f"{e.student_ppl:.3f}",
                      f"{summary.final_weights[e.domain]:.3f}")
    console.print(table)
    console.print(f"student saved to {summary.out} (metrics: {summary.out / 'metrics.jsonl'})", soft_wrap=True)
