"""What each rank of a DDP or FSDP2 test run saves: its parameters, its projectors and its refresh
steps (sharded tensors gathered whole: every rank must call it)."""

import os

import torch


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "device_mesh") else t


def save_rank_state(out: str, rank: int, world: int, optimizer, named_params, refreshes, name: str = "rank") -> None:
    projectors = {
        f"{gi}.{i}.{k}": _whole(v).clone()
        for gi, g in enumerate(optimizer.param_groups)
        for i, p in enumerate(g["params"])
        for k, v in optimizer.state[p].items()
        if k.startswith("proj")
    }
    kinds = sorted({type(v).__name__ for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)})
    params = {k: _whole(v.detach()).clone() for k, v in named_params}
    torch.save(
        {"params": params, "projectors": projectors, "world": world, "refreshes": refreshes, "state_types": kinds},
        os.path.join(out, f"{name}{rank}.pt"),
    )
