"""`ddk-cache eval`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ddk_cache.choices import LossImpl
from ddk_cache.cli.boundary import user_errors
from ddk_cache.cli.options import Device, JsonOut, LossImplOption, StorageOptions, parse_storage_options
from ddk_cache.cli.output import check_json_target, console, json_alone, write_json
from ddk_cache.tables import name_table


def evaluate(
    model: Annotated[str, typer.Argument(help="Model folder or hub id (AutoModelForCausalLM).")],
    store: Annotated[str, typer.Argument(help="Cache store (path or URL).")],
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer, if not in the model folder.")] = None,
    max_windows: Annotated[Optional[int], typer.Option(help="Validation windows per domain (default: all).")] = None,
    batch_size: Annotated[int, typer.Option()] = 8,
    device: Device = "auto",
    random_init: Annotated[bool, typer.Option(help="Score a folder that holds only config.json (a fresh random initialisation) on purpose; "
                                                    "refused otherwise.")] = False,
    loss_impl: LossImplOption = LossImpl.fused,
    json_out: JsonOut = None,
    storage_options: StorageOptions = None,
) -> None:
    """Per-domain validation loss and perplexity of a model on a store's valid/ split, next to the teacher's."""
    from ddk_cache.stages.evaluate import run_eval  # the stage (torch, zarr) loads when the command runs: `--help` stays fast

    with user_errors():
        check_json_target(json_out)  # before a long evaluation
        results = run_eval(model, store, tokenizer, max_windows, batch_size, device, parse_storage_options(storage_options),
                           random_init, loss_impl)
    table = name_table(f"eval: {model} on {store}", ("domain", "windows", "model loss", "model ppl", "model ECE", "teacher loss", "teacher ppl"))
    for e in results:
        table.add_row(e.domain, str(e.windows), f"{e.student_loss:.4f}", f"{e.student_ppl:.3f}", f"{e.student_ece:.4f}",
                      f"{e.teacher_loss:.4f}", f"{e.teacher_ppl:.3f}")
    if not json_alone(json_out):
        console.print(table)
    if json_out is not None:
        with user_errors():
            write_json(json_out, [e.to_dict() for e in results])
