"""Training quality, optimizer-state size, step time and peak memory of COAP against its baselines.

Two small tasks are trained with every optimizer on identical data, learning-rate schedule,
seeds and step budget:

* ``resnet``: timm ``resnet18`` (``in_chans=1, num_classes=10``, random init) on scikit-learn's
  digits at 16x16 (:func:`coap_plugins.examples.load_digits_tensors`, split seed 0), trained on
  the first 300 training images only, with random translations by up to 2 pixels (zero padding
  of 2, then a random 16x16 crop per image); batch 64, 300 steps, cosine schedule with 10 warm-up
  steps.  Metric: cross-entropy loss (headline, lower is better) and accuracy on the 450 test
  images, evaluated every 100 steps and at the end.
* ``unet``: :class:`coap_plugins.train.unet.UNet` (widths (32, 64, 100), one block per level,
  1.79M parameters: the nearest to 1.8M of the widths tried) trained as a DDPM (1000 steps,
  linear betas) on all 1,347 training digits at 16x16, scaled to [-1, 1] with the training
  images' min and max; batch 64, 500 steps, cosine schedule with 20 warm-up steps.  Metric:
  ``DDPM.heldout_loss`` on the 450 test images at timesteps 50, 150, 300, 500, 700, 900 with
  noise seed 0 (the same (timestep, noise) pairs for every optimizer), every 100 steps and at the
  end; lower is better.

Optimizers (the names in the tables): ``AdamW`` (torch), ``Adafactor`` (timm, ``betas=(0.9,
0.999)`` so it keeps a first moment), ``CoapAdamW``, ``CoapAdafactor`` (``beta1=0.9,
relative_step=False``), ``CoapAdamW8bit``, ``GaLoreAdamW`` (galore-torch: each 2-D weight in its own
group at ``rank = min(shape) // 4``, ``update_proj_gap=200, scale=0.25, proj_type="std"``; all
other tensors, convs included, in a plain group, since GaLore projects matrices only; not in the
default set), ``GaLoreConvAdamW`` (the same, and every conv weight projected too, its gradient
seen as the (O, I*k1*k2) matrix, at rank min(O, I*k1*k2) // 4: on the UNet, where COAP projects
every conv, GaLore on the layers COAP projects; on the ResNet it also projects the few convs
below COAP's ``min_conv_numel``) and ``AdamW8bit`` (bitsandbytes, its CPU path).  A COAP method may carry optimizer
options in brackets, e.g. ``CoapAdamW[restore_state=true,basis_alignment=sign]`` or
``CoapAdamW8bit[rank_ratio=8]``, ``CoapAdamW[update_scale=1.0,residual=none]`` (the paper's
update): each spec is its own row.  COAP runs at ``rank_ratio_matrix=4, rank_ratio_conv=4,
update_interval=32, reproject_factor=5`` and the optimizers' own defaults otherwise; on the UNet with
``min_conv_numel=0`` so its small convs are projected too; on the ResNet with the defaults (the
optimizer routes every tensor itself).  Learning rates: 2e-3 for the Adam family on both tasks;
1e-2 for the Adafactor family on the ResNet and 5e-3 on the UNet (a check at 1e-2 showed timm's
Adafactor collapsing there: train MSE stuck at 1.0 from step ~30 on; 5e-3 was stable; both
Adafactor-family methods use the same lr); weight decay 0.05 (Adam family, on every tensor) and 0
(Adafactor family).  Every method uses the same schedule: linear warm-up, then cosine to 0.

Fairness: for a seed, ``torch.manual_seed(seed)`` runs right before the model is built, so every
method starts from the same weights; the batch indices, the augmentation and the diffusion
noise/timesteps of step ``s`` come from a ``torch.Generator`` seeded by ``(seed, s)``, so every
method sees the same batches.  Each (task, method, seed) runs in a fresh subprocess
(``--worker``), so its peak resident memory (``ru_maxrss``) is its own; torch runs on
``--threads`` threads (default 1: steadier on a shared machine).  Jobs run seed-major with the
methods interleaved within a seed, so load from other processes falls on all methods alike.

Measured per run: the final metric(s); optimizer-state bytes, counted from ``optimizer.state``
after training (every tensor, also those inside objects such as GaLore's projector, shared
tensors once); the full-rank AdamW state of the model (8 bytes per trainable element), against
which ``state / AdamW`` is taken; step time (batch assembly, forward, backward, optimizer step;
median over the steps after the first 3); peak RSS; a learning curve (mean train loss of every
10 steps, and the eval metric).  In the tables, ``time / AdamW`` is the ratio of the median step
times of the method and of AdamW, all seeds pooled, measured in the same invocation.

Sweep (``--sweep``, on by default, off with ``--quick`` or ``--no-sweep``): the UNet task with
CoapAdamW at rank ratio {2, 4, 8} x update interval {8, 32, 128} (reproject factor 5), seed 0
(``--sweep-seeds``); held-out MSE and state bytes relative to AdamW's result for the same seed.
Runs the main table already holds (CoapAdamW at 4 / 32, AdamW) are reused, not run again.

Paired differences: for each seed, a method's metric over AdamW's of the same seed (and, for
the Adafactor family, over Adafactor's), minus 1, with mean and std over the seeds: the seed
noise common to both cancels.  ``--lr-adam`` / ``--wd-adam`` set the Adam family's lr and weight
decay (default 2e-3 / 0.05; DDPM's own are 2e-4 / 0.01); tables are per (task, setting, steps).

Outputs in ``--out`` (default docs/results): ``quality.md`` (also printed), ``quality.json`` (all
raw results and the frontier points), ``runs.jsonl`` (each run appended as it finishes),
``quality_<task>.png`` (learning curves, mean over seeds), ``frontier.png`` (the memory-quality
frontier: x = optimizer state / AdamW's, y = metric / AdamW's paired by seed, error bars = std
over seeds, one panel per task and setting) and ``memory.png`` (optimizer-state bytes per method
and task).  ``--include FILE`` (repeatable) merges the runs of earlier invocations (their
quality.json or runs.jsonl) into the tables, and a planned run they already hold is not run
again (``--report-only``: nothing is run, the tables show the included runs alone);
``--tag NAME`` appends `` (NAME)`` to the COAP methods' labels (to compare another version of
the package, run from its own checkout).  ``--quick`` is a smoke test: 1 seed, 6 steps per
task, eval at the end on the first 64 test images, no sweep, 2 runs at a time; it writes the same
files.  ``--jobs N`` runs N workers at a time (default 1; above 1 the step times and their
ratios are not comparable).

The full run (21 ResNet runs, 21 UNet runs, 8 more sweep runs, one at a time) takes roughly
3.5 hours on 2 shared cores (a ResNet run about 1.5-2.5 minutes, a UNet run about 6 minutes).

    python benchmarks/quality.py [--quick] [--out DIR] [--tasks resnet,unet] [--methods A,B[k=v]]
        [--seeds 0,1,2] [--steps-resnet N] [--steps-unet N] [--threads N] [--jobs N]
        [--sweep | --no-sweep] [--sweep-seeds 0] [--lr-adam LR] [--wd-adam WD] [--tag NAME]
        [--include FILE]...
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from optimizer_step import cpu_model  # noqa: E402  (benchmarks/, run as scripts)

METHODS = [
    "AdamW",
    "Adafactor",
    "CoapAdamW",
    "CoapAdafactor",
    "CoapAdamW8bit",
    "GaLoreAdamW",
    "GaLoreConvAdamW",
    "AdamW8bit",
]
# the default set: every method, GaLore once (with its convs flattened and projected)
DEFAULT_METHODS = [m for m in METHODS if m != "GaLoreAdamW"]
COAP_METHODS = {"CoapAdamW", "CoapAdafactor", "CoapAdamW8bit"}
ADAFACTOR_FAMILY = {"Adafactor", "CoapAdafactor"}
TASKS = {
    "resnet": SimpleNamespace(
        steps=300, warmup=10, eval_every=100, batch=64, train_images=300, metric="test loss", lower_is_better=True
    ),
    "unet": SimpleNamespace(
        steps=500, warmup=20, eval_every=100, batch=64, train_images=None, metric="held-out MSE", lower_is_better=True
    ),
}
UNET_WIDTHS, UNET_BLOCKS = (32, 64, 100), 1
EVAL_TIMESTEPS = [50, 150, 300, 500, 700, 900]
# Adafactor at 1e-2 collapsed on the UNet in a check (train MSE stuck at 1.0 from step ~30 on):
# the Adafactor family runs at 5e-3 there (stable over the first 150 steps of the 500-step schedule)
LR = {"resnet": {"adam": 2e-3, "adafactor": 1e-2}, "unet": {"adam": 2e-3, "adafactor": 5e-3}}
WEIGHT_DECAY = {"adam": 0.05, "adafactor": 0.0}
COAP = dict(rank_ratio_matrix=4, rank_ratio_conv=4, update_interval=32, reproject_factor=5)
GALORE = dict(update_proj_gap=200, scale=0.25, proj_type="std")
SWEEP_RATIOS, SWEEP_INTERVALS = (2, 4, 8), (8, 32, 128)
QUICK_STEPS = 6
QUICK_EVAL_IMAGES = 64  # --quick evaluates on the first 64 test images only (a smoke test)
SKIP_STEPS = 3  # first steps left out of the step-time median (set-up, warm-up)
TRAIN_LOG_EVERY = 10


# ----------------------------------------------------------------------------- data and models


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of everything random in training step ``step`` of seed ``seed``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def load_task_data(task: str, test_images: int | None = None) -> dict[str, torch.Tensor]:
    """Train/test tensors of a task (ResNet: normalized images; UNet: images in [-1, 1]); only the
    first ``test_images`` test images when given."""
    from coap_plugins.examples import load_digits_tensors

    data = load_digits_tensors(size=16, seed=0)
    x_test, y_test = data.x_test[:test_images], data.y_test[:test_images]
    if task == "resnet":
        n = TASKS["resnet"].train_images
        return dict(x_train=data.x_train[:n], y_train=data.y_train[:n], x_test=x_test, y_test=y_test)
    lo, hi = data.x_train.min(), data.x_train.max()
    return dict(x_train=(data.x_train - lo) / (hi - lo) * 2 - 1, x_test=(x_test - lo) / (hi - lo) * 2 - 1)


def translate(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels: zero-pad by ``pad``, crop a random window back."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (x.shape[0], 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def build_model(task: str, seed: int) -> torch.nn.Module:
    """The task's network, initialized from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    if task == "resnet":
        import timm

        return timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=10)
    from coap_plugins.train.unet import UNet

    return UNet(1, UNET_WIDTHS, blocks_per_level=UNET_BLOCKS)


