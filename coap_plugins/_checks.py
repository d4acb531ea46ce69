"""Argument checks shared by the optimizers, the policy and the schedule."""

from __future__ import annotations

from typing import Any

__all__ = ["check_min_numel", "check_positive_int", "check_rank", "check_ratio"]


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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
        raise ValueError(f"Invalid {name}: {value!r} (must be a number >= 1, or None)")


def check_min_numel(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 0)")
