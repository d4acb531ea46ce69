"""COAP optimizers on a small conv + linear model, plain (one process) or under FSDP2's
``fully_shard`` (gloo, CPU, launched with torch.distributed.run), for tests/test_fsdp2.py.

Every run trains on the same global batches (each rank takes its slice of them) and writes, per
rank, ``OUT/<optimizer>_rank<r>.pt``: the whole parameters and optimizer state (sharded tensors
gathered), the replicated state tensors as this rank holds them, and this rank's state bytes.
``--save-at K CKPT`` also writes a distributed checkpoint after step K; ``--load CKPT`` resumes
from one (written at any world size) and trains the remaining steps.

``--twin`` (sharded runs): before every step an unsharded copy of the model and optimizer is
given the whole parameters, gradients and optimizer state, and steps too; the output then holds,
per step, the largest relative difference between the two updates (``|dW - dW_twin| / |dW_twin|``
over the parameters) and between the new projectors.  That compares the math from identical
inputs: whole trajectories are no measure here, since COAP on this problem carries a 1e-7
perturbation of the start to 0.3 relative in 20 steps in one process (the subspace of a
gradient whose spectrum has a flat tail is ill-determined), where torch's AdamW stays at 1e-6.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from coap_plugins import CoapAdafactor, CoapAdamW, CoapAdamW8bit  # noqa: E402
from coap_plugins.projection import linalg  # noqa: E402

# how many recalibrations of a step fell back to the Householder form (a rank-deficient G P_prev,
# whose completion of the basis the gradient does not determine)
FALLBACKS: list[int] = []
_resolve = linalg.SvdFallbacks.resolve


def _counted_resolve(self) -> int:
    ran = _resolve(self)
    FALLBACKS.append(ran)
    return ran


linalg.SvdFallbacks.resolve = _counted_resolve

OPTIMIZERS = {"CoapAdamW": CoapAdamW, "CoapAdafactor": CoapAdafactor, "CoapAdamW8bit": CoapAdamW8bit}
COAP = tuple(OPTIMIZERS)
GLOBAL_BATCH = 256  # above every rank r: a gradient of lower rank leaves part of a new basis arbitrary


class Net(nn.Module):
    """Every layout a shard can take: Tucker-2 convs (3x3 and 1x1), wide matrices (projector
    sharded), a tall one (moments sharded), uneven rows (127 over two ranks), full-rank biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 1)
        self.fc1 = nn.Linear(512, 64)  # 64 x 512: wide
        self.fc2 = nn.Linear(64, 512)  # 512 x 64: tall
        self.fc3 = nn.Linear(512, 127)  # 127 x 512: wide, uneven shards; the output (a regression: a
        # classifier's few logits would leave the gradients of the last layers of rank below r)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(F.relu(self.conv3(x)), 4).flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def make_optimizer(name, model):
    common = dict(rank_ratio_matrix=4, rank_ratio_conv=4, update_interval=2, reproject_factor=3, min_conv_numel=256)
    params = list(model.named_parameters())
    if name == "AdamW":  # torch's own, the yardstick of what rounding alone does across world sizes
        return torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    if name == "CoapAdafactor":
        return CoapAdafactor(params, lr=1e-2, relative_step=False, weight_decay=0.01, **common)
    return OPTIMIZERS[name](params, lr=2e-3, weight_decay=0.01, **common)


def batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=gen), torch.randn(GLOBAL_BATCH, 127, generator=gen)


