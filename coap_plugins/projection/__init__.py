"""Projectors: matrix (2-D weights) and Tucker-2 (conv weights); the routing between them is in
:mod:`.routing`."""

from .matrix import MatrixProjector, RefreshKind
from .routing import (
    DEFAULT_MIN_CONV_NUMEL,
    DEFAULT_RANK_RATIO,
    PROJECTION_KINDS,
    PROJECTION_REASONS,
    ProjectionKind,
    Projector,
    build_projector,
)
from .tucker import Tucker2Projector

__all__ = [
    "DEFAULT_MIN_CONV_NUMEL",
    "DEFAULT_RANK_RATIO",
    "PROJECTION_KINDS",
    "PROJECTION_REASONS",
    "MatrixProjector",
    "ProjectionKind",
    "Projector",
    "RefreshKind",
    "Tucker2Projector",
    "build_projector",
]
