"""`ddk-cache plot ROUNDS_DIR`: a `minillm` run's `rounds.jsonl` as one PNG, `rounds.png`.

Four panels per evaluated student (round 0 = the start): the reverse KL estimate the rounds minimise, ROUGE-L of
the greedy answers (what one wants), and the two parts of the reverse KL, the student's entropy on its samples and
the teacher's CE on them (KL = CE - entropy per token). The entropy failure (benchmarks/RESULTS.md, "MiniLLM
rounds") reads off the figure: reverse KL down, entropy and teacher CE up, ROUGE-L down.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddk_cache.errors import DDKCacheError
from ddk_cache.stages.plot_run import pyplot, save_figure

ROUNDS_LOG = "rounds.jsonl"
FIGURE = "rounds.png"
PANELS = (("reverse_kl", "reverse KL (nats/token)"), ("rouge_l", "ROUGE-L"), ("entropy", "student entropy on its samples"),
          ("teacher_response_loss", "teacher CE on the samples"))


def read_rounds(folder: Path) -> list[dict[str, Any]]:
    """The evaluated students of `folder/rounds.jsonl`, by round (its timing lines left out)."""
    path = folder / ROUNDS_LOG
    records = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise DDKCacheError(f"{path}, line {number}, is not JSON: the file was cut or edited; restore it or re-run") from None
        if "reverse_kl" in entry:
            records[entry["round"]] = entry
    if not records:
        raise DDKCacheError(f"{path} has no evaluated student yet: plot it once round 0 is scored")
    return [records[r] for r in sorted(records)]


def plot_rounds(folder: Path, out_dir: Path | None = None) -> list[Path]:
    plt = pyplot()
    records = read_rounds(folder)
    out_dir = out_dir or folder
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    for ax, (key, title) in zip(axes.flat, PANELS):
        points = [(r["round"], r[key]) for r in records if r.get(key) is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set(title=title)
    for ax in axes[1]:
        ax.set(xlabel="round (0: the starting student)")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"{folder.name}: MiniLLM rounds")
    return [save_figure(fig, out_dir / FIGURE)]