# ----------------------------------------------------------------------------- optimizers


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"CoapAdamW[restore_state=true,rank_ratio=8]"`` -> ``("CoapAdamW", {...})``.

    Options are keyword arguments of a COAP optimizer (``rank_ratio`` and ``update_interval``
    set the rank ratios and T_u); values are JSON literals (``true``, ``0.5``) or bare strings.
    A label ``"SPEC (TAG)"`` (runs of another version, see ``--tag``) parses as its ``SPEC``.
    """
    spec = spec.split(" (")[0]
    base, _, rest = spec.partition("[")
    if base not in METHODS:
        raise ValueError(f"Invalid method: {base!r} (expected one of {', '.join(METHODS)})")
    options: dict[str, Any] = {}
    if rest:
        if not rest.endswith("]") or base not in COAP_METHODS:
            raise ValueError(f"Invalid method spec: {spec!r} (options are Coap*[key=value,...])")
        for item in filter(None, (x.strip() for x in rest[:-1].split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"Invalid option {item!r} in {spec!r} (expected key=value)")
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value
    return base, options


def base_of(label: str) -> str:
    """The method a label names: ``"CoapAdamW[restore_state=true] (v1)"`` -> ``"CoapAdamW"``."""
    return parse_method(label)[0]


def family(method: str) -> str:
    return "adafactor" if base_of(method) in ADAFACTOR_FAMILY else "adam"


def label_of(method: str, args: argparse.Namespace) -> str:
    """The table label of ``method``'s runs in this invocation: a COAP method gets the ``--tag``;
    a label that already carries one is kept."""
    if " (" in method or base_of(method) not in COAP_METHODS:
        return method
    return method + args.label_tag


def coap_kwargs(task: str, job: dict[str, Any]) -> dict[str, Any]:
    options = dict(parse_method(job["method"])[1])
    ratio = options.pop("rank_ratio", job["rank_ratio"])
    kw = dict(
        COAP,
        rank_ratio_matrix=ratio,
        rank_ratio_conv=ratio,
        update_interval=options.pop("update_interval", job["update_interval"]),
    )
    if task == "unet":
        kw["min_conv_numel"] = 0  # the UNet's convs are small: project them too
    kw.update(options)
    return kw


def galore_groups(model: torch.nn.Module, ratio: int, convs: bool) -> list[dict[str, Any]]:
    """One group per projected weight at rank min(rows, cols) // ratio, the rest in one plain
    group.  2-D weights always; with ``convs`` also 4-D conv weights, as (O, I k1 k2) matrices."""
    params = [p for p in model.parameters() if p.requires_grad]

    def projected(p: torch.Tensor) -> bool:
        return p.dim() == 2 or (convs and p.dim() == 4 and min(p.shape[0], p[0].numel()) // ratio >= 1)

    def rank(p: torch.Tensor) -> int:
        return max(1, min(p.shape[0], p[0].numel()) // ratio)

    groups = [dict(params=[p], rank=rank(p), **GALORE) for p in params if projected(p)]
    rest = [p for p in params if not projected(p)]
    return groups + ([dict(params=rest)] if rest else [])


def galore_flatten_convs(opt: torch.optim.Optimizer) -> None:
    """Give each projected conv weight of a GaLore optimizer a projector that sees its gradient
    as the (O, I k1 k2) matrix and hands the update back in the weight's shape (galore-torch
    creates a projector only for a parameter whose state has none)."""
    from galore_torch.galore_projector import GaLoreProjector

    class FlatProjector(GaLoreProjector):
        def project(self, full_rank_grad, iter):
            self.weight_shape = full_rank_grad.shape
            return super().project(full_rank_grad.reshape(full_rank_grad.shape[0], -1), iter)

        def project_back(self, low_rank_grad):
            return super().project_back(low_rank_grad).reshape(self.weight_shape)

    for group in opt.param_groups:
        if "rank" in group:
            for p in group["params"]:
                if p.dim() == 4:
                    opt.state[p]["projector"] = FlatProjector(
                        group["rank"],
                        update_proj_gap=group["update_proj_gap"],
                        scale=group["scale"],
                        proj_type=group["proj_type"],
                    )


def build_optimizer(method: str, model: torch.nn.Module, task: str, job: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer ``method`` (a spec, see :func:`parse_method`) at the job's lr and decay."""
    base_method, _ = parse_method(method)
    lr, wd = job["lr"], job["weight_decay"]
    params = [p for p in model.parameters() if p.requires_grad]
    if base_method == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if base_method == "Adafactor":
        from timm.optim import Adafactor

        return Adafactor(params, lr=lr, betas=(0.9, 0.999), weight_decay=wd)
    if base_method in ("CoapAdamW", "CoapAdamW8bit"):
        from coap_plugins.optim import CoapAdamW, CoapAdamW8bit

        cls = CoapAdamW if base_method == "CoapAdamW" else CoapAdamW8bit
        return cls(params, lr=lr, weight_decay=wd, **coap_kwargs(task, job))
    if base_method == "CoapAdafactor":
        from coap_plugins.optim import CoapAdafactor

        # timm's Adafactor applies an explicit lr as is (its parameter scaling only acts with
        # relative_step); scale_parameter=False gives CoapAdafactor the same step size
        return CoapAdafactor(
            params,
            lr=lr,
            beta1=0.9,
            relative_step=False,
            scale_parameter=False,
            weight_decay=wd,
            **coap_kwargs(task, job),
        )
    if base_method in ("GaLoreAdamW", "GaLoreConvAdamW"):
        from galore_torch import GaLoreAdamW

        convs = base_method == "GaLoreConvAdamW"
        groups = galore_groups(model, job["rank_ratio"], convs)
        opt = GaLoreAdamW(groups, lr=lr, weight_decay=wd, no_deprecation_warning=True)
        if convs:
            galore_flatten_convs(opt)
        return opt
    from bitsandbytes.optim import AdamW8bit

    return AdamW8bit(params, lr=lr, weight_decay=wd)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def set_lr(opt: torch.optim.Optimizer, base: list[float], factor: float) -> None:
    for group, lr in zip(opt.param_groups, base):
        group["lr"] = lr * factor


