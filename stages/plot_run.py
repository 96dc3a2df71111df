"""`ddk-cache plot RUN_DIR`: a distill run's `metrics.jsonl` as PNG figures.

Three figures, the questions one asks of a run: is it learning (`loss.png`: total, CE and KD per
step), where is the data going (`domain_weights.png`: the sampler's weight per domain at each
evaluation; flat lines for `uniform` and `static`), and which domains lag the teacher
(`domain_ppl.png`: student perplexity per domain at each evaluation, the teacher's as a dashed
line of the same colour; the run's final evaluation, after the last step, included). An update where
DDK's factor collapsed (`ddk_collapsed` in the record: one domain took >= 0.99 of it) is a red
vertical line on `domain_weights.png`, since the weights alone look moderate then (smoothing caps
them). matplotlib is the `plot` extra; it is imported only here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddk_cache.errors import DDKCacheError
from ddk_cache.training.metrics_log import LOSS_PARTS, METRICS_NAME

FIGURES = ("loss.png", "domain_weights.png", "domain_ppl.png")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_NAME
    if not path.is_file():
        raise DDKCacheError(f"{run_dir} holds no {METRICS_NAME}: pass the --out folder of a distill run")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise DDKCacheError(f"{path}, line {number}, is not JSON: the file was cut or edited; restore it or re-run") from None
    if not any("loss" in r for r in records):
        raise DDKCacheError(f"{path} has no training steps yet: plot it once the run has taken a step")
    return records


def collapsed_steps(records: list[dict[str, Any]]) -> list[int]:
    """The steps whose DDK update collapsed onto one domain."""
    return [r["step"] for r in records if r.get("ddk_collapsed")]


def perplexity_series(records: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per domain: `step`, `student` and `teacher` perplexity at each evaluation, the final one (after the last step) last."""
    series: dict[str, dict[str, list[float]]] = {}
    for record in records:
        if "eval" in record:
            points = [(domain, e["student_ppl"], e["teacher_ppl"]) for domain, e in record["eval"].items()]
        elif "final_eval" in record:
            points = [(e["domain"], e["student_ppl"], e["teacher_ppl"]) for e in record["final_eval"]]
        else:
            continue
        for domain, student, teacher in points:
            line = series.setdefault(domain, {"step": [], "student": [], "teacher": []})
            line["step"].append(record["step"])
            line["student"].append(student)
            line["teacher"].append(teacher)
    return series


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the figures into `out_dir` (default: the run folder); returns their paths."""
    plt = pyplot()
    records = read_metrics(run_dir)
    out_dir = out_dir or run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    domains = list(evals[0]["eval"]) if evals else []
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in zip(LOSS_PARTS, ("-", "--", ":", "--", ":", "-.")):
        if any(r.get(key) for r in steps):
            ax.plot([r["step"] for r in steps], [r[key] for r in steps], style, label=key)
    ax.set(title=f"{run_dir.name}: training loss", xlabel="step", ylabel="nats")
    ax.legend()
    paths.append(save_figure(fig, out_dir / FIGURES[0]))

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, domain in enumerate(domains):
        ax.plot([r["step"] for r in evals], [r["domain_weights"][domain] for r in evals], marker=".", color=f"C{i}", label=domain)
    for n, step in enumerate(collapsed_steps(records)):
        ax.axvline(step, color="red", alpha=0.5, linewidth=1, label="DDK factor collapsed" if n == 0 else None)
    ax.set(title=f"{run_dir.name}: domain sampling weights", xlabel="step", ylabel="probability", ylim=(0, 1))
    if domains:
        ax.legend(fontsize=8)
    paths.append(save_figure(fig, out_dir / FIGURES[1]))

    fig, ax = plt.subplots(figsize=(7, 4))
    series = perplexity_series(records)
    for i, (domain, line) in enumerate(series.items()):
        ax.plot(line["step"], line["student"], marker=".", color=f"C{i}", label=f"{domain} (student)")
        ax.plot(line["step"], line["teacher"], "--", color=f"C{i}", alpha=0.6)
    ax.set(title=f"{run_dir.name}: validation perplexity (dashed: teacher; last point: final)", xlabel="step", ylabel="perplexity",
           yscale="log")
    if series:
        ax.legend(fontsize=8)
    paths.append(save_figure(fig, out_dir / FIGURES[2]))
    return paths


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or one line saying how to install it (the plot extra)."""
    try:
        import matplotlib  # optional: matplotlib (the plot extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional: matplotlib (the plot extra)
    except ImportError:
        raise DDKCacheError("plot needs matplotlib: pip install 'ddk-cache[plot]'") from None
    return plt


def save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt  # optional: matplotlib (the plot extra)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
