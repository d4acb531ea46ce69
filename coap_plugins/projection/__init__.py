"""Projectors: matrix (2-D weights) and Tucker-2 (conv weights), and the routing between them."""

from __future__ import annotations

import math
from typing import Literal, Union

import torch

from .matrix import MatrixProjector, RefreshKind
from .tucker import Tucker2Projector

__all__ = [
    "DEFAULT_MIN_CONV_NUMEL",
    "DEFAULT_RANK_RATIO",
    "PROJECTION_KINDS",
    "MatrixProjector",
    "ProjectionKind",
    "Projector",
    "RefreshKind",
    "Tucker2Projector",
    "build_projector",
]

Projector = Union[MatrixProjector, Tucker2Projector]
ProjectionKind = Literal["auto", "matrix", "tucker2", "none"]
PROJECTION_KINDS: tuple[str, ...] = ("auto", "matrix", "tucker2", "none")

# The reference leaves convs with <= 32*32*3*3 elements at full rank.
DEFAULT_MIN_CONV_NUMEL = 32 * 32 * 3 * 3
# With neither a rank nor a ratio, ratio 4 applies (the reference crashes there instead).
DEFAULT_RANK_RATIO = 4.0


def build_projector(
    shape: tuple[int, ...] | torch.Size,
    kind: str = "auto",
    *,
    rank: int | None = None,
    rank_ratio_matrix: float | None = None,
    rank_ratio_conv: float | None = None,
    min_conv_numel: int = DEFAULT_MIN_CONV_NUMEL,
) -> tuple[Projector | None, str]:
    """Decide how a weight of ``shape`` is projected; returns ``(projector or None, reason)``.

    ``None`` means the full-rank update.  ``kind="auto"`` routes by shape: 2-D -> matrix, 4-D
    above ``min_conv_numel`` elements -> Tucker-2, anything else full rank (an explicit kind is
    not subject to the size floor: a :class:`~coap_plugins.CoapPolicy` applies its own).  Ranks:

    * matrix: ``min(m, n) // rank_ratio_matrix`` when a ratio is given (the ratio wins over
      ``rank``), else ``rank``, else ratio 4; at least 1.
    * Tucker-2: ``r_O = O // sqrt(rank_ratio_conv)``, ``r_I = I // sqrt(rank_ratio_conv)`` (ratio
      4 when unset), at least 1 and capped at what the mode's unfolding can hold.  1x1 convs
      project the output mode only, and an input mode whose rank is not below its size stays
      unprojected; the single projected mode then takes the whole ratio, ``r_O = O // ratio``
      (so the moments are 1/ratio of the full size, as the ratio means).

    A layer whose rank would not be smaller than the dimension it reduces takes the full-rank
    update, and so does one whose projectors plus two projected moments would hold at least as
    many floats as two full-size moments (Adam's accounting; e.g. a 128x64 1x1 conv, whose output
    rank is capped at 64): the reason says which.
    """
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"Invalid projection kind: {kind!r} (expected one of {', '.join(PROJECTION_KINDS)})")
    shape = tuple(int(s) for s in shape)
    if kind == "none":
        return None, "full-rank by request"
    if kind == "auto":
        if len(shape) == 2:
            kind = "matrix"
        elif len(shape) == 4:
            if math.prod(shape) <= min_conv_numel:
                return None, f"conv with {math.prod(shape)} <= min_conv_numel={min_conv_numel} elements"
            kind = "tucker2"
        else:
            return None, f"{len(shape)}-D tensor (only 2-D and 4-D weights are projected)"
    if kind == "matrix":
        if len(shape) != 2:
            raise ValueError(f"Projection kind 'matrix' needs a 2-D weight, got shape {shape}")
        short = min(shape)
        if rank_ratio_matrix is not None:
            r = max(1, int(short // rank_ratio_matrix))
        elif rank is not None:
            r = rank
        else:
            r = max(1, int(short // DEFAULT_RANK_RATIO))
        if r >= short:
            return None, f"rank {r} is not below min(m, n)={short}"
        return _if_it_saves(MatrixProjector(shape, r), f"matrix, rank {r} of {short}")
    # tucker2
    if len(shape) != 4:
        raise ValueError(f"Projection kind 'tucker2' needs a 4-D conv weight, got shape {shape}")
    out_ch, in_ch, k1, k2 = shape
    k = k1 * k2
    ratio = rank_ratio_conv if rank_ratio_conv is not None else DEFAULT_RANK_RATIO
    root = math.sqrt(ratio)
    r_in: int | None = min(max(1, int(in_ch // root)), in_ch, out_ch * k)
    if k == 1 or r_in >= in_ch:
        r_in = None
    # two projected modes share the ratio (sqrt each); a single projected mode takes all of it
    r_out = min(max(1, int(out_ch // (root if r_in is not None else ratio))), out_ch, in_ch * k)
    if r_out >= out_ch:
        return None, f"output rank {r_out} is not below O={out_ch}"
    what = f"tucker2, ranks ({r_out}, {r_in if r_in is not None else in_ch}) of ({out_ch}, {in_ch})"
    if r_in is None:
        what += " (output mode only)"
    return _if_it_saves(Tucker2Projector(shape, r_out, r_in), what)


def _if_it_saves(proj: Projector, what: str) -> tuple[Projector | None, str]:
    projected = proj.projector_numel() + 2 * math.prod(proj.moment_shape)
    full = 2 * math.prod(proj.shape)
    if projected >= full:
        return None, f"full rank: {what} would hold {projected} state floats against {full}"
    return proj, what
