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
other tensors, convs included, in a plain group, since GaLore projects matrices only) and
``AdamW8bit`` (bitsandbytes, its CPU path).  COAP runs at ``rank_ratio_matrix=4,
rank_ratio_conv=4, update_interval=32, reproject_factor=5``; on the UNet with
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

Outputs in ``--out`` (default docs/results): ``quality.md`` (also printed), ``quality.json`` (all
raw results), ``quality_<task>.png`` (learning curves, mean over seeds) and ``memory.png``
(optimizer-state bytes per method and task).  ``--quick`` is a smoke test: 1 seed, 6 steps per
task, eval at the end on the first 64 test images, no sweep, 2 runs at a time; it writes the same
files.  ``--jobs N`` runs N workers at a time (default 1; above 1 the step times and their
ratios are not comparable).

The full run (21 ResNet runs, 21 UNet runs, 8 more sweep runs, one at a time) takes roughly
3.5 hours on 2 shared cores (a ResNet run about 1.5-2.5 minutes, a UNet run about 6 minutes).

    python benchmarks/quality.py [--quick] [--out DIR] [--tasks resnet,unet] [--methods A,B]
        [--seeds 0,1,2] [--steps-resnet N] [--steps-unet N] [--threads N] [--jobs N]
        [--sweep | --no-sweep] [--sweep-seeds 0]
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

METHODS = ["AdamW", "Adafactor", "CoapAdamW", "CoapAdafactor", "CoapAdamW8bit", "GaLoreAdamW", "AdamW8bit"]
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


def family(method: str) -> str:
    return "adafactor" if method in ADAFACTOR_FAMILY else "adam"


def coap_kwargs(task: str, job: dict[str, Any]) -> dict[str, Any]:
    kw = dict(
        COAP,
        rank_ratio_matrix=job["rank_ratio"],
        rank_ratio_conv=job["rank_ratio"],
        update_interval=job["update_interval"],
    )
    if task == "unet":
        kw["min_conv_numel"] = 0  # the UNet's convs are small: project them too
    return kw


def galore_groups(model: torch.nn.Module, ratio: int) -> list[dict[str, Any]]:
    """One group per 2-D weight at rank min(shape) // ratio, the rest in one plain group."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p], rank=max(1, min(p.shape) // ratio), **GALORE) for p in params if p.dim() == 2]
    rest = [p for p in params if p.dim() != 2]
    return groups + ([dict(params=rest)] if rest else [])


def build_optimizer(method: str, model: torch.nn.Module, task: str, job: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer ``method`` over the model's parameters, at its family's lr and decay."""
    lr, wd = LR[task][family(method)], WEIGHT_DECAY[family(method)]
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if method == "Adafactor":
        from timm.optim import Adafactor

        return Adafactor(params, lr=lr, betas=(0.9, 0.999), weight_decay=wd)
    if method in ("CoapAdamW", "CoapAdamW8bit"):
        from coap_plugins.optim import CoapAdamW, CoapAdamW8bit

        cls = CoapAdamW if method == "CoapAdamW" else CoapAdamW8bit
        return cls(params, lr=lr, weight_decay=wd, **coap_kwargs(task, job))
    if method == "CoapAdafactor":
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
    if method == "GaLoreAdamW":
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(galore_groups(model, job["rank_ratio"]), lr=lr, weight_decay=wd, no_deprecation_warning=True)
    if method == "AdamW8bit":
        from bitsandbytes.optim import AdamW8bit

        return AdamW8bit(params, lr=lr, weight_decay=wd)
    raise ValueError(f"Invalid method: {method!r} (expected one of {', '.join(METHODS)})")


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
    test_images: int | None,
    ratio: int = 4,
    interval: int = 32,
    sweep: bool = False,
) -> dict[str, Any]:
    return dict(
        task=task,
        method=method,
        seed=seed,
        steps=steps,
        test_images=test_images,
        rank_ratio=ratio,
        update_interval=interval,
        sweep=sweep,
    )


def job_key(job: dict[str, Any]) -> tuple:
    return tuple(job[k] for k in ("task", "method", "seed", "steps", "rank_ratio", "update_interval"))


