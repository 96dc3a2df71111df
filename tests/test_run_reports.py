"""Seeing a run: `ddk-cache plot` figures from a real metrics.jsonl, and `--report-to tensorboard` / `wandb`."""

from __future__ import annotations

import json

from test_distill import distill, make_student
from typer.testing import CliRunner

from ddk_cache.cli.main import app
from ddk_cache.stages.plot_run import collapsed_steps, perplexity_series, read_metrics


def test_plot_writes_the_three_figures_of_a_real_run(tiny_store, tiny_teacher, tmp_path):
    run = tmp_path / "run"
    assert distill(tiny_store, make_student(tmp_path / "student", tiny_teacher), run, "--steps", "6", "--update-every", "2").exit_code == 0
    result = CliRunner().invoke(app, ["plot", str(run), "--out", str(tmp_path / "figures")])
    assert result.exit_code == 0, result.output
    for name in ("loss.png", "domain_weights.png", "domain_ppl.png"):
        png = (tmp_path / "figures" / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, name  # a drawn figure, not an empty canvas
        assert name in result.output
    records = read_metrics(run)
    assert not collapsed_steps(records) and "warning" not in result.output  # the tiny teacher's ratios are all near 1
    for line in perplexity_series(records).values():  # every evaluation, and the final one after the last step
        assert line["step"] == [0, 2, 4, 6] and len(line["student"]) == len(line["teacher"]) == 4


def test_a_collapsed_ddk_update_is_said_once_recorded_and_marked_on_the_plot(tiny_store, tiny_teacher, tmp_path):
    """Issue 25: DDK putting 1.0 / 1e-121 on the domains said nothing. A tiny --ddk-temperature makes the tiny
    teacher's near-equal ratios one-hot, every update."""
    run = tmp_path / "run"
    result = distill(tiny_store, make_student(tmp_path / "student", tiny_teacher), run, "--steps", "6", "--update-every", "2",
                     "--ddk-temperature", "0.0001")
    assert result.exit_code == 0, result.output
    records = read_metrics(run)
    assert collapsed_steps(records) == [0, 2, 4]
    onto = [r["ddk_collapsed"] for r in records if r.get("ddk_collapsed")]
    changes = [domain for i, domain in enumerate(onto) if i == 0 or onto[i - 1] != domain]  # said once per domain it collapses onto
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert [w.split("on '")[1].split("'")[0] for w in warnings] == changes and warnings[0].startswith("warning: step 0: DDK's factor")
    assert all("When DDK's factor collapses" in w for w in warnings)
    assert all(max(r["domain_weights"].values()) < 0.99 for r in records if r["step"] > 0 and "domain_weights" in r)  # smoothing hides it
    assert CliRunner().invoke(app, ["plot", str(run)]).exit_code == 0


def test_plot_refuses_a_folder_without_metrics_and_a_cut_file(tmp_path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "holds no metrics.jsonl: pass the --out folder of a distill run" in result.stderr
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "lo')
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "line 2, is not JSON" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_report_to_tensorboard_logs_the_metrics_beside_metrics_jsonl(tiny_store, tiny_teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = distill(tiny_store, make_student(tmp_path / "student", tiny_teacher), run, "--steps", "4", "--update-every", "2",
                     "--report-to", "tensorboard")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/ce", "train/kd", "train/lr", "domain_weight/math", "student_ppl/code", "final_student_loss/prose"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3]
    assert [e.step for e in events.Scalars("domain_weight/math")] == [0, 2]
    jsonl_losses = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(jsonl_losses) == 4


def test_unknown_report_target_is_refused_before_anything_is_written(tiny_store, tiny_teacher, tmp_path):
    result = distill(tiny_store, make_student(tmp_path / "student", tiny_teacher), tmp_path / "run", "--steps", "2", "--report-to", "mlflow")
    assert result.exit_code == 2 and "Invalid value for '--report-to': 'mlflow' is not one of 'tensorboard', 'wandb'." in result.stderr
    assert not (tmp_path / "run").exists()


def test_wandb_without_an_api_key_is_one_line(tiny_store, tiny_teacher, tmp_path, monkeypatch):
    import wandb

    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no login of this machine's user
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    result = distill(tiny_store, make_student(tmp_path / "student", tiny_teacher), tmp_path / "run", "--steps", "2", "--report-to", "wandb")
    wandb.teardown()  # the next test's wandb starts from its own settings
    assert result.exit_code == 2 and result.stderr.startswith("error: --report-to wandb:") and "WANDB_MODE=offline" in result.stderr, result.output
    assert result.stderr.count("\n") == 1


def test_report_to_wandb_logs_the_same_tags_offline(tiny_store, tiny_teacher, tmp_path, monkeypatch):
    """Issue 25: `--report-to wandb` was refused; most teams use it. Offline here (no network), as on many nodes."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    result = distill(tiny_store, make_student(tmp_path / "student", tiny_teacher), run, "--steps", "4", "--update-every", "2",
                     "--report-to", "wandb")
    assert result.exit_code == 0, result.output
    import wandb

    wandb.teardown()
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")  # wandb's own record of the run, for `wandb sync`
    logged = log.read_bytes()
    for tag in ("train/loss", "train/kd", "domain_weight/math", "student_ppl/code", "final_student_loss/prose"):
        assert tag.encode() in logged, tag
    for record in (r for r in read_metrics(run) if "loss" in r):  # each step's loss, as wandb encodes numbers (JSON)
        assert json.dumps(record["loss"]).encode() in logged, record["step"]