def tensor_bytes(value: Any, seen: set[int], ptrs: set[tuple[int, int]], depth: int = 0) -> int:
    """Bytes of every tensor reachable from ``value`` (containers and object attributes), each
    storage once: bitsandbytes shares its code maps, GaLore keeps P inside a projector object."""
    if depth > 6 or id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        key = (value.data_ptr(), value.nbytes)
        if value.nbytes == 0 or key in ptrs:
            return 0
        ptrs.add(key)
        return value.nbytes
    if isinstance(value, dict):
        children = list(value.values())
    elif isinstance(value, (list, tuple, set)):
        children = list(value)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        children = list(vars(value).values())
    else:
        return 0
    return sum(tensor_bytes(v, seen, ptrs, depth + 1) for v in children)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of all tensors held in ``opt.state``."""
    seen: set[int] = set()
    ptrs: set[tuple[int, int]] = set()
    return sum(tensor_bytes(st, seen, ptrs) for st in opt.state.values())


# ----------------------------------------------------------------------------- one training run


def train_step(task: str, model, data: dict, gen: torch.Generator, batch: int, ddpm) -> torch.Tensor:
    """The loss of one batch; indices, augmentation and noise all come from ``gen``."""
    idx = torch.randperm(len(data["x_train"]), generator=gen)[:batch]
    if task == "resnet":
        x = translate(data["x_train"][idx], gen)
        return F.cross_entropy(model(x), data["y_train"][idx])
    return ddpm.loss(model, data["x_train"][idx], generator=gen)


@torch.no_grad()
def evaluate(task: str, model, data: dict, ddpm) -> dict[str, float]:
    """Test loss and accuracy (ResNet) or the held-out denoising MSE (UNet)."""
    if task == "unet":
        return {"heldout_mse": ddpm.heldout_loss(model, data["x_test"], EVAL_TIMESTEPS, seed=0)}
    was_training = model.training
    model.eval()
    logits = model(data["x_test"])
    model.train(was_training)
    return {
        "test_loss": F.cross_entropy(logits, data["y_test"]).item(),
        "test_accuracy": (logits.argmax(1) == data["y_test"]).float().mean().item(),
    }


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (task, method, seed) and return its measurements."""
    task, method, seed, steps = job["task"], job["method"], job["seed"], job["steps"]
    cfg = TASKS[task]
    data = load_task_data(task, job["test_images"])
    model = build_model(task, seed)
    ddpm = None
    if task == "unet":
        from coap_plugins.train.unet import DDPM

        ddpm = DDPM(timesteps=1000)
    opt = build_optimizer(method, model, task, job)
    base = [g["lr"] for g in opt.param_groups]
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times, losses, train_curve, eval_curve = [], [], [], []
    start = time.perf_counter()
    for step in range(steps):
        gen = step_generator(seed, step)
        set_lr(opt, base, lr_factor(step, steps, min(cfg.warmup, steps)))
        t0 = time.perf_counter()
        loss = train_step(task, model, data, gen, cfg.batch, ddpm)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if (step + 1) % TRAIN_LOG_EVERY == 0 or step + 1 == steps:
            tail = losses[-((step % TRAIN_LOG_EVERY) + 1) :]
            train_curve.append([step + 1, sum(tail) / len(tail)])
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            eval_curve.append([step + 1, evaluate(task, model, data, ddpm)])
    timed = times[SKIP_STEPS:] or times
    return dict(
        job,
        params=numel,
        final=eval_curve[-1][1],
        state_bytes=state_bytes(opt),
        adamw_bytes=8 * numel,
        step_ms=[t * 1e3 for t in timed],
        median_step_ms=statistics.median(timed) * 1e3,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        wall_seconds=time.perf_counter() - start,
        train_curve=train_curve,
        eval_curve=eval_curve,
        threads=torch.get_num_threads(),
    )