def sweep_points(grid: str) -> list[tuple[int, int]]:
    """``full``: every (rank ratio, update interval) pair; ``plus``: each ratio at T_u 32 and each
    interval at ratio 4 (five points, the centre shared: a third of the cost)."""
    if grid == "full":
        return [(r, t) for r in SWEEP_RATIOS for t in SWEEP_INTERVALS]
    return [(r, 32) for r in SWEEP_RATIOS] + [(4, t) for t in SWEEP_INTERVALS if t != 32]


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Main jobs seed-major, methods interleaved within a seed; then the sweep's new jobs."""
    jobs = [
        make_job(task, method, seed, args.steps[task], args.test_images)
        for seed in args.seeds
        for task in args.tasks
        for method in args.methods
    ]
    if args.sweep:
        have = {job_key(j) for j in jobs}
        for seed in args.sweep_seeds:
            for ratio, interval in sweep_points(args.sweep_grid):
                job = make_job(
                    "unet", "CoapAdamW", seed, args.steps["unet"], args.test_images, ratio, interval, sweep=True
                )
                if job_key(job) not in have:
                    jobs.append(job)
                    have.add(job_key(job))
            base = make_job("unet", "AdamW", seed, args.steps["unet"], args.test_images, sweep=True)
            if job_key(base) not in have:  # the sweep's reference
                jobs.append(base)
                have.add(job_key(base))
    return jobs


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


def launch_logged(job: dict[str, Any], threads: int, tmp: str, index: int, total: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = launch(job, threads, tmp, index)
    metric = ", ".join(f"{k} {v:.4f}" for k, v in res["final"].items())
    print(
        f"[{index + 1}/{total}] {job['task']} {job['method']} seed {job['seed']} r{job['rank_ratio']} "
        f"T{job['update_interval']}: {metric}; {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return res


def run_all(jobs: list[dict[str, Any]], threads: int, parallel: int) -> list[dict[str, Any]]:
    """Results of ``jobs`` in order, ``parallel`` worker processes at a time (1: one after another)."""
    from concurrent.futures import ThreadPoolExecutor

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(parallel) as pool:
        futures = [pool.submit(launch_logged, job, threads, tmp, i, len(jobs)) for i, job in enumerate(jobs)]
        return [f.result() for f in futures]


# ----------------------------------------------------------------------------- tables


def headline(task: str) -> str:
    return "test_loss" if task == "resnet" else "heldout_mse"


def mean_std(values: list[float], digits: int = 4) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main_runs(results: list[dict], task: str, method: str) -> list[dict]:
    return [r for r in results if r["task"] == task and r["method"] == method and not r["sweep"]]


def pooled_median(runs: list[dict]) -> float:
    return statistics.median(t for r in runs for t in r["step_ms"])


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}" if a is not None and b else "-"


def task_table(results: list[dict], task: str, methods: list[str]) -> list[str]:
    key = headline(task)
    head = ["method", f"{TASKS[task].metric} mean ± std ({{n}})", f"{TASKS[task].metric} / AdamW"]
    if task == "resnet":
        head.append("test accuracy % mean ± std")
    head += ["state MiB", "state / AdamW", "time/step ms", "time / AdamW", "peak RSS MiB"]
    ref = main_runs(results, task, "AdamW")
    ref_metric = statistics.fmean(r["final"][key] for r in ref) if ref else None
    ref_time = pooled_median(ref) if ref else None
    rows = []
    for method in methods:
        runs = main_runs(results, task, method)
        if not runs:
            continue
        metric = [r["final"][key] for r in runs]
        cells = [method, mean_std(metric), ratio(statistics.fmean(metric), ref_metric)]
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
    n = len({r["seed"] for r in results if r["task"] == task and not r["sweep"]})
    head[1] = head[1].format(n=f"{n} seed" + "s" * (n != 1))
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows]


def sweep_rows(results: list[dict], seeds: list[int], steps: int) -> list[dict[str, Any]]:
    """One row per (seed, rank ratio, update interval) of the sweep, with ratios to AdamW's run."""

    def find(method: str, seed: int, r: int = 4, t: int = 32) -> dict | None:
        return next((x for x in results if job_key(x) == ("unet", method, seed, steps, r, t)), None)

    rows = []
    for seed in seeds:
        ref = find("AdamW", seed)
        for r, t in sweep_points("full"):
            x = find("CoapAdamW", seed, r, t)
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


def task_intro(task: str, args: argparse.Namespace, params: int | None) -> str:
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
    steps = args.steps[task]
    return f"{what}; batch {cfg.batch}, {steps} steps, cosine schedule, warm-up {min(cfg.warmup, steps)}."


