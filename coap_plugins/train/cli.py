"""``coap-train CONFIG.yaml [dotted.key=value ...]``: train a recipe with Composer or Lightning.

``CONFIG`` is a recipe file or the name of a packaged recipe (``composer/resnet18_digits``; see
:mod:`coap_plugins.recipes`), looked up when no such file exists.  The recipe is validated
(:func:`~coap_plugins.train.config.load_config`) before anything heavy is imported.
``devices: N`` (N > 1) runs DDP through each framework's own launcher: Composer's ``composer -n N``
(this command re-launches itself under it) or Lightning's DDP strategy (which starts the other
processes itself); gloo on CPU, NCCL on GPUs.

Exit status: 0 trained; 2 the recipe is invalid; 1 the run failed: unreadable shards (checked
before a model is built), no readable checkpoint to resume from, or a training loss that is not
finite (``stop_on_nonfinite``; the run folder still gets its report).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch

from ..recipes import resolve_recipe
from .common import TrainingDiverged
from .config import ConfigError, TrainConfig, load_config

__all__ = ["main", "run"]


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(cfg: TrainConfig, *, stop_after_batches: int | None = None) -> dict[str, Any] | None:
    """Train the recipe ``cfg`` in this process; returns the summary (None on ranks other than 0).

    Args:
        cfg: a validated recipe (:func:`~coap_plugins.train.config.load_config`).
        stop_after_batches: stop before batch N + 1 as if the process were killed (raises
            :class:`~coap_plugins.train.common.RunInterrupted`), leaving the checkpoints written
            so far: for testing resumption.
    """
    from .loader import prepare_data
    from .tasks import TaskModule, build_model

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    # Lightning accumulates over loader batches: its loader yields each step's batch in micro-batches;
    # Composer splits the whole batch itself (device_train_microbatch_size)
    data = prepare_data(cfg.data, cfg.seed, micro_batches=cfg.accumulate if cfg.trainer == "lightning" else 1)
    _seed_everything(cfg.seed)  # the initial weights depend on the seed alone
    net = build_model(cfg, data.in_chans, data.num_classes)
    task = TaskModule(cfg, net, data.meta)
    if cfg.trainer == "composer":
        from .composer_run import run_composer

        return run_composer(cfg, data, task, stop_after_batches=stop_after_batches)
    from .lightning_run import run_lightning

    return run_lightning(cfg, data, task, stop_after_batches=stop_after_batches)


def _relaunch_under_composer(cfg: TrainConfig, argv: Sequence[str]) -> int:
    """Run this command again under ``composer -n devices`` (Composer's DDP launcher)."""
    launcher = [
        sys.executable,
        "-m",
        "composer.cli.launcher",
        "-n",
        str(cfg.devices),
        "-m",
        "coap_plugins.train.cli",
        *argv,
    ]
    env = dict(os.environ)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    return subprocess.call(launcher, env=env)


def _print_summary(summary: dict[str, Any], output_dir: str) -> None:
    final = ", ".join(f"{k} {v:.4g}" for k, v in summary["final"].items())
    ratio = summary["state_bytes"] / max(1, summary["full_rank_state_bytes"])
    waiting = len(summary.get("waiting_layers") or [])
    uncounted = f", not counting {waiting} projected layer(s) that never received a usable gradient" if waiting else ""
    diverged = summary.get("diverged")
    if diverged:
        final = f"diverged (training loss {diverged['loss']} at step {diverged['step']}); {final}"
    print(
        f"{summary['name']}: {final}; optimizer state {summary['state_bytes']:,} bytes "
        f"({100 * ratio:.1f} % of full rank{uncounted}); {summary['samples_per_second']:.1f} samples/s; "
        f"{summary['wall_seconds']:.1f} s\nreport: {os.path.join(output_dir, 'report.md')}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The ``coap-train`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip().split("\n\n")[0])
        print(
            "\nusage: coap-train CONFIG.yaml [dotted.key=value ...]\n\n"
            "Example: coap-train composer/resnet18_digits max_duration=50ba"
        )
        return 0 if args else 2
    try:
        cfg = load_config(resolve_recipe(args[0]), args[1:])
    except (ConfigError, FileNotFoundError) as exc:
        print(f"coap-train: error: {exc}", file=sys.stderr)
        return 2
    # under Composer's launcher WORLD_SIZE is set to the process count; anything else is ours to start
    if cfg.trainer == "composer" and cfg.devices > 1 and int(os.environ.get("WORLD_SIZE", "1")) != cfg.devices:
        return _relaunch_under_composer(cfg, args)
    try:
        summary = run(cfg)
    except TrainingDiverged as exc:
        # every rank stops together: say it once
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
            report = os.path.join(cfg.output_dir or ".", "report.md")
            print(f"coap-train: error: {exc}; report: {report}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"coap-train: error: {exc}", file=sys.stderr)
        return 1
    if summary is not None:
        _print_summary(summary, cfg.output_dir or ".")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
