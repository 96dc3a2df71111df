"""Where a distill run's numbers go: `metrics.jsonl` always, TensorBoard when asked.

`metrics.jsonl` is the record of a run (one JSON object per step; evaluations and DDK weights on
the steps that have them; the final evaluation last) that `plot`, benchmarks and scripts read.
TensorBoard (`--report-to tensorboard`, torch's SummaryWriter; needs the `tensorboard` package)
shows the same numbers live, under `OUT/tensorboard`. After a resume both restart at the
checkpoint's step: the JSON lines of the killed run past it are cut, and TensorBoard purges its
events past it, so a resumed run's curves have no doubled segment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddk_cache.choices import ReportTarget, parse_choice, values
from ddk_cache.errors import DDKCacheError

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

    @staticmethod
    def check_available(report_to: tuple[str, ...]) -> None:
        """Before any work: the packages the targets need are installed."""
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise DDKCacheError("--report-to tensorboard needs the tensorboard package: pip install 'ddk-cache[tensorboard]'") from None

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

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            self._scalars(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _scalars(self, record: dict[str, Any]) -> None:
        step, add = record["step"], self._writer.add_scalar
        for key in (*LOSS_PARTS, *MINILLM_STATISTICS, "grad_norm", "lr", "tokens_per_s"):
            if key in record:
                add(f"train/{key}", record[key], step)
        for domain, scores in record.get("eval", {}).items():
            add(f"student_ppl/{domain}", scores["student_ppl"], step)
            add(f"student_over_teacher_ppl/{domain}", scores["student_ppl"] / scores["teacher_ppl"], step)
        for domain, weight in record.get("domain_weights", {}).items():
            add(f"domain_weight/{domain}", weight, step)
        for final in record.get("final_eval", []):
            add(f"final_student_loss/{final['domain']}", final["student_loss"], step)
        self._writer.flush()

    def _truncate(self, step: int) -> None:
        """Drop the lines a killed run wrote at or after `step`; the resumed run writes them again."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] < step]
        self.path.write_text("".join(line + "\n" for line in kept))
