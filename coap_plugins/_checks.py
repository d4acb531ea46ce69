"""Argument checks shared by the optimizers, the policy and the schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "SettingError",
    "check_lr",
    "check_min_numel",
    "check_nonnegative",
    "check_positive_int",
    "check_rank",
    "check_ratio",
    "conv_ratio_alias",
    "is_finite_number",
]


class SettingError(ValueError):
    """An invalid setting: the message reads ``Invalid <key>: <reason>``, and ``key`` and
    ``reason`` carry the two parts as data (the YAML runner prefixes the key with its section)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"Invalid {key}: {reason}")
        self.key = key
        self.reason = reason


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool, not a tensor) that is finite."""
    return _is_number(value) and math.isfinite(value)


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
    if not (is_finite_number(value) and value >= 0.0):
        raise SettingError(label, f"{value!r} (must be a finite number >= 0)")


def conv_ratio_alias(rank_ratio_conv: Any, rank_ratio_cnn: Any) -> Any:
    """``rank_ratio_cnn`` (the reference code's name) as an alias of ``rank_ratio_conv``."""
    if rank_ratio_cnn is None:
        return rank_ratio_conv
    if rank_ratio_conv is not None and rank_ratio_conv != rank_ratio_cnn:
        raise ValueError(
            f"Conflicting settings: rank_ratio_conv={rank_ratio_conv!r} and its alias "
            f"rank_ratio_cnn={rank_ratio_cnn!r}; "
            "give one of them"
        )
    return rank_ratio_cnn


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(name, f"{value!r} (must be an integer >= 1)")
    return value


def check_rank(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SettingError("rank", f"{value!r} (must be an integer >= 1, or None)")


def check_ratio(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value < math.inf:
        raise SettingError(name, f"{value!r} (must be a finite number >= 1, or None)")


def check_update_scale(value: Any) -> None:
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise SettingError("update_scale", f"{value!r} (must be 'auto' or a finite number > 0)")


def check_min_numel(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SettingError(name, f"{value!r} (must be an integer >= 0)")


# -- COAP group settings (the optimizers' param groups) ------------------------------------------
def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise SettingError(name, f"{value!r} (must be True or False)")


def check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(name, f"{value!r} (must be an integer)")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """One of a few fixed strings; the message quotes them (``'a' or 'b'``, ``'a', 'b' or 'c'``)."""
    if value not in choices:
        quoted = [repr(c) for c in choices]
        expected = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
        raise SettingError(name, f"{value!r} (expected {expected})")


def check_projection(kinds: Any, n_params: int, allowed: tuple[str, ...]) -> None:
    """A group's ``projection``: one kind for the group, or a list with one kind per parameter."""
    if isinstance(kinds, str):
        kinds = [kinds]
    elif isinstance(kinds, (list, tuple)):
        if len(kinds) != n_params:
            raise SettingError(
                "projection",
                f"a list of {len(kinds)} kinds for a group of {n_params} parameters "
                "(give one kind per parameter, or one string for the whole group)",
            )
    else:
        raise SettingError("projection", f"{kinds!r} (expected a kind or a list of kinds)")
    for kind in kinds:
        if kind not in allowed:
            raise SettingError("projection kind", f"{kind!r} (expected one of {', '.join(allowed)})")


def check_projection_reasons(reasons: Any, n_params: int) -> None:
    """A group's ``projection_reasons`` (written by a CoapPolicy): one plain string per parameter,
    so that checkpoints keep loading with ``torch.load(weights_only=True)``."""
    if not (isinstance(reasons, (list, tuple)) and all(isinstance(r, str) for r in reasons)):
        raise SettingError("projection_reasons", f"{reasons!r} (expected a list of strings)")
    if len(reasons) != n_params:
        raise SettingError(
            "projection_reasons",
            f"{len(reasons)} reasons for a group of {n_params} parameters (give one per parameter)",
        )
