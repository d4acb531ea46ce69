"""Tests of :mod:`coap_plugins.train.report` on fake run folders (no training involved)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from coap_plugins.train.config import TrainConfig
from coap_plugins.train.outputs import RunLog, peak_memory_bytes, peak_memory_kind, peak_memory_per_rank
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
MiB = 2**20
ROOT = Path(__file__).resolve().parents[1]


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
    peak_per_rank: list[int] | None = None,
    peak_kind: str | None = None,
) -> Path:
    """Write ``root/folder`` with summary.json and metrics.jsonl as coap-train would.

    Without ``peak_per_rank`` / ``peak_kind`` the summary is one written before those keys
    existed (``peak_memory_bytes`` alone, 200 MiB); with ``peak_per_rank`` the peak is its max.
    """
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
        "peak_memory_bytes": max(peak_per_rank) if peak_per_rank else 200 * MiB,
        "world_size": len(peak_per_rank) if peak_per_rank else 1,
        "precision": "fp32",
        "sample_grid": sample_grid,
        "config": "config.yaml",
    }
    if peak_per_rank is not None:
        summary["peak_memory_per_rank"] = peak_per_rank
    if peak_kind is not None:
        summary["peak_memory_kind"] = peak_kind
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


# ------------------------------------------------------------------ peak memory per rank

_GATHER_WORKER = """
import datetime, json, sys
import torch
import torch.distributed as dist
from coap_plugins.train.outputs import peak_memory_bytes, peak_memory_per_rank

rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
    timeout=datetime.timedelta(seconds=60),
)
block = torch.ones((32 + 224 * rank) * 2**20 // 4)  # filled, so resident: rank 1 holds 224 MiB more
cpu = torch.device("cpu")
before = peak_memory_bytes(cpu)
per_rank = peak_memory_per_rank(cpu)
after = peak_memory_bytes(cpu)
dist.barrier()
dist.destroy_process_group()
with open(out, "w") as f:
    json.dump({"before": before, "per_rank": per_rank, "after": after}, f)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _finish(tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    """``RunLog.finish`` on rank 0 of a run that took one AdamW step; returns summary.json."""
    cfg = TrainConfig(name="peaks", output_dir=str(tmp_path / "run"))
    log = RunLog(cfg)
    net = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 8)).sum().backward()
    opt.step()
    returned = log.finish(
        optimizer=opt,
        params=36,
        steps=1,
        steps_this_run=1,
        samples_per_step=2,
        world_size=len(kwargs.get("peak_per_rank") or [0]),
        device=torch.device("cpu"),
        **kwargs,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert returned == summary
    return summary


@pytest.mark.slow
def test_peak_memory_per_rank_gathers_every_rank_over_gloo(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [
        subprocess.Popen(
            # straight from this (possibly large) test process, as a DDP launcher starts its ranks: each
            # figure is the rank's own (VmHWM; ru_maxrss would carry the parent's peak across exec)
            [sys.executable, "-c", _GATHER_WORKER, str(r), str(port), str(outs[r])],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    results = [json.loads(out.read_text()) for out in outs]
    per_rank = results[0]["per_rank"]
    assert results[1]["per_rank"] == per_rank and len(per_rank) == 2  # every rank gets the same list
    for rank, result in enumerate(results):  # entry r is rank r's own figure
        assert result["before"] <= per_rank[rank] <= result["after"]
    assert per_rank[1] - per_rank[0] > 150 * MiB  # rank 1 allocated 224 MiB more

    summary = _finish(tmp_path, peak_per_rank=per_rank)
    assert summary["peak_memory_per_rank"] == per_rank
    assert summary["peak_memory_bytes"] == max(per_rank) == per_rank[1]
    assert summary["peak_memory_kind"] == "cpu_peak_rss"
    report = (tmp_path / "run" / "report.md").read_text()
    assert (
        f"the largest of 2 ranks (rank 0: {format_bytes(per_rank[0])}, rank 1: {format_bytes(per_rank[1])})" in report
    )


def test_peak_memory_per_rank_single_process_is_own_figure(tmp_path: Path, monkeypatch) -> None:
    # without a process group (an earlier in-process trainer may have left a 1-process one behind)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    cpu = torch.device("cpu")
    before = peak_memory_bytes(cpu)
    (own,) = peak_memory_per_rank(cpu)
    assert before <= own <= peak_memory_bytes(cpu)
    assert peak_memory_kind(cpu) == peak_memory_kind(None) == "cpu_peak_rss"
    assert peak_memory_kind(torch.device("cuda", 0)) == "cuda_max_allocated"

    summary = _finish(tmp_path)  # no peak_per_rank: this process's figure alone
    (figure,) = summary["peak_memory_per_rank"]
    assert own <= figure == summary["peak_memory_bytes"] <= peak_memory_bytes(cpu)
    assert summary["peak_memory_kind"] == "cpu_peak_rss"
    text = (tmp_path / "run" / "report.md").read_text()
    assert f"- peak memory: {format_bytes(figure)}; kind: CPU peak RSS (" in text
    assert "largest of" not in text


def test_finish_refuses_a_bad_per_rank_list(tmp_path: Path) -> None:
    for bad in ([], [1, -1], [1.5]):
        with pytest.raises(ValueError, match="peak_per_rank"):
            _finish(tmp_path, peak_per_rank=bad)


@pytest.mark.parametrize(
    ("backend", "device", "expected"),
    [
        ("gloo", torch.device("cuda", 1), torch.device("cpu")),
        ("cpu:gloo,cuda:nccl", torch.device("cuda", 1), torch.device("cpu")),
        ("nccl", torch.device("cuda", 1), torch.device("cuda", 1)),  # NCCL gathers CUDA tensors only
    ],
)
def test_the_gather_tensor_lives_where_the_backend_needs_it(
    monkeypatch: pytest.MonkeyPatch, backend: str, device: torch.device, expected: torch.device
) -> None:
    from coap_plugins.train import outputs

    monkeypatch.setattr(torch.distributed, "get_backend", lambda *args, **kwargs: backend)
    assert outputs._gather_device(device) == expected


def test_report_shows_peak_per_rank_and_kind_next_to_the_state(tmp_path: Path) -> None:
    run = make_run(tmp_path, "ddp", peak_per_rank=[150 * MiB, 200 * MiB], peak_kind="cuda_max_allocated")
    lines = write_report(run).read_text().splitlines()
    state = lines.index("- optimizer state: 976.56 KiB (40.0 % of the full-rank equivalent, 2.38 MiB)")
    assert lines[state + 1] == (
        "- peak memory: 200.00 MiB, the largest of 2 ranks (rank 0: 150.00 MiB, rank 1: 200.00 MiB); "
        "kind: CUDA max allocated (`torch.cuda.max_memory_allocated`: the most tensor memory the CUDA "
        "allocator handed out)"
    )
    table = "\n".join(ln for ln in lines if ln.startswith("|"))
    header, row = table_rows(table)
    cells = dict(zip(header, row))
    assert cells["peak memory (MiB)"] == "200.0 (ranks 150.0 / 200.0)"
    assert cells["peak kind"] == "CUDA max allocated"


def test_comparison_shows_per_rank_figures_and_kinds(tmp_path: Path) -> None:
    runs = [
        make_run(tmp_path, "one", peak_per_rank=[100 * MiB], peak_kind="cpu_peak_rss"),
        make_run(tmp_path, "two", peak_per_rank=[150 * MiB, 200 * MiB], peak_kind="cuda_max_allocated"),
        make_run(tmp_path, "eight", peak_per_rank=[(100 + i) * MiB for i in range(8)], peak_kind="cuda_max_allocated"),
        make_run(tmp_path, "old"),  # written before the per-rank list and the kind existed
    ]
    md, _ = compare(runs, tmp_path / "out")
    text = md.read_text()
    table = "\n".join(ln for ln in text.splitlines() if ln.startswith("|"))
    header, *rows = table_rows(table)
    cells = {r[0]: dict(zip(header, r)) for r in rows}
    assert cells["one"]["peak memory (MiB)"] == "100.0"
    assert cells["two"]["peak memory (MiB)"] == "200.0 (ranks 150.0 / 200.0)"
    assert cells["eight"]["peak memory (MiB)"] == "107.0 (8 ranks, 100.0-107.0)"
    assert cells["old"]["peak memory (MiB)"] == "200.0"
    kinds = [cells[n]["peak kind"] for n in ("one", "two", "eight", "old")]
    assert kinds == ["CPU peak RSS", "CUDA max allocated", "CUDA max allocated", "n/a"]
    assert "Peak memory is the largest rank's" in text
    assert "CPU peak RSS is peak resident set (VmHWM on Linux)" in text
    assert "CUDA max allocated is `torch.cuda.max_memory_allocated`" in text
    assert "Runs whose summary does not record the kind show n/a." in text


def test_old_summaries_without_peak_keys_still_render(tmp_path: Path) -> None:
    old = make_run(tmp_path, "old")  # peak_memory_bytes alone
    text = write_report(old).read_text()
    assert "- peak memory: 200.00 MiB; kind: n/a" in text
    header, row = table_rows(summary_table([load_run(old)]))
    assert dict(zip(header, row))["peak memory (MiB)"] == "200.0" and "peak kind" not in header

    older = make_run(tmp_path, "older")  # not even peak_memory_bytes nor the state's full-rank figure
    summary = json.loads((older / "summary.json").read_text())
    del summary["peak_memory_bytes"], summary["full_rank_state_bytes"]
    summary["peak_memory_per_rank"] = "garbage"  # malformed values count as missing
    (older / "summary.json").write_text(json.dumps(summary))
    lines = write_report(older).read_text().splitlines()
    assert "- optimizer state: 976.56 KiB" in lines
    assert "- peak memory: n/a; kind: n/a" in lines
    header, row = table_rows(summary_table([load_run(older)]))
    assert dict(zip(header, row))["peak memory (MiB)"] == "n/a"
    md, _ = compare([old, older], tmp_path / "out")
    assert "| n/a |" in md.read_text()
