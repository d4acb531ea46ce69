"""``coap-train CONFIG.yaml [dotted.key=value ...]``: train a recipe with Composer or Lightning.

``CONFIG`` is a recipe file or the name of a packaged recipe (``composer/resnet18_digits``; see
:mod:`coap_plugins.recipes`), looked up when no such file exists.  The recipe is validated
(:func:`~coap_plugins.train.config.load_config`) before anything heavy is imported.
``devices: N`` (N > 1) runs DDP through each framework's own launcher: Composer's ``composer -n N``
(this command re-launches itself under it) or Lightning's DDP strategy (which starts the other
processes itself); gloo on CPU, NCCL on GPUs.  ``num_nodes: M`` trains on M machines: run the same
command on each with its ``rendezvous.node_rank`` (and node 0's ``rendezvous.master_addr`` /
``master_port``, or the launchers' ``NODE_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``); Composer's
launcher gets ``--world_size --node_rank --master_addr --master_port``, Lightning's trainer
``num_nodes`` and the same three in its environment.  ``--dry-run`` prints the resolved recipe, the
routing table and the predicted optimizer-state bytes, and exits without training.

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


DEFAULT_MASTER_PORT = 29500


def rendezvous(cfg: TrainConfig) -> tuple[int, str, int | None]:
    """``(node_rank, master_addr, master_port)`` of this node: the recipe's ``rendezvous``, else the
    launchers' ``NODE_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``, else 0, ``127.0.0.1`` (node 0
    only: the others must be told where it is) and (for several nodes, which must agree on it)
    29500; a single node leaves the port to the launcher.

    Raises:
        ConfigError: the node rank (from the environment) is not below ``num_nodes``,
            ``MASTER_PORT`` is not a port number, or a node other than 0 has no master address.
    """
    r = cfg.rendezvous
    node_rank = r.node_rank
    if node_rank is None:
        raw = os.environ.get("NODE_RANK", "0")
        if not raw.isdigit() or not int(raw) < cfg.num_nodes:
            raise ConfigError(f"Invalid NODE_RANK={raw!r} in the environment (must be in [0, {cfg.num_nodes - 1}])")
        node_rank = int(raw)
    addr = r.master_addr or os.environ.get("MASTER_ADDR")
    if addr is None and node_rank > 0:
        # 127.0.0.1 would have this node wait on itself until the process group times out
        raise ConfigError(
            f"Missing rendezvous.master_addr for node_rank {node_rank} (node 0's address; or set MASTER_ADDR)"
        )
    addr = addr or "127.0.0.1"
    port = r.master_port
    if port is None and os.environ.get("MASTER_PORT"):
        raw = os.environ["MASTER_PORT"]
        if not raw.isdigit() or not 1 <= int(raw) <= 65535:
            raise ConfigError(f"Invalid MASTER_PORT={raw!r} in the environment (must be in [1, 65535])")
        port = int(raw)
    if port is None and cfg.num_nodes > 1:
        port = DEFAULT_MASTER_PORT
    return node_rank, addr, port


def _relaunch_under_composer(cfg: TrainConfig, argv: Sequence[str]) -> int:
    """Run this command again under ``composer -n devices`` (Composer's DDP launcher), with the
    multi-node settings of this node."""
    node_rank, addr, port = rendezvous(cfg)
    launcher = [sys.executable, "-m", "composer.cli.launcher", "-n", str(cfg.devices)]
    launcher += ["--world_size", str(cfg.devices * cfg.num_nodes), "--node_rank", str(node_rank)]
    launcher += ["--master_addr", addr] + (["--master_port", str(port)] if port is not None else [])
    launcher += ["-m", "coap_plugins.train.cli", *argv]
    return subprocess.call(launcher, env=dict(os.environ))


def _lightning_rendezvous(cfg: TrainConfig) -> None:
    """Lightning's cluster environment reads the node's place from these variables."""
    if cfg.devices * cfg.num_nodes == 1:
        return
    node_rank, addr, port = rendezvous(cfg)
    os.environ["NODE_RANK"], os.environ["MASTER_ADDR"] = str(node_rank), addr
    if port is not None:
        os.environ["MASTER_PORT"] = str(port)


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
    dry = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip().split("\n\n")[0])
        print(
            "\nusage: coap-train CONFIG.yaml [dotted.key=value ...] [--dry-run]\n\n"
            "Example: coap-train composer/resnet18_digits max_duration=50ba"
        )
        return 0 if args else 2
    unknown = [a for a in args[1:] if a.startswith("--")]
    if unknown:
        print(f"coap-train: error: unknown option {unknown[0]!r} (options: --dry-run, --help)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(resolve_recipe(args[0]), args[1:])
        world = cfg.devices * cfg.num_nodes
        if world > 1:
            rendezvous(cfg)  # refuse a bad NODE_RANK / MASTER_PORT before anything starts
    except (ConfigError, FileNotFoundError) as exc:
        print(f"coap-train: error: {exc}", file=sys.stderr)
        return 2
    if dry:
        from .dryrun import dry_run

        try:
            print(dry_run(cfg))
        except (OSError, ValueError) as exc:
            print(f"coap-train: error: {exc}", file=sys.stderr)
            return 1
        return 0
    # under Composer's launcher WORLD_SIZE is set to the process count; anything else is ours to start
    if cfg.trainer == "composer" and world > 1 and int(os.environ.get("WORLD_SIZE", "1")) != world:
        return _relaunch_under_composer(cfg, args)
    if cfg.trainer == "lightning":
        _lightning_rendezvous(cfg)
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
