"""When COAP refreshes its projectors: the correlation update and the low-cost SVD recalibration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ._checks import check_positive_int

__all__ = ["ProjectionSchedule", "Refresh"]

Refresh = Literal["none", "correlation", "svd"]


@dataclass(frozen=True)
class ProjectionSchedule:
    """Which refresh is due at a step (Algorithm 1 and 2 of the supplementary).

    Every ``update_interval`` (T_u) steps a correlation-aware update of P, except at multiples of
    ``update_interval * reproject_factor`` (lambda T_u), where the low-cost SVD recalibrates P.
    Step 0 is a layer's set-up (its first usable gradient), handled by the optimizer.

    Args:
        update_interval: T_u, >= 1 (default 32).
        reproject_factor: lambda, >= 1 (default 5); 1 makes every refresh a recalibration.

    Example:
        >>> s = ProjectionSchedule(update_interval=2, reproject_factor=3)
        >>> [s.refresh_at(t) for t in range(1, 7)]
        ['none', 'correlation', 'none', 'correlation', 'none', 'svd']
    """

    update_interval: int = 32
    reproject_factor: int = 5

    def __post_init__(self) -> None:
        check_positive_int("update_interval", self.update_interval)
        check_positive_int("reproject_factor", self.reproject_factor)

    @property
    def svd_interval(self) -> int:
        return self.update_interval * self.reproject_factor

    def refresh_at(self, step: int) -> Refresh:
        if step <= 0 or step % self.update_interval:
            return "none"
        return "svd" if step % self.svd_interval == 0 else "correlation"
