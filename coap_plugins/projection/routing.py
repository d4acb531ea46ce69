"""Routing: which projector (if any) a weight gets, with what rank, and why.

The one place that decides: :class:`~coap_plugins.CoapPolicy` calls :func:`build_projector` for
every weight it maps to a projector, and the optimizers call it for every parameter of their
groups (on the kind the policy wrote), so the size floor, the rank rules and the memory check
exist once.
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch

from .matrix import MatrixProjector
from .tucker import Tucker2Projector

__all__ = [
    "DEFAULT_MIN_CONV_NUMEL",
    "DEFAULT_RANK_RATIO",
    "PROJECTION_KINDS",
    "PROJECTION_REASONS",
    "ProjectionKind",
    "Projector",
    "build_projector",
    "policy_reason",
    "route_in_group",
]

Projector = Union[MatrixProjector, Tucker2Projector]
ProjectionKind = Literal["auto", "matrix", "tucker2", "none"]
PROJECTION_KINDS: tuple[str, ...] = ("auto", "matrix", "tucker2", "none")

# The param-group key where a CoapPolicy writes why it chose each parameter's kind (one plain
# string per parameter, beside ``projection``).  Saved with the groups in ``state_dict`` but never
# compared on load: it decides no shape.
PROJECTION_REASONS = "projection_reasons"
# What a parameter routed 'none' by its group reports when no policy said why.
_NONE_BY_GROUP = "full rank: the param group's projection says 'none'"

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
    floor_tucker2: bool = False,
) -> tuple[Projector | None, str]:
    """Decide how a weight of ``shape`` is projected; returns ``(projector or None, reason)``.

    ``None`` means the full-rank update.  ``kind="auto"`` routes by shape: 2-D -> matrix, 4-D
    above ``min_conv_numel`` elements -> Tucker-2, anything else full rank.  An explicit
    ``"tucker2"`` is not subject to the size floor unless ``floor_tucker2`` (what a
    :class:`~coap_plugins.CoapPolicy` passes: a conv it maps to Tucker-2 must still be large
    enough; an optimizer takes a group's explicit kind as it is).  Ranks:

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
    floor = kind == "auto" or floor_tucker2
    if kind == "auto":
        if len(shape) == 2:
            kind = "matrix"
        elif len(shape) == 4:
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
    if floor and math.prod(shape) <= min_conv_numel:
        return None, f"conv with {math.prod(shape)} <= min_conv_numel={min_conv_numel} elements"
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


def route_in_group(shape: tuple[int, ...] | torch.Size, group: dict, index: int) -> tuple[str, Projector | None, str]:
    """``(kind, projector or None, reason)`` for parameter ``index`` of an optimizer's ``group``.

    The kind is the group's (one string, or one per parameter); the projector is built from
    the group's settings by :func:`build_projector`.  A parameter the group routes ``'none'``
    reports the reason its policy wrote in ``group["projection_reasons"]`` (when the list still
    matches the parameters), so the policy's explanation reaches ``routing()`` and
    ``coap_report()``.
    """
    kinds = group["projection"]
    kind = kinds if isinstance(kinds, str) else kinds[index]
    proj, reason = build_projector(
        shape,
        kind,
        rank=group["rank"],
        rank_ratio_matrix=group["rank_ratio_matrix"],
        rank_ratio_conv=group["rank_ratio_conv"],
        min_conv_numel=group["min_conv_numel"],
    )
    if kind == "none":
        reason = policy_reason(group, index) or _NONE_BY_GROUP
    return kind, proj, reason


def policy_reason(group: dict, index: int) -> str | None:
    """The reason a policy wrote for parameter ``index`` of ``group``, if the group has one per
    parameter (module surgery may have changed the parameters since: then it has none)."""
    reasons = group.get(PROJECTION_REASONS)
    if isinstance(reasons, list) and len(reasons) == len(group["params"]) and isinstance(reasons[index], str):
        return reasons[index] or None
    return None