def whole(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def whole_state(model, opt):
    """Whole parameters and optimizer state (sharded tensors gathered), by parameter name."""
    params = {k: whole(v.detach()).clone() for k, v in model.named_parameters()}
    state = {}
    for k, p in model.named_parameters():
        for key, v in opt.state[p].items():
            state[f"{k}.{key}"] = whole(v).clone() if isinstance(v, torch.Tensor) else v
    return params, state


def save(model, opt, path, full):
    """A checkpoint as torch.distributed.checkpoint writes one (sharded state dicts), or with
    ``full`` the whole state dicts saved by rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=full, cpu_offload=full))
    if not full:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    elif not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        torch.save({"model": model_sd, "optim": optim_sd}, os.path.join(path, "full.pt"))


def load(model, opt, path, full):
    """Resume from :func:`save`'s checkpoint, written at any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if full:
        saved = torch.load(os.path.join(path, "full.pt"), weights_only=True)
        options = StateDictOptions(full_state_dict=True)
        set_state_dict(model, opt, model_state_dict=saved["model"], optim_state_dict=saved["optim"], options=options)
        return
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def give_twin(model, opt, twin_model, twin):
    """The unsharded twin gets the whole parameters, gradients and state; returns the parameters
    and gradients."""
    before, grads = {}, {}
    for (k, p), tp in zip(model.named_parameters(), twin_model.parameters()):
        before[k] = whole(p.detach()).clone()
        with torch.no_grad():
            tp.copy_(before[k])
        tp.grad = whole(p.grad).clone()
        grads[k] = tp.grad.clone()
        state = opt.state[p].items()
        twin.state[tp] = {key: whole(v).clone() if isinstance(v, torch.Tensor) else v for key, v in state}
        if not twin.state[tp]:
            del twin.state[tp]
    return before, grads


def captured(g, state):
    """``g`` restricted to the subspace a layer's projectors keep (``G P P^T``, or both modes'
    ``P P^T`` for Tucker-2): what a basis choice decides, blind to the order, signs and mixing
    of directions the gradient does not tell apart."""
    if "proj" in state:
        p = state["proj"]
        return (p @ (p.T @ g)) if g.shape[0] == p.shape[0] else (g @ p) @ p.T
    p_out = state["proj_out"]
    out = torch.einsum("oa,pa,pikl->oikl", p_out, p_out, g)
    if "proj_in" in state:
        p_in = state["proj_in"]
        out = torch.einsum("ia,ja,ojkl->oikl", p_in, p_in, out)
    return out


def compare_twin(model, opt, twin_model, twin, before, grads):
    """Largest relative differences, sharded against twin: of the updates, and of the gradient
    captured by the projectors (relative to the gradient)."""
    upd, cap = 0.0, 0.0
    for (k, p), tp in zip(model.named_parameters(), twin_model.parameters()):
        d, dt = whole(p.detach()) - before[k], tp.detach() - before[k]
        upd = max(upd, float((d - dt).norm() / dt.norm().clamp_min(1e-30)))
        mine = {key: whole(v) for key, v in opt.state[p].items() if key.startswith("proj")}
        if mine and opt.state[p]["step"] > 0:
            g = grads[k]
            cap = max(cap, float((captured(g, mine) - captured(g, twin.state[tp])).norm() / g.norm()))
    kinds = sorted({t["refresh"] for t in (twin.last_refresh(q) for q in twin_model.parameters()) if t})
    return {"update": upd, "captured": cap, "refreshes": kinds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-at", nargs=2, default=None)
    ap.add_argument("--load", default=None)
    ap.add_argument("--from-step", type=int, default=0)
    ap.add_argument("--twin", action="store_true")
    ap.add_argument("--perturb", type=float, default=0.0, help="scale the start by 1 + this * N(0, 1) (sensitivity)")
    ap.add_argument("--snapshot", type=int, default=None, help="also keep the whole parameters after this step")
    ap.add_argument("--full", action="store_true", help="full state dicts (torch.save on rank 0), not sharded ones")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    sharded = "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
    for name in args.optimizers.split(","):
        torch.manual_seed(0)
        model = Net()
        if args.perturb:
            noise = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1 + args.perturb * torch.randn(p.shape, generator=noise))
        if sharded:
            for module in (model.conv1, model.conv2, model.conv3, model.fc1, model.fc2, model.fc3):
                fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
        opt = make_optimizer(name, model)
        at_save = at_load = snapshot = None
        if args.load:
            load(model, opt, os.path.join(args.load, name), args.full)
            at_load = whole_state(model, opt)
        per_rank = GLOBAL_BATCH // world
        twin_model = twin = None
        if args.twin and name in COAP:
            twin_model = Net()
            twin = make_optimizer(name, twin_model)
        steps = []
        for step in range(args.from_step + 1, args.steps + 1):
            x, y = batch(step)
            x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]
            loss = F.mse_loss(model(x), y)
            # torch 2.7's FSDP2 asks gloo's reduce-scatter for an average, and gloo sums: the
            # sharded runs divide their loss by the world size so every run steps on the mean
            (loss / world).backward()
            if twin is not None:
                before, grads = give_twin(model, opt, twin_model, twin)
            opt.step()
            if twin is not None:
                FALLBACKS.clear()
                twin.step()
                fell_back = sum(FALLBACKS)
                steps.append({**compare_twin(model, opt, twin_model, twin, before, grads), "fallbacks": fell_back})
            opt.zero_grad()
            if args.save_at and step == int(args.save_at[0]):
                save(model, opt, os.path.join(args.save_at[1], name), args.full)
                at_save = whole_state(model, opt)
            if step == args.snapshot:
                snapshot = whole_state(model, opt)[0]
        params, state = whole_state(model, opt)
        replicated = {
            f"{k}.{key}": v.clone()
            for k, p in model.named_parameters()
            for key, v in opt.state[p].items()
            if isinstance(v, torch.Tensor) and not hasattr(v, "device_mesh")
        }
        torch.save(
            {
                "world": world,
                "params": params,
                "state": state,
                "replicated": replicated,
                "twin": steps,
                "at_save": at_save,
                "at_load": at_load,
                "snapshot": snapshot,
                **(
                    {
                        "state_bytes": opt.state_bytes(),
                        "replicated_bytes": opt.state_bytes(replicated=True),
                        "report": {e["name"]: e.get("last_refresh") for e in opt.coap_report()["layers"]},
                    }
                    if hasattr(opt, "coap_report")
                    else {}
                ),
            },
            os.path.join(args.out, f"{name}_rank{rank}.pt"),
        )
    if sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
