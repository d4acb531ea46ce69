"""Parameters that FSDP2 (``torch.distributed.fsdp.fully_shard``) has sharded: DTensors split on
their first dimension over a 1-D device mesh.

The optimizers do all their math on each rank's local shard (:meth:`torch.distributed.tensor.DTensor.to_local`)
and reduce only small matrices across the shard group (see
:class:`~coap_plugins.projection.linalg.Split`).  In ``optimizer.state`` the sharded tensors
(every moment: along the weight's rows for tall weights and full-rank parameters, along n for
wide weights, along r_O for Tucker-2 cores; the projector of a wide weight and Tucker-2's
output-mode projector, along the weight's rows) are DTensors split on their first dimension
(``Shard(0)``) over the parameter's mesh, so ``torch.distributed.checkpoint`` saves and reshards
them; the others (a tall weight's projector, Tucker-2's input-mode projector) are replicated:
each rank holds the same values, as a plain tensor, which the distributed checkpoint saves once.
During a step the optimizer works on a *local view* of each state dict (:func:`local_view`) and
writes the DTensors back at the end (:func:`write_back`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..projection.linalg import Split

__all__ = ["check_placement", "is_dtensor", "local_part", "local_view", "param_split", "write_back"]


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch built without distributed
        return None, None
    return DTensor, Shard


def is_dtensor(t: Any) -> bool:
    dtensor, _ = _dtensor_types()
    return dtensor is not None and isinstance(t, dtensor)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of ``t``: its local shard for a DTensor (the tensor itself, so
    in-place math on it updates the DTensor), else ``t``."""
    return t._local_tensor if is_dtensor(t) else t


def check_placement(p: torch.Tensor, owner: str) -> None:
    """Refuse a DTensor parameter that is not split on its first dimension over a 1-D mesh."""
    if not is_dtensor(p):
        return
    _, shard = _dtensor_types()
    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or placements != (shard(0),):
        raise ValueError(
            f"{owner} supports DTensor parameters sharded on their first dimension over a 1-D device mesh "
            f"(FSDP2's fully_shard: placements (Shard(dim=0),)); got placements {placements} on a "
            f"{mesh.ndim}-D mesh for the parameter of shape {tuple(p.shape)}"
        )


def param_split(p: torch.Tensor) -> Split | None:
    """How ``p``'s first dimension is split across its mesh, or ``None`` for a plain tensor."""
    if not is_dtensor(p):
        return None
    mesh = p.device_mesh
    world, total = mesh.size(), int(p.shape[0])
    split = Split("rows", mesh.get_group(), world, mesh.get_local_rank(), total, -(-total // world))
    local = p.to_local().shape[0]
    if local != split.local:  # FSDP2 and DTensor split as torch.chunk does; anything else is not ours
        raise ValueError(
            f"DTensor parameter of shape {tuple(p.shape)} holds {local} rows on rank {split.rank}, "
            f"expected {split.local} (torch.chunk's split over {world} ranks)"
        )
    return split


def local_view(state: dict, splits: dict[str, Split], shapes: dict[str, tuple[int, ...]]) -> dict:
    """The state of a sharded parameter as this rank's tensors: the local shard of every key
    ``splits`` names (with the split it has), the whole tensor of every other one.  A state
    loaded in another layout (a whole tensor from an unsharded checkpoint, a DTensor where this
    layout replicates) is brought to this one here."""
    out = {}
    for key, value in state.items():
        split = splits.get(key)
        if is_dtensor(value):
            value = value._local_tensor if split is not None else value.full_tensor()
        elif split is not None and isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(shapes[key]):
            if split.local != split.total:  # a whole tensor into a sharded run: this rank's rows
                value = split.mine(value).clone()
        out[key] = value
    return out


def write_back(state: dict, local: dict, splits: dict[str, Split], shapes: dict[str, tuple[int, ...]], p) -> None:
    """Put a step's local view back into ``state``: the keys ``splits`` names as DTensors with
    ``p``'s mesh and placement and their global ``shapes``, the rest as they are."""
    dtensor, shard = _dtensor_types()
    for key, value in local.items():
        if not (isinstance(value, torch.Tensor) and key in splits):
            state[key] = value
            continue
        current = state.get(key)
        if is_dtensor(current) and current._local_tensor is value:
            continue
        shape = shapes[key]
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        state[key] = dtensor.from_local(
            value, p.device_mesh, (shard(0),), run_check=False, shape=torch.Size(shape), stride=stride
        )
