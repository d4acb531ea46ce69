"""Pieces both ``coap-train`` runners build the same way: optimizer, LR shape, sizes, settings."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .config import CoapConfig, TrainConfig, duration_parts
from .tasks import build_param_groups

__all__ = ["LrShape", "RunInterrupted", "TrainingDiverged", "build_optimizer", "coap_kwargs", "require", "total_steps"]


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise an ImportError that names the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"{module} is needed here; install it with `pip install coap-plugins[{extra}]`") from exc


class RunInterrupted(RuntimeError):
    """Raised by ``stop_after_batches``: the run stops as if killed, its checkpoints kept."""


class TrainingDiverged(RuntimeError):
    """The training loss of step ``step`` is NaN or infinite and ``stop_on_nonfinite`` is set.

    Raised from each framework's batch-end callback (before that step's checkpoint is written);
    the runners write the run folder, saying the run diverged, and raise it again.
    """

    def __init__(self, step: int, loss: float) -> None:
        self.step, self.loss = step, loss
        where = (f"the training loss is {loss}" if not math.isfinite(loss)
                 else "the training loss of another rank is not finite")
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


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
