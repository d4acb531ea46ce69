"""The benchmark scripts keep working (timings themselves are never asserted: shared machines)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python benchmarks/<name> args...`` from the repository root, output captured."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_optimizer_step_quick_prints_every_row_and_target(tmp_path):
    out = tmp_path / "bench.md"
    proc = run_script("optimizer_step.py", "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text == proc.stdout
    timing = text.split("Dispatched aten ops")[0]  # the first table; the op counts follow
    rows = [line for line in timing.splitlines() if line.startswith("| ") and not line.startswith("| shape")]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == [
        "1024x1024",
        "4096x1024",
        "1024x4096",
        "768x3072",
        "128x64x3x3",
        "256x256x3x3",
        "512x512x3x3",
        "256x1024x1x1",
    ]
    # state ratios are exact byte counts: 3 MiB of 8 for 1024x1024 at rank 256 (2*1024*256 + 1024*256 floats)
    assert "3.00 / 8.00 (0.375)" in rows[0]
    assert text.count("-> PASS") + text.count("-> MISS") + text.count("-> SKIPPED") == 11
    # the ordinary step's ops and syncs: one batched Tucker-2 layer in a few dozen ops, no sync
    counts = text.split("Dispatched aten ops")[1]
    row = next(line for line in counts.splitlines() if line.startswith("| 512x512x3x3 |"))
    ops, syncs = (int(x) for x in row.split("|")[3].split("/"))
    assert ops <= 50 and syncs == 0, row


def test_gpu_step_skips_without_cuda_and_runs_dry_on_the_cpu(tmp_path):
    if not torch.cuda.is_available():
        proc = run_script("gpu_step.py", timeout=120)
        assert proc.returncode == 0 and "CUDA is not available: nothing measured" in proc.stdout
    bad = run_script("gpu_step.py", "--models", "vgg", timeout=120)
    assert bad.returncode == 2 and "invalid models: vgg" in bad.stderr
    out = tmp_path / "gpu.md"
    proc = run_script("gpu_step.py", "--dry-run", "--models", "unet", "--reps", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "CPU DRY RUN" in text
    methods = [line.split("|")[2].strip() for line in text.splitlines() if line.startswith("| unet")]
    assert methods == ["AdamW fused", "bnb AdamW8bit", "CoapAdamW", "CoapAdamW8bit", "CoapAdafactor"]
    assert text.count("-> ") == 2


def test_step_cpu_time_prints_its_row():
    proc = run_script("step_cpu_time.py", "now", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("now ms per ordinary step: 256x1024x1x1=")
    assert float(line.rsplit("=", 1)[1]) > 0


@pytest.mark.slow
def test_fsdp2_step_quick_prints_its_table(tmp_path):
    out = tmp_path / "fsdp2.md"
    proc = run_script("fsdp2_step.py", "--quick", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| mlp")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert cells[1] == "CoapAdamW"
    sharded, replicated = (float(x) for x in cells[3].split(" + "))
    assert sharded > 0 and replicated > 0 and 0 < float(cells[4]) < 1  # a rank holds less than the whole
    ordinary, correlation, svd = (int(x) for x in cells[8].split(" / "))
    assert 0 < ordinary < correlation and svd > 0  # the wide layers' projections are reduced every step


@pytest.mark.slow
def test_backward_step_quick_prints_its_table(tmp_path):
    """The smoke run's three rows; the accumulation rows' weights: bit-equal with the default
    residual, one step's update within 1e-5 with projected accumulation."""
    out = tmp_path / "backward.md"
    proc = run_script("backward_step.py", "--quick", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| MLP")]
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows]
    assert [c[1] for c in cells] == ["1, scaled", "4, scaled", "4, none"]
    assert cells[0][-1] == cells[1][-1] == "bit-equal"
    assert cells[2][-1].startswith("step 2: update within") and float(cells[2][-1].split()[4]) < 1e-5
    for c in cells:
        assert float(c[2]) > 0 and float(c[3]) > 0 and float(c[5]) > 0
    assert float(cells[0][4]) > 0  # the peak falls without accumulation even on the small model
