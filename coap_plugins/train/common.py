"""Pieces both ``coap-train`` runners build the same way: optimizer, LR shape, sizes, settings."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._extras import require
from .config import CoapConfig, TrainConfig, duration_parts
from .outputs import RunLog, peak_memory_per_rank
from .tasks import TaskModule, build_param_groups

__all__ = [
    "LrShape",
    "RunInterrupted",
    "TrainingDiverged",
    "build_optimizer",
    "coap_kwargs",
    "finish_run",
    "logger_settings",
    "require",
    "total_steps",
]


class RunInterrupted(RuntimeError):
    """Raised by ``stop_after_batches``: the run stops as if killed, its checkpoints kept."""


class TrainingDiverged(RuntimeError):
    """The training loss of step ``step`` is NaN or infinite and ``stop_on_nonfinite`` is set.

    Raised from each framework's batch-end callback (before that step's checkpoint is written);
    the runners write the run folder, saying the run diverged, and raise it again.
    """

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        where = (
            f"the training loss is {loss}"
            if not math.isfinite(loss)
            else "the training loss of another rank is not finite"
        )
        super().__init__(
            f"Training diverged at step {step}: {where} (stopped by stop_on_nonfinite=true; lower optimizer.lr, "
            "check the data for NaN or infinite values, or set stop_on_nonfinite=false to train on)"
        )


class LrShape:
    """The LR multiplier of step ``s``: linear warm-up, then constant, cosine or linear decay.

    A callable object (not a closure) so that ``LambdaLR.state_dict`` saves its settings.
    """

    def __init__(self, name: str, total: int, warmup: int, min_ratio: float) -> None:
        self.name, self.total, self.warmup, self.min_ratio = name, total, warmup, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.name == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.name == "cosine" else 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the whole run (``max_duration`` in batches or epochs)."""
    n, unit = duration_parts("max_duration", cfg.max_duration)
    return n if unit == "ba" else n * batches_per_epoch


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer the recipe names (COAP's adapters replace it when ``coap`` is set)."""
    o = cfg.optimizer
    groups = build_param_groups(model, o.weight_decay, o.no_decay_norm_bias)
    b1, b2 = o.betas
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=(b1, b2), eps=o.eps)
    if o.name == "adam":
        return torch.optim.Adam(groups, lr=o.lr, betas=(b1, b2), eps=o.eps)
    if o.name == "adafactor":
        # timm's Adafactor: a first moment when betas[0] > 0 (torch's has none), decoupled decay
        from timm.optim import Adafactor

        return Adafactor(groups, lr=o.lr, betas=(b1, b2) if b1 > 0 else None)
    return torch.optim.SGD(groups, lr=o.lr, momentum=b1)


def lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = duration_parts("schedule.warmup", cfg.schedule.warmup)[0] if cfg.schedule.warmup not in ("0", "0ba") else 0
    shape = LrShape(cfg.schedule.name, total, warmup, cfg.schedule.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shape)


def coap_kwargs(coap: CoapConfig) -> dict[str, Any]:
    """Keyword arguments of ``CoapAlgorithm`` / ``CoapCallback`` from the ``coap`` section."""
    kwargs = asdict(coap)
    kwargs["exclude"] = tuple(kwargs["exclude"])
    kwargs.pop("rank_ratio_cnn")  # an alias, resolved into rank_ratio_conv by load_config
    return kwargs


def logger_settings(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The ``loggers`` the recipe turns on, each with its settings resolved (folders inside
    ``output_dir``, MLflow's local file store and W&B's offline mode unless the environment
    says otherwise), in one order for both runners."""
    import os

    root = Path(cfg.output_dir or ".")
    out: dict[str, dict[str, Any]] = {}
    given = cfg.loggers
    if given.tensorboard is not None:
        out["tensorboard"] = {"folder": str(root / given.tensorboard.folder)}
    if given.csv is not None:
        out["csv"] = {"folder": str(root / given.csv.folder)}
    if given.mlflow is not None:
        uri = given.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            uri = (root / "mlruns").resolve().as_uri()
            # MLflow 3 refuses its file store unless asked for it; a local store is the default here
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        out["mlflow"] = {"experiment": given.mlflow.experiment or cfg.name, "tracking_uri": uri}
    if given.wandb is not None:
        out["wandb"] = {
            "project": given.wandb.project or "coap-plugins",
            "entity": given.wandb.entity,
            "mode": given.wandb.mode or os.environ.get("WANDB_MODE") or "offline",
            "folder": str(root),
        }
    return out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def finish_run(
    cfg: TrainConfig,
    task: TaskModule,
    log: RunLog,
    *,
    evaluate: Callable[[], Any],
    optimizer: torch.optim.Optimizer,
    steps: int,
    first_step: int | None,
    rank: int,
    world_size: int,
    device: torch.device | None,
    diverged: TrainingDiverged | None,
) -> dict[str, Any] | None:
    """What both runners do once ``fit`` returns: a last evaluation (unless the run just had one
    or diverged), the DDPM sample grid (rank 0), the run folder's summary and report; then the
    divergence, if any, is raised again.  Returns the summary (None off rank 0).

    Args:
        evaluate: runs one evaluation with the framework (it feeds ``log``).
        steps: optimizer steps taken in all (the final step).
        first_step: the step this process started from (None: 0).
        rank, world_size: this process's global rank and the number of processes.
        device: where the model trained (for the peak-memory figure).
        diverged: the error ``fit`` stopped on (``stop_on_nonfinite``), or None.
    """
    if log.last_eval_step != steps and diverged is None:
        evaluate()
    grid = None
    if task.task == "ddpm" and cfg.task.num_samples > 0 and rank == 0 and diverged is None:
        grid = "samples.png"
        task.sample_grid(str(Path(cfg.output_dir or ".") / grid), cfg.task.num_samples, cfg.seed)
    peaks = peak_memory_per_rank(device)  # a collective: every rank, before rank 0 writes
    summary = log.finish(
        optimizer=optimizer,
        peak_per_rank=peaks,
        params=count_params(task.net),
        steps=steps,
        steps_this_run=steps - (first_step or 0),
        samples_per_step=cfg.data.batch_size * world_size,
        world_size=world_size,
        device=device,
        sample_grid=grid,
    )
    if diverged is not None:
        raise diverged
    return summary
