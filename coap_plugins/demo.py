"""``make demo``: ResNet-18 on the digits with AdamW and with COAP through Composer, side by side.

Runs ``python -m coap_plugins.demo`` (``--help`` for options):

1. writes the digits webdataset shards (once, into the data cache);
2. trains the packaged recipe ``<trainer>/resnet18_digits_adamw`` (the AdamW baseline) and
   ``<trainer>/resnet18_digits`` (the same recipe with CoapAdamW), same seed, same batches;
3. prints the side-by-side table (accuracy, eval loss, optimizer-state bytes, throughput, wall
   time) and writes ``comparison.md`` and ``comparison.png`` next to the two run folders.

Nothing is downloaded.  The recipes are package data (:mod:`coap_plugins.recipes`), so the demo
runs from an installed wheel (``pip install 'coap-plugins[all]'``) as from a source checkout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .recipes import RECIPES_DIR, recipe_path

__all__ = ["RECIPES", "main", "parse_args", "run_demo"]

RECIPES = RECIPES_DIR  # the packaged recipes' folder (``<trainer>/<name>.yaml``)
_RUNS = (("adamw", "resnet18_digits_adamw"), ("coap", "resnet18_digits"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of the demo (``argv`` without the program name; None reads sys.argv)."""
    parser = argparse.ArgumentParser(
        prog="python -m coap_plugins.demo",
        description="Train ResNet-18 on scikit-learn's digits with AdamW and with CoapAdamW (coap-train recipes).",
    )
    parser.add_argument(
        "--out", default="runs/demo", help="folder of the two runs and the comparison (default runs/demo)"
    )
    parser.add_argument(
        "--trainer",
        choices=("composer", "lightning"),
        default="composer",
        help="which recipes to run (default composer)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice; 1 is steadier on a busy machine)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="dotted.key=value", help="recipe overrides for both runs, e.g. max_duration=2ep"
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"argument --threads: invalid value {args.threads} (must be >= 1)")
    return args


def run_demo(args: argparse.Namespace) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Write the shards, train both recipes, compare; returns (comparison.md, .png, summaries).

    Each run is its own ``coap-train`` process, so that its peak memory is its own.
    """
    from .train.config import load_config
    from .train.loader import prepare_shards
    from .train.report import compare

    out = Path(args.out)
    configs, commands = [], []
    for label, recipe in _RUNS:
        path = recipe_path(f"{args.trainer}/{recipe}")
        overrides = [f"output_dir={out / label}", "progress_bar=false", "checkpoint.interval=null", *args.overrides]
        if args.threads is not None:
            overrides.append(f"threads={args.threads}")
        configs.append(load_config(path, overrides))  # validated here, before anything runs
        commands.append([sys.executable, "-m", "coap_plugins.train.cli", str(path), *overrides])
    shards = prepare_shards(configs[0].data)
    print(f"digits shards: {shards}")
    summaries = []
    for cfg, command in zip(configs, commands):
        print(f"training {cfg.name} ({cfg.trainer}, {cfg.max_duration}) ...", flush=True)
        if subprocess.call(command) != 0:
            raise RuntimeError(f"coap-train failed for {cfg.name}: {' '.join(command)}")
        summaries.append(json.loads((Path(cfg.output_dir or ".") / "summary.json").read_text()))
    md, png = compare([cfg.output_dir for cfg in configs], out)
    return md, png, summaries


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; prints the comparison table and the plot's path."""
    args = parse_args(argv)
    try:
        md, png, _ = run_demo(args)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    table = [line for line in md.read_text().splitlines() if line.startswith("|") or line.startswith("Best")]
    print("\n".join(table))
    print(f"\ncomparison: {md}\nplot: {png}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