def worker(job_json: str, result: str, threads: int) -> None:
    torch.set_num_threads(threads)
    job = json.loads(job_json)
    out = run_job(job)
    Path(result).write_text(json.dumps(out) + "\n")


# ----------------------------------------------------------------------------- scheduling


def make_job(
    task: str,
    method: str,
    seed: int,
    steps: int,
    args: argparse.Namespace,
    ratio: int = 4,
    interval: int = 32,
    sweep: bool = False,
) -> dict[str, Any]:
    fam = family(method)
    lr = args.lr_adam if fam == "adam" and args.lr_adam is not None else LR[task][fam]
    wd = args.wd_adam if fam == "adam" and args.wd_adam is not None else WEIGHT_DECAY[fam]
    return dict(
        task=task,
        method=method,
        label=label_of(method, args),
        seed=seed,
        steps=steps,
        test_images=args.test_images,
        rank_ratio=ratio,
        update_interval=interval,
        sweep=sweep,
        lr=lr,
        weight_decay=wd,
        setting=setting_of(task, args),
    )


def setting_of(task: str, args: argparse.Namespace | None = None) -> str:
    """The Adam family's lr and weight decay of a task's runs (``args``' or the defaults): the
    tables compare runs of one setting."""
    lr = args.lr_adam if args is not None and args.lr_adam is not None else LR[task]["adam"]
    wd = args.wd_adam if args is not None and args.wd_adam is not None else WEIGHT_DECAY["adam"]
    return f"lr {lr:g}, wd {wd:g}"


def job_key(job: dict[str, Any]) -> tuple:
    return tuple(
        job.get(k)
        for k in (
            "task",
            "label",
            "seed",
            "steps",
            "rank_ratio",
            "update_interval",
            "lr",
            "weight_decay",
            "test_images",
        )
    )


def sweep_points(grid: str) -> list[tuple[int, int]]:
    """``full``: every (rank ratio, update interval) pair; ``plus``: each ratio at T_u 32 and each
    interval at ratio 4 (five points, the centre shared: a third of the cost)."""
    if grid == "full":
        return [(r, t) for r in SWEEP_RATIOS for t in SWEEP_INTERVALS]
    return [(r, 32) for r in SWEEP_RATIOS] + [(4, t) for t in SWEEP_INTERVALS if t != 32]


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Main jobs seed-major, methods interleaved within a seed; then the sweep's new jobs."""
    jobs = [
        make_job(task, method, seed, args.steps[task], args)
        for seed in args.seeds
        for task in args.tasks
        for method in args.methods
    ]
    if args.sweep:
        have = {job_key(j) for j in jobs}
        for seed in args.sweep_seeds:
            for ratio, interval in sweep_points(args.sweep_grid):
                job = make_job("unet", "CoapAdamW", seed, args.steps["unet"], args, ratio, interval, sweep=True)
                if job_key(job) not in have:
                    jobs.append(job)
                    have.add(job_key(job))
            base = make_job("unet", "AdamW", seed, args.steps["unet"], args, sweep=True)
            if job_key(base) not in have:  # the sweep's reference
                jobs.append(base)
                have.add(job_key(base))
    return jobs


