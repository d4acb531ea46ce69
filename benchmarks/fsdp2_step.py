"""COAP's optimizer step under FSDP2 (``fully_shard``) against the unsharded step, on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fsdp2_step.py [--out FILE]

Runs itself twice: one plain process (the unsharded step) and two gloo processes under
``torch.distributed.run`` with the model sharded by ``fully_shard`` (each process one thread, so
a rank's time compares with the unsharded step's).  For torchvision's ResNet-18 (CIFAR-sized
input) and a linear-heavy MLP it prints, per optimizer:

* optimizer-state bytes: unsharded; per rank, split into the sharded part and the replicated part
  (every rank holds those whole: the projectors of tall weights, the moments of wide weights and
  the Tucker-2 cores);
* the median time of an ordinary, a correlation and a recalibration (SVD) step (the same
  gradients stepped again), unsharded and on each rank;
* the bytes each rank sends in the step's own collectives (all of small matrices; counted as a
  ring algorithm sends them), against one all-gather of every projected gradient counted the
  same way (what an implementation that rebuilt whole gradients would pay: O(m n) per layer).

The forward/backward collectives of FSDP2 itself (parameter all-gathers, gradient
reduce-scatters) are not counted: they are the same for every optimizer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coap_plugins import CoapAdafactor, CoapAdamW, CoapAdamW8bit  # noqa: E402

OPTIMIZERS = {"CoapAdamW": CoapAdamW, "CoapAdamW8bit": CoapAdamW8bit, "CoapAdafactor": CoapAdafactor}
REPEATS = 5


class MLP(nn.Module):
    """Linear-heavy: tall, wide and square weights."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(3 * 32 * 32, 1024), nn.ReLU(), nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 512)
        )
        self.head = nn.Linear(512, 10)

    def forward(self, x):
        return self.head(F.relu(self.layers(x.flatten(1))))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    return MLP()


def shard(model: nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if module is not model and any(p.requires_grad for p in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


class CollectiveBytes:
    """Counts the bytes this rank sends in all_reduce / reduce_scatter_tensor / all_gather while
    active, as a ring algorithm sends them."""

    def __init__(self) -> None:
        self.bytes = 0
        self.active = False
        self._orig = (dist.all_reduce, dist.all_gather, dist.reduce_scatter_tensor)

        world = dist.get_world_size()

        def counted(orig, position: int, keyword: str, share: float):
            def wrapper(*a, **k):
                if self.active:
                    t = k[keyword] if keyword in k else a[position]
                    self.bytes += int(t.numel() * t.element_size() * share)
                return orig(*a, **k)

            return wrapper

        # what each rank sends in a ring: an all-reduce 2 (w - 1) / w of the tensor, a
        # reduce-scatter (w - 1) / w of its input, an all-gather w - 1 times its own part
        all_reduce = counted(self._orig[0], 0, "tensor", 2 * (world - 1) / world)
        all_gather = counted(self._orig[1], 1, "tensor", world - 1)
        reduce_scatter_tensor = counted(self._orig[2], 1, "input", (world - 1) / world)
        dist.all_reduce, dist.all_gather, dist.reduce_scatter_tensor = all_reduce, all_gather, reduce_scatter_tensor


def timed_step(opt, kind: str, counter: CollectiveBytes | None) -> tuple[float, int]:
    if kind != "ordinary":
        opt.request_refresh(kind)
    if counter is not None:
        counter.bytes, counter.active = 0, True
    start = time.perf_counter()
    opt.step()
    seconds = time.perf_counter() - start
    moved = 0
    if counter is not None:
        counter.active = False
        moved = counter.bytes
    return seconds, moved


def inner(out: str, quick: bool) -> None:
    sharded = "WORLD_SIZE" in os.environ
    torch.set_num_threads(1)
    rank, world, mesh, counter = 0, 1, None, None
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        counter = CollectiveBytes()
    rows = []
    repeats = 1 if quick else REPEATS
    for model_name in ("mlp",) if quick else ("resnet18", "mlp"):
        for opt_name, cls in list(OPTIMIZERS.items())[: 1 if quick else None]:
            model = build(model_name)
            if sharded:
                shard(model, mesh)
            kwargs = dict(rank_ratio_matrix=4, rank_ratio_conv=4)
            opt = cls(list(model.named_parameters()), lr=1e-3, **kwargs)
            opt.drive_refreshes_externally()
            gen = torch.Generator().manual_seed(0)
            x, y = torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen)
            per = 32 // world
            x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            F.cross_entropy(model(x), y).backward()
            opt.step()  # set-up
            row = {"model": model_name, "optimizer": opt_name, "world": world, "rank": rank}
            for kind in ("ordinary", "correlation", "svd"):
                runs = [timed_step(opt, kind, counter) for _ in range(repeats)]
                row[f"{kind}_s"] = statistics.median(t for t, _ in runs)
                row[f"{kind}_bytes"] = runs[-1][1]
            row["state_bytes"] = opt.state_bytes()
            row["replicated_bytes"] = opt.state_bytes(replicated=True)
            # one all-gather of every projected gradient: what rebuilding whole gradients would move
            row["whole_grad_bytes"] = sum(
                p.numel() * 4 * (world - 1) // world
                for r in opt.routing()
                if r["projector"] is not None
                for p in [opt.param_groups[r["group"]]["params"][r["index"]]]
            )
            rows.append(row)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    if sharded:
        dist.destroy_process_group()


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def outer(args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as plain, tempfile.TemporaryDirectory() as shard2:
        me = [str(Path(__file__).resolve()), *(["--quick"] if args.quick else []), "--inner"]
        subprocess.run([sys.executable, *me, plain], check=True, env=env)
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        subprocess.run([*launch, *me, shard2], check=True, env=env)
        base = json.load(open(os.path.join(plain, "rank0.json")))
        ranks = [json.load(open(os.path.join(shard2, f"rank{r}.json"))) for r in (0, 1)]
    lines = [
        "| model | optimizer | state unsharded (MiB) | per rank: sharded + replicated (MiB) | rank / unsharded "
        "| ordinary step (ms): unsharded / rank 0 / rank 1 | correlation step (ms) | SVD step (ms) "
        "| step collectives per rank: ordinary / correlation / SVD (KiB) "
        "| all-gather of the projected gradients (KiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b, r0, r1 in zip(base, *ranks):
        shard = r0["state_bytes"] - r0["replicated_bytes"]
        times = {
            k: " / ".join(f"{x[f'{k}_s'] * 1e3:.0f}" for x in (b, r0, r1)) for k in ("ordinary", "correlation", "svd")
        }
        moved = " / ".join(f"{r0[f'{k}_bytes'] / 1024:.0f}" for k in ("ordinary", "correlation", "svd"))
        lines.append(
            f"| {b['model']} | {b['optimizer']} | {_mib(b['state_bytes'])} "
            f"| {_mib(shard)} + {_mib(r0['replicated_bytes'])} "
            f"| {r0['state_bytes'] / b['state_bytes']:.2f} | {times['ordinary']} | {times['correlation']} "
            f"| {times['svd']} | {moved} | {r0['whole_grad_bytes'] / 1024:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(
            "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fsdp2_step.py`"
            " (CPU, 2 gloo processes of one thread each, alone on the machine)\n\n" + table + "\n"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--quick", action="store_true", help="the MLP and CoapAdamW only, one repeat (a smoke run)")
    ap.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        inner(args.inner, args.quick)
    else:
        outer(args)


if __name__ == "__main__":
    main()
