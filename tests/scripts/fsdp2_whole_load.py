"""Run by tests/test_fsdp2.py under ``torch.distributed.run`` with 2 CPU processes (gloo).

A sharded optimizer is given a plain state dict of whole tensors (what ``torch.save`` of an
unsharded run holds) with ``load_state_dict``: each rank must take its own rows of every sharded
tensor, by the split that tensor has (the weight's rows, a wide weight's n, a Tucker-2 core's
r_O, 8-bit absmax blocks).  Writes ``OUT/whole_load.json``: per optimizer, whether the next step
equals that of the optimizer the state came from, bit for bit.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fsdp2_optim import COAP, GLOBAL_BATCH, Net, batch, make_optimizer, whole  # this folder: run as a script
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    per = GLOBAL_BATCH // world

    def build():
        torch.manual_seed(0)
        model = Net()
        for module in (model.conv1, model.conv2, model.conv3, model.fc1, model.fc2, model.fc3):
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def step(model, opt, s):
        x, y = batch(s)
        x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
        (F.mse_loss(model(x), y) / world).backward()  # gloo sums what FSDP2 asks to average
        opt.step()
        opt.zero_grad()

    results = {}
    for name in COAP:
        a = build()
        opt_a = make_optimizer(name, a)
        for s in (1, 2, 3, 4):  # a correlation update at 2 and 4
            step(a, opt_a, s)
        saved = opt_a.state_dict()
        plain = {
            "state": {
                i: {k: whole(v).clone() if torch.is_tensor(v) else v for k, v in st.items()}
                for i, st in saved["state"].items()
            },
            "param_groups": saved["param_groups"],
        }
        b = build()
        with torch.no_grad():
            for pa, pb in zip(a.parameters(), b.parameters()):
                pb.copy_(pa)
        opt_b = make_optimizer(name, b)
        opt_b.load_state_dict(plain)
        for s in (5, 6):  # an ordinary step and a recalibration
            step(a, opt_a, s)
            step(b, opt_b, s)
        results[name] = all(
            torch.equal(whole(pa.detach()), whole(pb.detach())) for pa, pb in zip(a.parameters(), b.parameters())
        )
    if rank == 0:
        with open(os.path.join(out, "whole_load.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