def load_included(paths: list[str]) -> list[dict[str, Any]]:
    """Results of earlier invocations (quality.json, or the runs.jsonl each invocation appends to
    as runs finish), the later file winning on a repeated run."""
    found: dict[tuple, dict[str, Any]] = {}
    for spec in paths:
        path, _, tag = spec.partition("#")  # FILE#TAG: its COAP runs labelled " (TAG)"
        text = Path(path).read_text()
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)["results"]
        for r in rows:
            # files written before labels and per-run settings: the defaults they ran with
            r.setdefault("label", r["method"])
            if tag and base_of(r["label"]) in COAP_METHODS and r["label"] == r["method"]:
                r["label"] = f"{r['method']} ({tag})"
            fam = family(r["method"])
            r.setdefault("lr", LR[r["task"]][fam])
            r.setdefault("weight_decay", WEIGHT_DECAY[fam])
            r.setdefault("setting", setting_of(r["task"]))
            found[job_key(r)] = r
    return list(found.values())


def launch(job: dict[str, Any], threads: int, tmp: str, index: int) -> dict[str, Any]:
    """Run one job in a fresh interpreter and read its JSON result."""
    result = os.path.join(tmp, f"job{index}.json")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        json.dumps(job),
        "--result",
        result,
        "--threads",
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed (exit {proc.returncode}) on job {job!r}:\n{proc.stderr[-3000:]}")
    return json.loads(Path(result).read_text())


