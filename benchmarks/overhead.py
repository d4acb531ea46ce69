"""End-to-end training overhead of COAP against AdamW on the shipped coap-train digits recipe.

Runs ``python -m coap_plugins.train.cli`` on ``composer/resnet18_digits_adamw`` (AdamW)
and ``composer/resnet18_digits`` (the same recipe with CoapAdamW) in turns, A, B, A,
B, ... (``--repeats`` pairs, default 2), so load from other processes falls on both alike.  Each
run trains ``--batches`` batches (default 100) with the overrides ``max_duration=<N>ba
eval_interval=<N>ba checkpoint.interval=null progress_bar=false threads=<T>
output_dir=<tmp>/<run>`` and writes ``summary.json``; from it this script reads
``samples_per_second`` (training throughput: the run's clock less its evaluation time, so
COAP's first step, which sets its projectors up, is in it) and ``wall_seconds`` (evaluation
included; process start-up and imports not).  Steps per second = samples per second / the
recipe's ``data.batch_size``.  The table gives, per recipe, the median over repeats of steps/s
and of wall seconds, and the time per step relative to AdamW (ratio of the median steps/s).
The digits shards come from the runner's data cache (``COAP_DATA_CACHE`` is left as it is; the
first run writes them).  ``--quick`` (a smoke test): 3 batches, 1 repeat.

``--threads`` (default 1) sets torch's threads in each run: on a 2-core machine shared with other
work, 2 threads made COAP's first step (the SVDs and QRs that set its projectors up) about 10x
slower than 1 thread (3 batches: 43 s against 4 s of training), so the default is 1; ``--threads 0``
leaves torch's default.

    python benchmarks/overhead.py [--quick] [--batches N] [--repeats N] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from optimizer_step import cpu_model  # noqa: E402  (benchmarks/, run as scripts)

ROOT = Path(__file__).resolve().parent.parent
# packaged recipes by name (coap_plugins.recipes), as `coap-train NAME` takes them
RECIPES = {"AdamW": "composer/resnet18_digits_adamw", "CoapAdamW": "composer/resnet18_digits"}
QUICK_BATCHES, QUICK_REPEATS = 3, 1


def batch_size(recipe: str) -> int:
    """The recipe's training batch size (data.batch_size)."""
    from coap_plugins.recipes import recipe_path
    from coap_plugins.train.config import load_config

    return load_config(recipe_path(recipe)).data.batch_size


def train(recipe: str, batches: int, threads: int, out_dir: Path) -> dict:
    """Run the recipe for ``batches`` batches in a fresh process; returns its summary.json."""
    cmd = [
        sys.executable,
        "-m",
        "coap_plugins.train.cli",
        recipe,
        f"max_duration={batches}ba",
        f"eval_interval={batches}ba",
        "checkpoint.interval=null",
        "progress_bar=false",
        f"output_dir={out_dir}",
    ]
    if threads:
        cmd.append(f"threads={threads}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    summary = out_dir / "summary.json"
    if proc.returncode != 0 or not summary.exists():
        raise RuntimeError(f"coap-train failed (exit {proc.returncode}) on {recipe!r}:\n{proc.stderr[-3000:]}")
    return json.loads(summary.read_text())


def run_all(batches: int, repeats: int, threads: int) -> dict[str, list[dict]]:
    """Summaries per recipe name, the recipes taking turns."""
    runs: dict[str, list[dict]] = {name: [] for name in RECIPES}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for name, recipe in RECIPES.items():
                summary = train(recipe, batches, threads, Path(tmp) / f"{name}-{rep}")
                print(
                    f"{name} repeat {rep + 1}: {summary['samples_per_second']:.1f} samples/s, "
                    f"{summary['wall_seconds']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
                runs[name].append(summary)
    return runs


def table(runs: dict[str, list[dict]]) -> list[str]:
    head = ["recipe", "optimizer", "steps/s (median)", "time per step / AdamW", "wall s (median)", "state MiB", "runs"]
    rate = {
        name: statistics.median(s["samples_per_second"] / batch_size(RECIPES[name]) for s in rs)
        for name, rs in runs.items()
    }
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rs in runs.items():
        cells = [
            f"`{RECIPES[name]}`",
            rs[0]["optimizer"],
            f"{rate[name]:.3f}",
            f"{rate['AdamW'] / rate[name]:.3f}",
            f"{statistics.median(s['wall_seconds'] for s in rs):.1f}",
            f"{rs[0]['state_bytes'] / 2**20:.2f}",
            str(len(rs)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"Invalid value: {text!r} (must be an integer >= {low})")
        return value

    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke test: {QUICK_BATCHES} batches, {QUICK_REPEATS} repeat"
    )
    parser.add_argument("--batches", type=at_least(1), default=None, help="batches per run (default 100)")
    parser.add_argument("--repeats", type=at_least(1), default=None, help="A/B pairs (default 2)")
    parser.add_argument("--threads", type=at_least(0), default=1, help="torch threads per run (0: torch's default)")
    parser.add_argument("--out", default="docs/results", help="folder for overhead.md")
    args = parser.parse_args(argv)
    batches = args.batches or (QUICK_BATCHES if args.quick else 100)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else 2)
    load = os.getloadavg()[0]
    runs = run_all(batches, repeats, args.threads)
    lines = [
        "# End-to-end overhead: coap-train ResNet-18 on digits",
        "",
        f"Command: `{shlex.join([sys.executable] + sys.argv)}`",
        "",
        f"Machine: {cpu_model()} ({os.cpu_count()} cores); torch {torch.__version__}; "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; 1-minute load average at start {load:.2f}",
        "",
        f"{batches} batches per run, {repeats} repeat(s), recipes in turns (AdamW, CoapAdamW, ...), "
        f"{args.threads or 'default'} torch thread(s) per run.",
        "",
        *table(runs),
        "",
        "steps/s = samples_per_second from the run's summary.json (training time only, evaluation excluded) / "
        "data.batch_size; time per step / AdamW = AdamW's median steps/s / the recipe's. wall s = the run's "
        "wall_seconds (evaluation included, process start-up not). state = optimizer-state bytes from the summary.",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.md").write_text(text)


if __name__ == "__main__":
    main()
