"""Where a distill run's numbers go: `metrics.jsonl` always, TensorBoard and Weights & Biases when asked.

`metrics.jsonl` is the record of a run (one JSON object per step; evaluations and DDK weights on
the steps that have them; the final evaluation last) that `plot`, benchmarks and scripts read.
TensorBoard (`--report-to tensorboard`, torch's SummaryWriter; needs the `tensorboard` package)
shows the same numbers live, under `OUT/tensorboard`; Weights & Biases (`--report-to wandb`, the
`wandb` package) logs them under the same tags to the project `WANDB_PROJECT` (default
`ddk-cache`), its files in `OUT/wandb` (`WANDB_MODE=offline` on nodes without network, then
`wandb sync`). After a resume the JSON lines of the killed run past the checkpoint are cut and
TensorBoard purges its events past it, so those curves have no doubled segment; wandb resumes the
same run (its id is derived from `OUT`) and, as wandb does, drops steps it has already seen.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddk_cache.choices import ReportTarget, parse_choice, values
from ddk_cache.errors import DDKCacheError, first_line

METRICS_NAME = "metrics.jsonl"
# what a training step logs: the loss and its parts (CE + KD, or MiniLLM's), and MiniLLM's per-step statistics
LOSS_PARTS = ("loss", "ce", "kd", "policy_gradient", "single_step", "pretraining_lm")
MINILLM_STATISTICS = ("reward", "reverse_kl", "clipped_fraction")
TENSORBOARD_DIR = "tensorboard"
REPORT_TARGETS = values(ReportTarget)


@dataclass(frozen=True)
class ReportingSettings:
    """What a run shows (`progress` bars) and where its numbers go besides metrics.jsonl (`report_to`)."""

    progress: bool = True
    report_to: tuple[ReportTarget, ...] = ()

    def __post_init__(self) -> None:
        note = " (metrics.jsonl is always written)"
        object.__setattr__(self, "report_to", tuple(parse_choice(ReportTarget, t, "--report-to", note) for t in self.report_to))
        MetricsLog.check_available(tuple(t.value for t in self.report_to))


class MetricsLog:
    """Append-only sink of step records; a no-op on ranks other than 0."""

    def __init__(self, out: Path, report_to: tuple[str, ...] = (), enabled: bool = True) -> None:
        self.path, self.enabled = out / METRICS_NAME, enabled
        self.report_to = tuple(report_to)  # checked where the settings were built (ReportingSettings), before any work
        self._file = None
        self._writer = None
        self._wandb = None

    @staticmethod
    def check_available(report_to: tuple[str, ...]) -> None:
        """Before any work: the packages the targets need are installed."""
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise DDKCacheError("--report-to tensorboard needs the tensorboard package: pip install 'ddk-cache[tensorboard]'") from None
        if "wandb" in report_to:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise DDKCacheError("--report-to wandb needs the wandb package: pip install 'ddk-cache[wandb]'") from None

    def open(self, start_step: int) -> None:
        """Start writing at `start_step` (0: a new run; otherwise the checkpoint a run resumes from)."""
        if not self.enabled:
            return
        if start_step == 0:
            self.path.write_text("")
        else:
            self._truncate(start_step)
        self._file = self.path.open("a")
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard (the tensorboard extra)

            self._writer = SummaryWriter(str(self.path.parent / TENSORBOARD_DIR), purge_step=start_step or None)
        if "wandb" in self.report_to:
            import wandb  # optional: wandb (the wandb extra)

            out = self.path.parent.resolve()
            try:
                self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "ddk-cache"), name=out.name, dir=str(out),
                                         id=hashlib.sha256(str(out).encode()).hexdigest()[:16], resume="allow")
            except wandb.errors.UsageError as exc:  # no API key, most often: the user's to fix
                raise DDKCacheError(f"--report-to wandb: {first_line(exc)} (or set WANDB_MODE=offline, and `wandb sync` later)") from None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        tags = scalars(record) if self._writer is not None or self._wandb is not None else {}
        if self._writer is not None:
            for tag, value in tags.items():
                self._writer.add_scalar(tag, value, record["step"])
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(tags, step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def _truncate(self, step: int) -> None:
        """Drop the lines a killed run wrote at or after `step`; the resumed run writes them again."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < step]
        self.path.write_text("".join(line + "\n" for line in kept))


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A step record as the tagged numbers TensorBoard and wandb show (the same tags in both)."""
    tags: dict[str, float] = {}
    for key in (*LOSS_PARTS, *MINILLM_STATISTICS, "grad_norm", "lr", "tokens_per_s"):
        if key in record:
            tags[f"train/{key}"] = record[key]
    for domain, scores in record.get("eval", {}).items():
        tags[f"student_ppl/{domain}"] = scores["student_ppl"]
        tags[f"student_over_teacher_ppl/{domain}"] = scores["student_ppl"] / scores["teacher_ppl"]
    for domain, weight in record.get("domain_weights", {}).items():
        tags[f"domain_weight/{domain}"] = weight
    for final in record.get("final_eval", []):
        tags[f"final_student_loss/{final['domain']}"] = final["student_loss"]
    return tags
