"""`ddk-cache eval-responses`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.options import Device, JsonOut, StorageOptions, parse_storage_options
from ddk_cache.cli.output import check_json_target, console, json_alone, write_json


def eval_responses(
    student: Annotated[str, typer.Option(help="The student whose greedy answers are scored.")],
    prompts: Annotated[Path, typer.Option(help="Prompt manifest (YAML) with a reference_field: its test prompts are used.")],
    scored: Annotated[Optional[str], typer.Option(help="A scored rollout store of this student: also report its reverse KL estimate.")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per generate call.")] = 8,
    device: Device = "auto",
    json_out: JsonOut = None,
    storage_options: StorageOptions = None,
) -> None:
    """ROUGE-L of a student's greedy answers to held-out prompts (MiniLLM's metric), and its reverse KL from a scored rollout store."""
    from ddk_cache.stages.eval_responses import (  # the stage (torch, zarr) loads when the command runs: `--help` stays fast
        EvalResponsesConfig,
        run_eval_responses,
    )

    with user_errors():
        check_json_target(json_out)  # before generating every answer
        scores = run_eval_responses(EvalResponsesConfig(student=student, prompts=prompts, scored=scored, batch_size=batch_size, device=device,
                                                        storage_options=parse_storage_options(storage_options)))
        if not json_alone(json_out):
            console.print(f"ROUGE-L {scores.rouge_l:.2f} over {scores.responses} held-out prompts ({scores.mean_response_tokens:.1f} tokens "
                          "per greedy answer)" + (f"; reverse KL estimate {scores.reverse_kl:.4f}" if scores.reverse_kl is not None else ""),
                          highlight=False, soft_wrap=True)
        if json_out is not None:
            write_json(json_out, scores.to_dict())
