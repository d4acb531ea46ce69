"""What each rank of a DDP test run saves: its parameters, its projectors and its refresh steps."""

import os

import torch


def save_rank_state(out: str, rank: int, world: int, optimizer, named_params, refreshes) -> None:
    projectors = {
        f"{gi}.{i}.{k}": v.clone()
        for gi, g in enumerate(optimizer.param_groups)
        for i, p in enumerate(g["params"])
        for k, v in optimizer.state[p].items()
        if k.startswith("proj")
    }
    params = {k: v.detach().clone() for k, v in named_params}
    torch.save(
        {"params": params, "projectors": projectors, "world": world, "refreshes": refreshes},
        os.path.join(out, f"rank{rank}.pt"),
    )