def launch_logged(job: dict[str, Any], threads: int, tmp: str, index: int, total: int, log: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = launch(job, threads, tmp, index)
    with log.open("a") as f:  # every finished run at once: an interrupted invocation keeps them
        f.write(json.dumps(res) + "\n")
    metric = ", ".join(f"{k} {v:.4f}" for k, v in res["final"].items())
    print(
        f"[{index + 1}/{total}] {job['task']} {job['label']} seed {job['seed']} r{job['rank_ratio']} "
        f"T{job['update_interval']} {job['setting']}: {metric}; {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return res


def run_all(jobs: list[dict[str, Any]], threads: int, parallel: int, log: Path) -> list[dict[str, Any]]:
    """Results of ``jobs`` in order, ``parallel`` worker processes at a time (1: one after another);
    each result is also appended to ``log`` (JSON lines) as soon as it is in."""
    from concurrent.futures import ThreadPoolExecutor

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(launch_logged, job, threads, tmp, i, len(jobs), log) for i, job in enumerate(jobs)]
        return [f.result() for f in futures]


# ----------------------------------------------------------------------------- tables


def headline(task: str) -> str:
    return "test_loss" if task == "resnet" else "heldout_mse"


def mean_std(values: list[float], digits: int = 4) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def groups_of(results: list[dict]) -> list[tuple[str, str, int]]:
    """(task, setting, steps) of the main runs, in the order they first appear."""
    seen: dict[tuple[str, str, int], None] = {}
    for r in results:
        if not r["sweep"]:
            seen.setdefault((r["task"], r.get("setting") or "", r["steps"]), None)
    return list(seen)


def main_runs(results: list[dict], group: tuple[str, str, int], label: str) -> list[dict]:
    task, setting, steps = group
    return [
        r
        for r in results
        if (r["task"], r.get("setting") or "", r["steps"]) == group and r["label"] == label and not r["sweep"]
    ]


def labels_of(results: list[dict], group: tuple[str, str, int], first: list[str]) -> list[str]:
    """Labels with main runs in ``group``: those of ``first`` in its order, then the others as found."""
    found = {r["label"]: None for r in results if main_runs(results, group, r["label"])}
    return [x for x in first if x in found] + [x for x in found if x not in first]


def baseline_label(label: str) -> str:
    """What a method is paired against: Adafactor for the Adafactor family, AdamW otherwise."""
    return "Adafactor" if base_of(label) in ADAFACTOR_FAMILY else "AdamW"


def paired(runs: list[dict], ref: list[dict], key: str) -> list[float]:
    """Per seed present in both: the run's metric over the reference's."""
    by_seed = {r["seed"]: r["final"][key] for r in ref}
    return [r["final"][key] / by_seed[r["seed"]] for r in runs if r["seed"] in by_seed]


def pooled_median(runs: list[dict]) -> float:
    return statistics.median(t for r in runs for t in r["step_ms"])


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "-"


def paired_cell(ratios: list[float]) -> str:
    """``+1.2 ± 0.4 (3)``: mean and spread over seeds of the paired difference, in percent."""
    if not ratios:
        return "-"
    diffs = [100 * (x - 1) for x in ratios]
    spread = f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
    return f"{statistics.fmean(diffs):+.1f}{spread} ({len(diffs)})"


def task_table(results: list[dict], group: tuple[str, str, int], labels: list[str]) -> list[str]:
    task = group[0]
    key = headline(task)
    head = [
        "method",
        f"{TASKS[task].metric} mean ± std ({{n}})",
        f"{TASKS[task].metric} / AdamW",
        "paired Δ % vs AdamW (seeds)",
        "paired Δ % vs own baseline",
    ]
    if task == "resnet":
        head.append("test accuracy % mean ± std")
    head += ["state MiB", "state / AdamW", "time/step ms", "time / AdamW", "peak RSS MiB"]
    ref = main_runs(results, group, "AdamW")
    ref_metric = statistics.fmean(r["final"][key] for r in ref) if ref else None
    ref_time = pooled_median(ref) if ref else None
    rows, seeds = [], set()
    for label in labels_of(results, group, labels):
        runs = main_runs(results, group, label)
        seeds |= {r["seed"] for r in runs}
        metric = [r["final"][key] for r in runs]
        own = main_runs(results, group, baseline_label(label))
        cells = [
            label,
            mean_std(metric),
            ratio(statistics.fmean(metric), ref_metric),
            paired_cell(paired(runs, ref, key)) if label != "AdamW" else "-",
            paired_cell(paired(runs, own, key)) if baseline_label(label) not in ("AdamW", label) else "-",
        ]
        if task == "resnet":
            cells.append(mean_std([100 * r["final"]["test_accuracy"] for r in runs], 2))
        state = statistics.fmean(r["state_bytes"] for r in runs)
        t = pooled_median(runs)
        cells += [
            f"{state / 2**20:.2f}",
            f"{state / runs[0]['adamw_bytes']:.3f}",
            f"{t:.1f}",
            ratio(t, ref_time),
            f"{max(r['peak_rss_bytes'] for r in runs) / 2**20:.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    head[1] = head[1].format(n=f"{len(seeds)} seed" + "s" * (len(seeds) != 1))
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows]


def sweep_rows(
    results: list[dict], seeds: list[int], steps: int, tag: str = "", setting: str | None = None
) -> list[dict[str, Any]]:
    """One row per (seed, rank ratio, update interval) of the sweep, with ratios to AdamW's run
    (of the Adam-family ``setting`` when given)."""

    def find(label: str, seed: int, r: int = 4, t: int = 32) -> dict | None:
        return next(
            (
                x
                for x in results
                if x["task"] == "unet"
                and x["label"] == label
                and (setting is None or x.get("setting") == setting)
                and (x["seed"], x["steps"], x["rank_ratio"], x["update_interval"]) == (seed, steps, r, t)
            ),
            None,
        )

    rows = []
    for seed in seeds:
        ref = find("AdamW", seed)
        for r, t in sweep_points("full"):
            x = find("CoapAdamW" + tag, seed, r, t)
            if x is None:
                continue
            mse = x["final"]["heldout_mse"]
            rows.append(
                dict(
                    seed=seed,
                    rank_ratio=r,
                    update_interval=t,
                    heldout_mse=mse,
                    state_bytes=x["state_bytes"],
                    median_step_ms=x["median_step_ms"],
                    mse_vs_adamw=mse / ref["final"]["heldout_mse"] if ref else None,
                    state_vs_adamw=x["state_bytes"] / ref["state_bytes"] if ref else None,
                )
            )
    return rows


def sweep_table(rows: list[dict[str, Any]]) -> list[str]:
    head = [
        "rank ratio",
        "update interval",
        "seed",
        "held-out MSE",
        "MSE / AdamW",
        "state MiB",
        "state / AdamW",
        "time/step ms",
    ]

    def rel(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for x in rows:
        cells = [
            str(x["rank_ratio"]),
            str(x["update_interval"]),
            str(x["seed"]),
            f"{x['heldout_mse']:.4f}",
            rel(x["mse_vs_adamw"]),
            f"{x['state_bytes'] / 2**20:.2f}",
            rel(x["state_vs_adamw"]),
            f"{x['median_step_ms']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        command=shlex.join([sys.executable] + sys.argv),
        torch=torch.__version__,
        cpu=cpu_model(),
        cores=os.cpu_count(),
        threads=args.threads,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        load_average_at_start=os.getloadavg()[0],
    )


def task_intro(task: str, args: argparse.Namespace, params: int | None, steps: int) -> str:
    cfg = TASKS[task]
    test = f"first {args.test_images}" if args.test_images else "450"
    if task == "resnet":
        what = (
            f"timm resnet18 (1 input channel, 10 classes, {params or 0:,} parameters), first {cfg.train_images} "
            "training digits at 16x16 with random 2-pixel translations; metric: cross-entropy on the "
            f"{test} test images (lower is better), and accuracy"
        )
    else:
        what = (
            f"DDPM UNet widths {UNET_WIDTHS}, {UNET_BLOCKS} block per level ({params or 0:,} parameters), "
            f"digits at 16x16 in [-1, 1]; metric: held-out noise-prediction MSE of the {test} test images at "
            f"timesteps {EVAL_TIMESTEPS}, noise seed 0 (lower is better)"
        )
    return f"{what}; batch {cfg.batch}, {steps} steps, cosine schedule, warm-up {min(cfg.warmup, steps)}."


def heading(group: tuple[str, str, int], args: argparse.Namespace) -> str:
    """``unet`` for the invocation's own setting and step count, else ``unet (lr 0.0002, wd 0.01, 500 steps)``."""
    task, setting, steps = group
    if setting == setting_of(task, args) and steps == args.steps[task]:
        return task
    return f"{task} (Adam family {setting}, {steps} steps)"


def markdown(results: list[dict], args: argparse.Namespace, env: dict[str, Any], sweep: list[dict]) -> str:
    lines = [
        "# Optimizer quality benchmark",
        "",
        f"Command: `{env['command']}`",
        "",
        f"Machine: {env['cpu']} ({env['cores']} cores); torch {env['torch']}, {env['threads']} thread(s) per "
        f"run, {args.jobs} run(s) at a time; {env['date']}; 1-minute load average at start "
        f"{env['load_average_at_start']:.2f}",
        "",
    ]
    if args.include:
        lines += [f"Runs of earlier invocations included from: {', '.join(f'`{x}`' for x in args.include)}.", ""]
    for group in groups_of(results):
        task = group[0]
        params = next((r["params"] for r in results if r["task"] == task), None)
        lines += [
            f"## {heading(group, args)}",
            "",
            task_intro(task, args, params, group[2]),
            "",
            *task_table(results, group, args.labels),
            "",
        ]
    if args.sweep:
        lines += [
            "## Sweep: CoapAdamW on the UNet, rank ratio x update interval",
            "",
            "Reproject factor 5; ratios are relative to AdamW's result for the same seed.",
            "",
            *sweep_table(sweep),
            "",
        ]
    lines += [
        "Notes: lr 2e-3 (Adam family: AdamW, CoapAdamW, CoapAdamW8bit, GaLoreAdamW, GaLoreConvAdamW, AdamW8bit; "
        "weight decay 0.05) unless a heading says otherwise, and 1e-2 on the ResNet, 5e-3 on the UNet "
        "(Adafactor family: Adafactor, CoapAdafactor; no weight decay; timm's Adafactor collapsed at 1e-2 on "
        "the UNet); COAP rank ratio 4, update interval 32, reproject factor 5 (UNet: min_conv_numel=0), the "
        "optimizers' defaults otherwise (update_scale 'auto', residual 'scaled'; runs of an earlier version "
        "carry its tag) unless "
        "the method's [options] say otherwise; GaLore rank min(rows, cols)//4, update_proj_gap 200, scale 0.25, "
        "on 2-D weights only (GaLoreAdamW) or also on every conv weight seen as (O, I*k*k) (GaLoreConvAdamW). "
        "paired Δ = per seed, the method's metric over AdamW's (or, for the Adafactor family, Adafactor's) of "
        "the same seed, minus 1: mean ± std over the seeds both ran. state = bytes of all tensors in "
        "optimizer.state after training; state / AdamW = against 8 bytes per trainable element (torch AdamW's "
        "two fp32 moments). time/step = median wall time of batch assembly + forward + backward + optimizer "
        f"step, first {SKIP_STEPS} steps of each run excluded, seeds pooled; time / AdamW = ratio of those "
        "medians (comparable only between runs of one invocation). peak RSS = ru_maxrss of the run's own "
        "process (the largest over seeds)."
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def mean_curve(runs: list[dict], key: str, metric: str | None = None) -> tuple[list[int], list[float]]:
    """Mean over seeds of a curve, at the steps every run logged."""
    curves = [{s: (v[metric] if metric else v) for s, v in r[key]} for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [statistics.fmean(c[s] for c in curves) for s in steps]


def slug(group: tuple[str, str, int], args: argparse.Namespace) -> str:
    task, setting, steps = group
    if heading(group, args) == task:
        return task
    return f"{task}_" + setting.replace("lr ", "lr").replace(", wd ", "_wd") + f"_{steps}"


def plot_task(results: list[dict], group: tuple[str, str, int], labels: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    task = group[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label in labels_of(results, group, labels):
        runs = main_runs(results, group, label)
        left.plot(*mean_curve(runs, "train_curve"), marker=".", markersize=4, label=label)
        right.plot(*mean_curve(runs, "eval_curve", headline(task)), marker="o", label=label)
    left.set(title=f"{task}: train loss (mean of 10 steps)", xlabel="step", ylabel="train loss", yscale="log")
    right.set(title=f"{task}: {TASKS[task].metric}", xlabel="step", ylabel=TASKS[task].metric, yscale="log")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier_points(results: list[dict], group: tuple[str, str, int], labels: list[str]) -> list[dict[str, Any]]:
    """Per label: state / AdamW (x) and the paired metric ratio to AdamW, mean and std over seeds (y)."""
    key = headline(group[0])
    ref = main_runs(results, group, "AdamW")
    points = []
    for label in labels_of(results, group, labels):
        runs = main_runs(results, group, label)
        ratios = paired(runs, ref, key)
        if not ratios:
            continue
        points.append(
            dict(
                label=label,
                state=statistics.fmean(r["state_bytes"] / r["adamw_bytes"] for r in runs),
                mean=statistics.fmean(ratios),
                std=statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                seeds=len(ratios),
            )
        )
    return points


def plot_frontier(results: list[dict], groups: list[tuple[str, str, int]], labels: list[str], path: Path) -> None:
    """The memory-quality frontier: one panel per (task, setting, steps); x = optimizer state over
    AdamW's, y = metric over AdamW's of the same seed (mean, error bar = std over seeds)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, group in zip(axes[0], groups):
        for i, pt in enumerate(frontier_points(results, group, labels)):
            color = colors[METHODS.index(base_of(pt["label"])) % len(colors)]
            ax.errorbar(pt["state"], pt["mean"], yerr=pt["std"], fmt="o", color=color, capsize=3)
            ax.annotate(
                pt["label"],
                (pt["state"], pt["mean"]),
                fontsize=6,
                xytext=(4, 2 + 3 * (i % 3)),
                textcoords="offset points",
            )
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        task, setting, steps = group
        ax.set(
            title=f"{task}, Adam family {setting}, {steps} steps",
            xlabel="optimizer state / AdamW's",
            ylabel=f"{TASKS[task].metric} / AdamW's (paired by seed)",
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(results: list[dict], groups: list[tuple[str, str, int]], labels: list[str], path: Path) -> None:
    """One panel (bar group) per task: mean optimizer-state MiB of each method, labelled x AdamW."""
    import matplotlib.pyplot as plt

    firsts = {}
    for group in groups:
        firsts.setdefault(group[0], group)
    fig, axes = plt.subplots(1, len(firsts), figsize=(5.5 * len(firsts), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (task, group) in zip(axes[0], firsts.items()):
        names = [x for x in labels_of(results, group, labels) if x in labels]
        runs = [main_runs(results, group, x) for x in names]
        mib = [statistics.fmean(r["state_bytes"] for r in rs) / 2**20 for rs in runs]
        full = runs[0][0]["adamw_bytes"] / 2**20 if runs else 1.0
        bars = ax.bar(range(len(names)), mib, color=[colors[METHODS.index(base_of(x)) % len(colors)] for x in names])
        ax.bar_label(bars, [f"{v / full:.2f}x" for v in mib], fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set(title=f"{task}: optimizer state after training", ylabel="MiB (label: x AdamW full rank)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: list[dict], args: argparse.Namespace, env: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sweep = (
        sweep_rows(results, args.sweep_seeds, args.steps["unet"], args.label_tag, setting_of("unet", args))
        if args.sweep
        else []
    )
    text = markdown(results, args, env, sweep)
    (out / "quality.md").write_text(text)
    settings = dict(
        tasks=args.tasks,
        methods=args.methods,
        seeds=args.seeds,
        steps=args.steps,
        sweep=args.sweep,
        sweep_seeds=args.sweep_seeds,
        unet_widths=list(UNET_WIDTHS),
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        lr_adam=args.lr_adam,
        wd_adam=args.wd_adam,
        coap=COAP,
        galore=GALORE,
        include=args.include,
        tag=args.tag,
    )
    groups = groups_of(results)
    frontier = {heading(g, args): frontier_points(results, g, args.labels) for g in groups}
    payload = dict(env, settings=settings, results=results, sweep=sweep, frontier=frontier)
    (out / "quality.json").write_text(json.dumps(payload, indent=1) + "\n")
    for group in groups:
        plot_task(results, group, args.labels, out / f"quality_{slug(group, args)}.png")
    plot_frontier(results, groups, args.labels, out / "frontier.png")
    plot_memory(results, groups, args.labels, out / "memory.png")
    return text


# ----------------------------------------------------------------------------- command line


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"Invalid integer list: {text!r} (expected e.g. 0,1,2)") from None
    if not values:
        raise argparse.ArgumentTypeError(f"Invalid integer list: {text!r} (empty)")
    return values


def split_specs(text: str) -> list[str]:
    """Comma-separated items, commas inside ``[...]`` kept: ``"AdamW,CoapAdamW[a=1,b=2]"``."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [x.strip() for x in items + [cur] if x.strip()]


def choice_list(valid: list[str]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in valid]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"Invalid choice(s): {bad or text!r} (expected some of {', '.join(valid)})"
            )
        return values

    return parse


def method_list(text: str) -> list[str]:
    specs = split_specs(text)
    if not specs:
        raise argparse.ArgumentTypeError(f"Invalid method list: {text!r} (empty)")
    for spec in specs:
        try:
            base, options = parse_method(spec)
            if options:  # the optimizer itself checks names and values, before any run starts
                import coap_plugins.optim as optim

                job = dict(method=spec, rank_ratio=4, update_interval=32)
                getattr(optim, base)([torch.nn.Parameter(torch.zeros(8, 8))], **coap_kwargs("resnet", job))
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(f"{spec}: {e}") from None
    return specs


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"Invalid value: {text!r} (must be a finite number >= 0)")
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"Invalid value: {text!r} (must be an integer >= 1)")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"smoke test: 1 seed, {QUICK_STEPS} steps per task, no sweep")
    p.add_argument("--out", default="docs/results", help="folder for quality.md/json and the plots")
    p.add_argument("--tasks", type=choice_list(list(TASKS)), default=list(TASKS))
    p.add_argument(
        "--methods",
        type=method_list,
        default=None,
        help="comma-separated; a COAP method may carry optimizer options: CoapAdamW[restore_state=true,rank_ratio=8]; "
        "with --report-only, the rows to show (AdamW and Adafactor are kept as the pairing baselines)",
    )
    p.add_argument("--seeds", type=int_list, default=None, help="default 0,1,2 (--quick: 0)")
    p.add_argument("--steps-resnet", type=positive, default=None)
    p.add_argument("--steps-unet", type=positive, default=None)
    p.add_argument("--threads", type=positive, default=1, help="torch threads per run (default 1)")
    p.add_argument(
        "--jobs",
        type=positive,
        default=None,
        help="runs at a time (default 1; --quick: 2); above 1 the timings are not comparable",
    )
    p.add_argument(
        "--sweep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="UNet CoapAdamW rank-ratio x update-interval sweep (default: on, off with --quick)",
    )
    p.add_argument("--sweep-seeds", type=int_list, default=[0])
    p.add_argument(
        "--sweep-grid",
        choices=("full", "plus"),
        default="full",
        help="full: 3x3 ratio x interval grid; plus: each ratio at T_u 32, each interval at ratio 4",
    )
    p.add_argument("--lr-adam", type=nonnegative_float, default=None, help="Adam family lr (default 2e-3)")
    p.add_argument("--wd-adam", type=nonnegative_float, default=None, help="Adam family weight decay (default 0.05)")
    p.add_argument(
        "--tag", default="", help="appended to the COAP methods' names, as ' (TAG)': runs of another version"
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        help="quality.json or runs.jsonl of an earlier invocation: its runs join the tables, and planned runs it "
        "already holds are not run again (repeatable); FILE#TAG labels its COAP runs ' (TAG)'",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write the tables and plots of the --include files alone",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = QUICK_STEPS if args.quick else None
    args.steps = {
        "resnet": args.steps_resnet or quick or TASKS["resnet"].steps,
        "unet": args.steps_unet or quick or TASKS["unet"].steps,
    }
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.jobs = args.jobs or (2 if args.quick else 1)
    args.test_images = QUICK_EVAL_IMAGES if args.quick else None
    args.sweep = (not args.quick and not args.report_only) if args.sweep is None else args.sweep
    args.sweep = args.sweep and "unet" in args.tasks
    args.methods_given = args.methods is not None
    args.methods = args.methods if args.methods_given else list(DEFAULT_METHODS)
    args.label_tag = f" ({args.tag})" if args.tag else ""
    args.labels = [label_of(m, args) for m in args.methods]
    tagged = [m for m in args.methods if " (" in m]
    if tagged and not args.report_only:
        p.error(f"--methods: {tagged[0]!r} is the label of included runs: give it with --report-only")
    for path in (x.partition("#")[0] for x in args.include):
        if not Path(path).is_file():
            p.error(f"--include: no such file: {path}")
    if args.report_only and not args.include:
        p.error("--report-only needs at least one --include")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.result, args.threads)
        return
    env = environment(args)
    start = time.perf_counter()
    included = load_included(args.include)
    planned = plan(args)
    main_keys = {job_key(j) for j in planned if not j["sweep"]}
    for r in included:  # a run an earlier sweep made serves as this invocation's main run too
        if job_key(r) in main_keys:
            r["sweep"] = False
    have = {job_key(r) for r in included}
    jobs = [] if args.report_only else [j for j in planned if job_key(j) not in have]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = included + run_all(jobs, args.threads, args.jobs, Path(args.out) / "runs.jsonl")
    if args.report_only and args.methods_given:
        shown = set(args.labels) | {"AdamW", "Adafactor"}
        results = [r for r in results if r["label"] in shown]
    text = write_outputs(results, args, env)
    print(text, end="")
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