def markdown(results: list[dict], args: argparse.Namespace, env: dict[str, Any]) -> str:
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
    for task in args.tasks:
        params = next((r["params"] for r in results if r["task"] == task), None)
        lines += [f"## {task}", "", task_intro(task, args, params), "", *task_table(results, task, args.methods), ""]
    if args.sweep:
        lines += [
            "## Sweep: CoapAdamW on the UNet, rank ratio x update interval",
            "",
            "Reproject factor 5; ratios are relative to AdamW's result for the same seed.",
            "",
            *sweep_table(sweep_rows(results, args.sweep_seeds, args.steps["unet"])),
            "",
        ]
    lines += [
        "Notes: lr 2e-3 (Adam family: AdamW, CoapAdamW, CoapAdamW8bit, GaLoreAdamW, AdamW8bit; weight decay "
        "0.05) and 1e-2 on the ResNet, 5e-3 on the UNet (Adafactor family: Adafactor, CoapAdafactor; no "
        "weight decay; timm's Adafactor collapsed at 1e-2 on the UNet); COAP rank ratio 4, "
        "update interval 32, reproject factor 5 (UNet: min_conv_numel=0); GaLore rank min(shape)//4 on 2-D "
        "weights only, update_proj_gap 200, scale 0.25. state = bytes of all tensors in optimizer.state after "
        "training; state / AdamW = against 8 bytes per trainable element (torch AdamW's two fp32 moments). "
        "time/step = median wall time of batch assembly + forward + backward + optimizer step, first "
        f"{SKIP_STEPS} steps of each run excluded, seeds pooled; time / AdamW = ratio of those medians in "
        "this invocation. peak RSS = ru_maxrss of the run's own process (the largest over seeds)."
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def mean_curve(runs: list[dict], key: str, metric: str | None = None) -> tuple[list[int], list[float]]:
    """Mean over seeds of a curve, at the steps every run logged."""
    curves = [{s: (v[metric] if metric else v) for s, v in r[key]} for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [statistics.fmean(c[s] for c in curves) for s in steps]


def plot_task(results: list[dict], task: str, methods: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        runs = main_runs(results, task, method)
        if runs:
            left.plot(*mean_curve(runs, "train_curve"), marker=".", markersize=4, label=method)
            right.plot(*mean_curve(runs, "eval_curve", headline(task)), marker="o", label=method)
    left.set(title=f"{task}: train loss (mean of 10 steps)", xlabel="step", ylabel="train loss", yscale="log")
    right.set(title=f"{task}: {TASKS[task].metric}", xlabel="step", ylabel=TASKS[task].metric, yscale="log")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(results: list[dict], tasks: list[str], methods: list[str], path: Path) -> None:
    """One panel (bar group) per task: mean optimizer-state MiB of each method, labelled x AdamW."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, task in zip(axes[0], tasks):
        names = [m for m in methods if main_runs(results, task, m)]
        runs = [main_runs(results, task, m) for m in names]
        mib = [statistics.fmean(r["state_bytes"] for r in rs) / 2**20 for rs in runs]
        full = runs[0][0]["adamw_bytes"] / 2**20 if runs else 1.0
        bars = ax.bar(range(len(names)), mib, color=[colors[methods.index(m) % len(colors)] for m in names])
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
    text = markdown(results, args, env)
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
        coap=COAP,
        galore=GALORE,
    )
    sweep = sweep_rows(results, args.sweep_seeds, args.steps["unet"]) if args.sweep else []
    payload = dict(env, settings=settings, results=results, sweep=sweep)
    (out / "quality.json").write_text(json.dumps(payload, indent=1) + "\n")
    for task in args.tasks:
        plot_task(results, task, args.methods, out / f"quality_{task}.png")
    plot_memory(results, args.tasks, args.methods, out / "memory.png")
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
    p.add_argument("--methods", type=choice_list(METHODS), default=list(METHODS))
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
    args.sweep = (not args.quick) if args.sweep is None else args.sweep
    args.sweep = args.sweep and "unet" in args.tasks
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.result, args.threads)
        return
    env = environment(args)
    start = time.perf_counter()
    results = run_all(plan(args), args.threads, args.jobs)
    text = write_outputs(results, args, env)
    print(text, end="")
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
