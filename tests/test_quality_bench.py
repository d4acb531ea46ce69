"""benchmarks/quality.py and benchmarks/overhead.py run end to end in their --quick mode.

Only files, table shapes, finite metrics and byte counts are asserted, never timings (the
machine is shared).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["AdamW", "Adafactor", "CoapAdamW", "CoapAdafactor", "CoapAdamW8bit", "GaLoreConvAdamW", "AdamW8bit"]
PNG = b"\x89PNG\r\n\x1a\n"


def run_script(name: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), "--quick", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )


def table_methods(text: str, heading: str) -> list[str]:
    """First-column names of the table under ``## heading`` (header and rule left out)."""
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    return [row.split("|")[1].strip() for row in rows]


@pytest.mark.slow
def test_quality_quick_writes_tables_json_and_plots(tmp_path):
    proc = run_script("quality.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "quality.md").read_text()
    assert text == proc.stdout
    for task in ("resnet", "unet"):
        assert table_methods(text, task) == METHODS
        assert (tmp_path / f"quality_{task}.png").read_bytes()[:8] == PNG
    assert (tmp_path / "memory.png").read_bytes()[:8] == PNG
    assert (tmp_path / "frontier.png").read_bytes()[:8] == PNG

    data = json.loads((tmp_path / "quality.json").read_text())
    results = data["results"]
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(results)
    assert sorted((r["task"], r["method"], r["seed"]) for r in results) == sorted(
        (task, method, 0) for task in ("resnet", "unet") for method in METHODS
    )
    for r in results:
        assert r["final"] and all(math.isfinite(v) for v in r["final"].values()), r
        assert r["state_bytes"] > 0 and r["peak_rss_bytes"] > 0
    by = {(r["task"], r["method"]): r for r in results}
    adamw, coap = by["resnet", "AdamW"], by["resnet", "CoapAdamW"]
    # torch AdamW: two fp32 moments per element, plus a 4-byte step tensor per parameter tensor
    assert 0 <= adamw["state_bytes"] - adamw["adamw_bytes"] <= 4 * 200
    assert coap["state_bytes"] < 0.4 * adamw["state_bytes"]
    # GaLore with its convs flattened projects the UNet's convs: far below AdamW's state
    assert by["unet", "GaLoreConvAdamW"]["state_bytes"] < 0.4 * by["unet", "AdamW"]["state_bytes"]
    frontier = data["frontier"]["unet"]
    assert [pt["label"] for pt in frontier] == METHODS
    assert all(pt["seeds"] == 1 and pt["std"] == 0.0 for pt in frontier)

    # a later invocation includes these runs: only the new method variant runs
    again = tmp_path / "again"
    proc = run_script(
        "quality.py",
        again,
        "--tasks",
        "unet",
        "--methods",
        "AdamW,CoapAdamW,CoapAdamW[basis_alignment=sign,rank_ratio=8]",
        "--include",
        str(tmp_path / "runs.jsonl"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("] unet ") == 1 and "CoapAdamW[basis_alignment=sign,rank_ratio=8]" in proc.stderr
    text = (again / "quality.md").read_text()
    labels = table_methods(text, "unet")
    assert labels[:3] == ["AdamW", "CoapAdamW", "CoapAdamW[basis_alignment=sign,rank_ratio=8]"]
    assert set(labels) == set(METHODS) | {"CoapAdamW[basis_alignment=sign,rank_ratio=8]"}
    rows = json.loads((again / "quality.json").read_text())["results"]
    ratio8 = next(r for r in rows if r["label"].endswith("rank_ratio=8]"))
    assert ratio8["state_bytes"] < by["unet", "CoapAdamW"]["state_bytes"]

    # the runs of an earlier version, labelled by a tag, in tables of their own: nothing is run
    report = tmp_path / "report"
    proc = run_script(
        "quality.py",
        report,
        "--report-only",
        "--tasks",
        "unet",
        "--methods",
        "AdamW,CoapAdamW (old)",
        "--include",
        f"{tmp_path / 'runs.jsonl'}#old",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "] unet " not in proc.stderr and not (report / "runs.jsonl").exists()
    labels = table_methods((report / "quality.md").read_text(), "unet")
    # --methods picks the rows; the pairing baselines stay
    assert labels[:2] == ["AdamW", "CoapAdamW (old)"] and set(labels) <= {"AdamW", "CoapAdamW (old)", "Adafactor"}
    proc = run_script(
        "quality.py", report, "--report-only", "--tasks", "unet", "--include", f"{tmp_path / 'runs.jsonl'}#old"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = table_methods((report / "quality.md").read_text(), "unet")
    assert "CoapAdamW8bit (old)" in labels and "AdamW8bit" in labels  # without --methods: every row


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "AdamW,Lion"], "Invalid method: 'Lion'"),
        (["--methods", "AdamW[restore_state=true]"], "options are Coap"),
        (["--methods", "CoapAdamW[restore_state]"], "expected key=value"),
        (["--methods", "CoapAdamW[basis_alignmnt=sign]"], "unexpected keyword argument 'basis_alignmnt'"),
        (["--methods", "CoapAdamW8bit[basis_alignment=flip]"], "Invalid basis_alignment: 'flip'"),
        (["--lr-adam", "-1"], "Invalid value: '-1'"),
        (["--include", "/nonexistent/runs.jsonl"], "no such file"),
        (["--report-only"], "--report-only needs at least one --include"),
        (["--methods", "CoapAdamW (old)"], "is the label of included runs"),
    ],
)
def test_quality_bad_arguments_are_refused_before_any_run(tmp_path, args, message):
    proc = run_script("quality.py", tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "runs.jsonl").exists()


@pytest.mark.slow
def test_overhead_quick_prints_both_recipes(tmp_path):
    proc = run_script("overhead.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "overhead.md").read_text()
    assert text == proc.stdout
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "`composer/resnet18_digits_adamw`",
        "`composer/resnet18_digits`",
    ]
