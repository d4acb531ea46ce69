"""Tests of :mod:`coap_plugins.train.report` on fake run folders (no training involved)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from coap_plugins.train.report import (
    Run,
    compare,
    format_bytes,
    format_metric,
    load_run,
    main,
    plot_curves,
    summary_table,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_TRAIN, N_EVAL = 20, 3


def make_run(
    root: Path,
    folder: str,
    *,
    name: str | None = None,
    task: str = "classification",
    state: int = 1_000_000,
    full: int = 2_500_000,
    steps: int = 100,
    wall: float = 12.34,
    sample_grid: str | None = None,
    metrics: bool = True,
) -> Path:
    """Write ``root/folder`` with summary.json and metrics.jsonl as coap-train would."""
    run = root / folder
    run.mkdir(parents=True)
    classification = task == "classification"
    metric = "accuracy" if classification else "heldout_loss"
    final = {"accuracy": 0.98333, "loss": 0.0612345} if classification else {"heldout_loss": 0.0427123}
    summary: dict[str, Any] = {
        "name": name or folder,
        "trainer": "composer" if classification else "lightning",
        "task": task,
        "model": "resnet_tiny" if classification else "unet_small",
        "optimizer": "CoapAdamW",
        "coap": True,
        "metric": metric,
        "metric_goal": "max" if classification else "min",
        "final": final,
        "state_bytes": state,
        "full_rank_state_bytes": full,
        "params": 123_456,
        "steps": steps,
        "samples_per_second": 123.456,
        "wall_seconds": wall,
        "peak_memory_bytes": 200 * 2**20,
        "world_size": 1,
        "precision": "fp32",
        "sample_grid": sample_grid,
        "config": "config.yaml",
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    if not metrics:
        return run
    rows: list[dict[str, Any]] = []
    for i in range(N_TRAIN):
        step = 5 * (i + 1)
        loss = float("nan") if i == 7 else 2.0 / (1 + i)  # one NaN row, as a diverging step would log
        rows.append({"split": "train", "step": step, "epoch": i // 10, "loss": loss, "lr": 1e-3, "time": 0.1 * step})
    for j in range(N_EVAL):
        step = 100 * (j + 1) // N_EVAL
        value = (
            {"accuracy": 0.5 + 0.2 * j, "loss": 1.0 / (j + 1)} if classification else {"heldout_loss": 0.1 / (j + 1)}
        )
        rows.append({"split": "eval", "step": step, "epoch": j, "time": 1.0 * step, "extra_key": "ignored", **value})
    rows.append({"split": "other", "step": 1})  # unknown split: ignored
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return run


def assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert len(data) > 0
    assert data[:8] == PNG_MAGIC


# ------------------------------------------------------------------ load_run


def test_load_run_parses_rows_and_summary(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, "cls"))
    assert isinstance(run, Run)
    assert run.path == tmp_path / "cls"
    assert (run.name, run.task, run.metric) == ("cls", "classification", "accuracy")
    assert len(run.train) == N_TRAIN and len(run.eval) == N_EVAL
    assert run.train[0]["loss"] == pytest.approx(2.0)
    assert math.isnan(run.train[7]["loss"])
    assert run.eval[-1]["accuracy"] == pytest.approx(0.9)
    assert run.eval[-1]["step"] == 100
    assert run.summary["state_bytes"] == 1_000_000


def test_load_run_without_metrics_file(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, "bare", metrics=False))
    assert run.train == [] and run.eval == []


def test_load_run_missing_folder_or_summary(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*summary\.json"):
        load_run(tmp_path / "empty")


def test_load_run_malformed_line_names_line_number(tmp_path: Path) -> None:
    run = make_run(tmp_path, "bad")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines.insert(3, '{"split": "train", "step": ')  # becomes line 4
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 4"):
        load_run(run)


def test_load_run_bad_summary(tmp_path: Path) -> None:
    run = make_run(tmp_path, "s")
    (run / "summary.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_run(run)
    (run / "summary.json").write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="task"):
        load_run(run)


# ------------------------------------------------------------------ formatting


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (3 * 2**20, "3.00 MiB"),
        (2**20 - 1, "1.00 MiB"),  # rounds up into the next unit rather than "1024.00 KiB"
        (5 * 2**30, "5.00 GiB"),
        (1_000_000, "976.56 KiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_format_bytes_rejects_negative() -> None:
    with pytest.raises(ValueError, match="-1"):
        format_bytes(-1)


def test_format_metric() -> None:
    assert format_metric("accuracy", 0.98333) == "98.33 %"
    assert format_metric("heldout_loss", 0.0427123) == "0.04271"
    assert format_metric("loss", 1234.5678) == "1235"
    assert format_metric("loss", None) == "n/a"
    assert format_metric("loss", float("nan")) == "nan"


# ------------------------------------------------------------------ summary_table


def table_rows(table: str) -> list[list[str]]:
    """Cells of each line of a Markdown table (header first, separator dropped)."""
    lines = [ln for ln in table.strip().splitlines() if not ln.startswith("|---")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def test_summary_table_one_task(tmp_path: Path) -> None:
    table = summary_table([load_run(make_run(tmp_path, "cls"))])
    header, row = table_rows(table)
    cells = dict(zip(header, row))
    assert cells["run"] == "cls"
    assert cells["trainer"] == "composer"
    assert cells["optimizer"] == "CoapAdamW"
    assert cells["accuracy"] == "98.33 %"
    assert cells["eval loss"] == "0.06123"
    assert cells["optimizer state"] == "976.56 KiB"
    assert cells["state / full rank"] == "40.0 %"  # 1_000_000 / 2_500_000
    assert cells["steps"] == "100"
    assert cells["samples/s"] == "123.5"
    assert cells["wall (s)"] == "12.3"
    assert cells["peak memory (MiB)"] == "200.0"
    assert "metric vs first" not in cells


def test_summary_table_mixed_tasks_uses_metric_column(tmp_path: Path) -> None:
    runs = [load_run(make_run(tmp_path, "cls")), load_run(make_run(tmp_path, "gen", task="ddpm", state=300, full=1200))]
    header, cls_row, gen_row = table_rows(summary_table(runs))
    assert "metric" in header and "accuracy" not in header
    assert dict(zip(header, cls_row))["metric"] == "accuracy 98.33 %"
    gen = dict(zip(header, gen_row))
    assert gen["metric"] == "heldout_loss 0.04271"
    assert gen["eval loss"] == "n/a"
    assert gen["optimizer state"] == "300 B"
    assert gen["state / full rank"] == "25.0 %"


def test_summary_table_disambiguates_repeated_names(tmp_path: Path) -> None:
    runs = [load_run(make_run(tmp_path, f, name="same")) for f in ("a", "b")]
    _, row_a, row_b = table_rows(summary_table(runs))
    assert (row_a[0], row_b[0]) == ("same (a)", "same (b)")


def test_summary_table_needs_runs() -> None:
    with pytest.raises(ValueError, match="at least one run"):
        summary_table([])


# ------------------------------------------------------------------ plots and reports


def test_plot_curves_writes_png_even_without_rows(tmp_path: Path) -> None:
    runs = [load_run(make_run(tmp_path, "bare", metrics=False)), load_run(make_run(tmp_path, "cls"))]
    out = plot_curves(runs, tmp_path / "plots" / "c.png", smoothing=0.0)
    assert out == tmp_path / "plots" / "c.png"
    assert_png(out)
    with pytest.raises(ValueError, match=r"smoothing.*1\.5"):
        plot_curves(runs, tmp_path / "x.png", smoothing=1.5)


def test_write_report_classification(tmp_path: Path) -> None:
    run = make_run(tmp_path, "cls")
    report = write_report(run)
    assert report == run / "report.md"
    text = report.read_text()
    assert text.startswith("# cls\n")
    assert "98.33 %" in text and "40.0 %" in text
    assert "config.yaml" in text
    assert "![training curves](curves.png)" in text
    assert "Samples" not in text
    assert "Diverged" not in text and "usable gradient" not in text
    assert_png(run / "curves.png")


@pytest.mark.parametrize("stopped", [True, False])
def test_write_report_says_the_run_diverged_and_which_layers_never_set_up(tmp_path: Path, stopped: bool) -> None:
    run = make_run(tmp_path, "nan")
    summary = json.loads((run / "summary.json").read_text())
    summary["diverged"] = {"step": 40, "loss": float("nan"), "stopped": stopped}
    summary["waiting_layers"] = [f"layer{i}.weight" for i in range(7)]
    (run / "summary.json").write_text(json.dumps(summary))
    lines = write_report(run).read_text().splitlines()
    went = "stopped there (`stop_on_nonfinite: true`)" if stopped else "went on (`stop_on_nonfinite: false`)"
    first = "" if stopped else "first "
    assert lines[4] == f"**Diverged**: the training loss was {first}nan at step 40; training {went}."
    assert lines[6] == (
        "**7 projected layers never received a usable gradient**: their state is not counted in the "
        "optimizer state below (`layer0.weight`, `layer1.weight`, `layer2.weight`, `layer3.weight`, "
        "`layer4.weight`, ...)."
    )
    assert lines[8].startswith("| run |")
    summary["diverged"], summary["waiting_layers"] = None, ["head.weight"]
    (run / "summary.json").write_text(json.dumps(summary))
    lines = write_report(run).read_text().splitlines()
    assert lines[4] == (
        "**1 projected layer never received a usable gradient**: its state is not counted in the "
        "optimizer state below (`head.weight`)."
    )


def test_write_report_ddpm_embeds_sample_grid(tmp_path: Path) -> None:
    run = make_run(tmp_path, "gen", task="ddpm", sample_grid="samples.png")
    text = write_report(run).read_text()
    assert "0.04271" in text
    assert "![sample grid](samples.png)" in text
    assert_png(run / "curves.png")


# ------------------------------------------------------------------ compare


def test_compare_two_runs_relative_columns(tmp_path: Path) -> None:
    first = make_run(tmp_path, "adamw", state=1_000_000, wall=10.0)
    second = make_run(tmp_path, "coap", state=500_000, wall=20.0)
    md, png = compare([first, second], tmp_path / "out")
    assert (md, png) == (tmp_path / "out" / "comparison.md", tmp_path / "out" / "comparison.png")
    assert_png(png)
    text = md.read_text()
    assert "![training curves](comparison.png)" in text
    table = "\n".join(ln for ln in text.splitlines() if ln.startswith("|"))
    header, row1, row2 = table_rows(table)
    first_cells, second_cells = dict(zip(header, row1)), dict(zip(header, row2))
    assert first_cells["state vs first"] == "1.00x"
    assert first_cells["metric vs first"] == "1.00x"
    assert second_cells["state vs first"] == "0.50x"
    assert second_cells["time/step vs first"] == "2.00x"  # same steps, twice the wall time
    assert second_cells["metric vs first"] == "1.00x"


def test_compare_defaults_to_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = [make_run(tmp_path, "a"), make_run(tmp_path, "b")]
    monkeypatch.chdir(tmp_path)
    md, png = compare(runs)
    assert md.resolve() == (tmp_path / "comparison.md").resolve()
    assert md.is_file() and png.is_file()


def test_compare_mixed_tasks_raises(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, "cls"), make_run(tmp_path, "gen", task="ddpm")]
    with pytest.raises(ValueError, match="classification") as info:
        compare(runs, tmp_path / "out")
    assert "ddpm" in str(info.value)
    assert not (tmp_path / "out" / "comparison.md").exists()


# ------------------------------------------------------------------ main


def test_main_missing_dir_returns_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing"
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coap-report: error:")
    assert str(missing) in err


def test_main_one_dir_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path, "cls")
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "98.33 %" in out
    assert (run / "report.md").is_file()
    assert_png(run / "curves.png")


def test_main_several_dirs_compares(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [str(make_run(tmp_path, "a")), str(make_run(tmp_path, "b", state=250_000))]
    out_dir = tmp_path / "cmp"
    assert main([*runs, "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "0.25x" in out
    assert str(out_dir / "comparison.md") in out and str(out_dir / "comparison.png") in out
    assert (out_dir / "comparison.md").is_file()


def test_main_mixed_tasks_returns_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [str(make_run(tmp_path, "cls")), str(make_run(tmp_path, "gen", task="ddpm"))]
    assert main([*runs, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coap-report: error:") and "ddpm" in err and "classification" in err
