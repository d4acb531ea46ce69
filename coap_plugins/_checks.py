"""Argument checks shared by the optimizers, the policy and the schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "check_lr",
    "check_min_numel",
    "check_nonnegative",
    "check_positive_int",
    "check_rank",
    "check_ratio",
    "conv_ratio_alias",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_lr(lr: Any) -> None:
    """A learning rate as torch.optim.AdamW takes it: a finite number >= 0, or a 1-element
    tensor holding one (read once here, never in the step)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr.is_complex() or not lr.is_floating_point():
            raise ValueError(f"Invalid learning rate: a Tensor lr must be floating point, got {lr.dtype}")
        value = float(lr)
    elif _is_number(lr):
        value = float(lr)
    else:
        raise ValueError(f"Invalid learning rate: {lr!r} (expected a number or a 1-element Tensor)")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid learning rate: {value} (must be a finite number >= 0)")


def check_nonnegative(label: str, value: Any) -> None:
    """A finite number >= 0 (``label`` as torch words it, e.g. ``"weight_decay value"``)."""
    if not (_is_number(value) and math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid {label}: {value!r} (must be a finite number >= 0)")


def conv_ratio_alias(rank_ratio_conv: Any, rank_ratio_cnn: Any) -> Any:
    """``rank_ratio_cnn`` (the reference code's name) as an alias of ``rank_ratio_conv``."""
    if rank_ratio_cnn is None:
        return rank_ratio_conv
    if rank_ratio_conv is not None and rank_ratio_conv != rank_ratio_cnn:
        raise ValueError(
            f"Conflicting settings: rank_ratio_conv={rank_ratio_conv!r} and its alias rank_ratio_cnn={rank_ratio_cnn!r}; "
            "give one of them"
        )
    return rank_ratio_cnn


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")
    return value


def check_rank(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"Invalid rank: {value!r} (must be an integer >= 1, or None)")


def check_ratio(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value < math.inf:
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 1, or None)")


def check_min_numel(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 0)")
