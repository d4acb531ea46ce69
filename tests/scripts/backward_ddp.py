"""COAP under DDP with the step inside backward, against the normal mode (run with torchrun).

``backward_ddp.py OUT [--steps N]``: for each optimizer, residual and accumulation (1 and 4
micro-batches, the ones before the last under ``no_sync``), trains the same small conv + linear
model from the same start on rank-specific data in four modes: ``normal`` (DDP's own
reduction, ``optimizer.step()`` after backward), ``full`` (StepInBackward, the bucket averaged
as DDP does, then stepped), ``projected`` (StepInBackward sending ``G P`` where that is all a
layer needs) and ``unmarked`` (projected, but no backward pass marked as a step's last, so
``optimizer.step()`` steps, averaging the accumulated cores itself).
Writes ``OUT/<optimizer>_<residual>_acc<k>_<mode>_rank<r>.pt`` (the parameters
after every step and the optimizer's state dict) and, for ``projected``, the elements one ordinary step reduces.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from coap_plugins.optim import CoapAdafactor, CoapAdamW, StepInBackward

OPTIMIZERS = {"CoapAdamW": CoapAdamW, "CoapAdafactor": CoapAdafactor}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train(name: str, residual: str, accum: int, mode: str, steps: int, rank: int) -> dict:
    net = model()
    ddp = DDP(net, bucket_cap_mb=0.05)  # a few buckets: steps start before the backward pass ends
    opt = OPTIMIZERS[name](
        net.parameters(),
        lr=1e-2,
        rank_ratio_matrix=4,
        rank_ratio_conv=2,
        min_conv_numel=0,
        update_interval=3,
        reproject_factor=2,
        residual=residual,
    )
    hooks = None if mode == "normal" else StepInBackward(opt, ddp, reduce="full" if mode == "full" else "projected")
    if mode == "unmarked":  # no pass is marked as the last: optimizer.step() steps (and reduces the cores)
        hooks.stepping = False
    gen = torch.Generator().manual_seed(100 + rank)
    sent, history = None, []
    for _ in range(steps):
        for k in range(accum):
            x = torch.randn(4, 3, 8, 8, generator=gen)
            y = torch.randint(0, 10, (4,), generator=gen)
            ctx = ddp.no_sync() if k < accum - 1 else contextlib.nullcontext()
            with ctx:
                (nn.functional.cross_entropy(ddp(x), y) / accum).backward()
        if hooks is not None and mode == "projected":
            sent = hooks.reduced_elements() if sent is None else sent
        opt.step()
        opt.zero_grad()
        history.append([p.detach().clone() for p in net.parameters()])
    return {
        "params": history[-1],
        "history": history,
        "state": opt.state_dict(),
        "grads_freed": all(p.grad is None for p in net.parameters()),
        "reduced": sent,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    for name in OPTIMIZERS:
        for residual in ("none", "scaled"):
            for accum in (1, 4):
                for mode in ("normal", "full", "projected", "unmarked"):
                    out = train(name, residual, accum, mode, args.steps, rank)
                    torch.save(out, args.out / f"{name}_{residual}_acc{accum}_{mode}_rank{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
