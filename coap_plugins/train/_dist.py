"""This process's place in a distributed run, for code that runs before or outside a framework."""

from __future__ import annotations

import os

import torch

__all__ = ["rank_world"]


def rank_world() -> tuple[int, int]:
    """``(global rank, world size)``: from ``torch.distributed`` once it is initialized, before
    that from the launcher's ``RANK`` / ``WORLD_SIZE`` (``(0, 1)`` when they are unset)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
