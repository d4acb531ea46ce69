"""Optimizer step and whole training step on a GPU: COAP against fused AdamW and 8-bit Adam.

Per model (torchvision ResNet-50 at 224x224 and the project's UNet at its CIFAR-10 width,
widths (128, 256, 256, 256), two blocks per level, 32x32) and per method (torch.optim.AdamW with
``fused=True``, bitsandbytes' AdamW8bit, CoapAdamW, CoapAdamW8bit, CoapAdafactor; COAP at rank
ratio 4, T_u=32, lambda=5):

* optimizer step alone, with the gradients of one backward kept fixed: an ordinary step, a
  correlation-update step and a recalibration (low-cost SVD) step (refreshes forced with
  ``request_refresh``), and the amortized step of the default schedule,
  ``(310 ordinary + 8 correlation + 2 svd) / 320``;
* the whole training step (zero_grad, forward and loss under bf16 autocast, backward, step) at
  ``--batch`` (default 128): ordinary, and amortized (the ordinary training step plus the
  optimizer's amortized minus its ordinary step);
* peak memory of the training steps, ``torch.cuda.max_memory_allocated``, per method.

Times are medians over ``--reps`` repetitions after warm-up, taken with CUDA events (each
repetition synchronizes once, after its events).  Without CUDA the script says so and measures
nothing; ``--dry-run`` runs every code path on the CPU with a tiny batch and images, to check the
script (its figures are not GPU figures and the table says so).

    python benchmarks/gpu_step.py [--batch 128] [--reps 20] [--models resnet50,unet] [--out PATH]
    python benchmarks/gpu_step.py --dry-run [--models resnet50]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from coap_plugins import CoapAdafactor, CoapAdamW, CoapAdamW8bit

COAP = dict(rank_ratio_matrix=4, rank_ratio_conv=4)
NEVER = 10**9  # an update_interval no run reaches: ordinary steps unless a refresh is requested
METHODS = ("AdamW fused", "bnb AdamW8bit", "CoapAdamW", "CoapAdamW8bit", "CoapAdafactor")
MODELS = ("resnet50", "unet")
LR = {"adam": 1e-3, "adafactor": 1e-2}


def make_optimizer(method: str, params: list, device: torch.device, interval: int) -> torch.optim.Optimizer:
    if method == "AdamW fused":
        return torch.optim.AdamW(params, lr=LR["adam"], fused=True)
    if method == "bnb AdamW8bit":
        from bitsandbytes.optim import AdamW8bit

        return AdamW8bit(params, lr=LR["adam"])
    if method == "CoapAdamW":
        return CoapAdamW(params, lr=LR["adam"], update_interval=interval, **COAP)
    if method == "CoapAdamW8bit":
        return CoapAdamW8bit(params, lr=LR["adam"], update_interval=interval, **COAP)
    if method == "CoapAdafactor":
        return CoapAdafactor(params, lr=LR["adafactor"], update_interval=interval, **COAP)
    raise ValueError(f"Invalid method: {method!r} (expected one of {', '.join(METHODS)})")


def make_model(name: str, device: torch.device, batch: int, dry: bool):
    """``(model, loss_fn)``; ``loss_fn(model)`` runs forward and loss on a fixed random batch."""
    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision

        model = torchvision.models.resnet50(num_classes=1000).to(device)
        side = 32 if dry else 224
        x = torch.randn(batch, 3, side, side, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        return model, lambda m: F.cross_entropy(m(x), y)
    if name == "unet":
        from coap_plugins.train.unet import UNet

        widths = (16, 32, 32, 32) if dry else (128, 256, 256, 256)
        model = UNet(3, widths, blocks_per_level=2).to(device)
        x = torch.randn(batch, 3, 32, 32, device=device)
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x)
        return model, lambda m: F.mse_loss(m(x, t), noise)
    raise ValueError(f"Invalid model: {name!r} (expected one of {', '.join(MODELS)})")


class Clock:
    """Seconds of a callable: CUDA events on a GPU (one sync per measurement), else wall time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def median(clock: Clock, fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(clock(fn) for _ in range(reps))


def measure(model_name: str, method: str, device: torch.device, batch: int, reps: int, dry: bool) -> dict:
    clock = Clock(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    model, loss_fn = make_model(model_name, device, batch, dry)
    params = list(model.parameters())
    coap = method.startswith("Coap")
    opt = make_optimizer(method, params, device, NEVER)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model)
        loss.backward()
        opt.step()

    train_step()  # set-up (COAP projectors) outside the measurements
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    train = median(clock, train_step, reps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    # the optimizer alone, on the gradients of the last backward
    ordinary = median(clock, opt.step, reps)
    out = dict(model=model_name, method=method, train=train, ordinary=ordinary, peak=peak, corr=None, svd=None)
    if coap:

        def refresh(kind: str) -> Callable[[], None]:
            def run() -> None:
                opt.request_refresh(kind)
                opt.step()

            return run

        out["corr"] = median(clock, refresh("correlation"), max(2, reps // 4), warmup=1)
        out["svd"] = median(clock, refresh("svd"), max(2, reps // 4), warmup=1)
        out["state_bytes"] = opt.state_bytes()
    else:
        out["state_bytes"] = sum(
            v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)
        )
    amortized = ordinary if out["corr"] is None else (310 * ordinary + 8 * out["corr"] + 2 * out["svd"]) / 320
    out["amortized"] = amortized
    out["train_amortized"] = train + amortized - ordinary
    return out  # the model and optimizer go with this frame: the caller empties the cache


def ms(t: float | None, base: float | None = None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.2f}" + (f" ({t / base:.2f}x)" if base else "")


def table(rows: list[dict]) -> list[str]:
    head = [
        "model",
        "method",
        "ordinary step ms (x fused AdamW)",
        "correlation ms",
        "svd ms",
        "amortized step ms (x fused AdamW)",
        "train step ms (x fused AdamW)",
        "train step amortized ms (x fused AdamW)",
        "peak memory MiB (x fused AdamW)",
        "optimizer state MiB",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r["model"]: r for r in rows if r["method"] == "AdamW fused"}
    for r in rows:
        b = base.get(r["model"])
        peak = "-"
        if r["peak"] is not None:
            peak = f"{r['peak'] / 2**20:.0f}" + (f" ({r['peak'] / b['peak']:.3f}x)" if b and b["peak"] else "")
        cells = [
            r["model"],
            r["method"],
            ms(r["ordinary"], b and b["ordinary"]),
            ms(r["corr"]),
            ms(r["svd"]),
            ms(r["amortized"], b and b["amortized"]),
            ms(r["train"], b and b["train"]),
            ms(r["train_amortized"], b and b["train_amortized"]),
            peak,
            f"{r['state_bytes'] / 2**20:.1f}",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def targets(rows: list[dict]) -> list[str]:
    out = ["## Targets", ""]
    base = {r["model"]: r for r in rows if r["method"] == "AdamW fused"}
    coap = [r for r in rows if r["method"] == "CoapAdamW" and r["model"] in base]
    ratios = [(r["model"], r["ordinary"] / base[r["model"]]["ordinary"]) for r in coap]
    shown = ", ".join(f"{m} {x:.2f}x" for m, x in ratios) or "not measured"
    out.append(f"- CoapAdamW ordinary step <= 3x fused AdamW's: {shown} -> " + _verdict(ratios, 3.0))
    train = [(r["model"], r["train_amortized"] / base[r["model"]]["train_amortized"]) for r in coap]
    train = [t for t in train if t[0] == "resnet50"]
    shown = ", ".join(f"{m} {x:.3f}x" for m, x in train) or "not measured"
    out.append(
        f"- CoapAdamW training step (amortized) <= 1.03x fused AdamW's on ResNet-50: {shown} -> "
        + _verdict(train, 1.03)
    )
    return out


def _verdict(ratios: list[tuple[str, float]], limit: float) -> str:
    if not ratios:
        return "SKIPPED"
    return "PASS" if all(x <= limit for _, x in ratios) else "MISS"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run every code path on the CPU, tiny sizes")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 128; dry run 2)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per timing (default 20; dry run 2)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--out", help="also write the markdown to this file")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, chosen, allowed in (("model", models, MODELS), ("method", methods, METHODS)):
        bad = [c for c in chosen if c not in allowed]
        if bad or not chosen:
            parser.error(f"invalid {name}s: {', '.join(bad) or '(none)'} (expected some of {', '.join(allowed)})")
    for name in ("batch", "reps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"invalid --{name}: {value} (must be >= 1)")
    if not args.dry_run and not torch.cuda.is_available():
        print("CUDA is not available: nothing measured (gpu_step.py measures GPUs; --dry-run checks it on the CPU)")
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    batch = args.batch or (2 if args.dry_run else 128)
    reps = args.reps or (2 if args.dry_run else 20)
    rows = []
    for model in models:
        for method in methods:
            rows.append(measure(model, method, device, batch, reps, args.dry_run))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    where = (
        "CPU DRY RUN: tiny sizes, these are not GPU figures"
        if args.dry_run
        else f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    )
    lines = [
        "# GPU step benchmark",
        "",
        f"Command: `{shlex.join([sys.executable] + sys.argv)}`",
        "",
        f"Device: {where}; torch {torch.__version__}; batch {batch}, bf16 autocast, medians of {reps} reps.",
        "",
        *table(rows),
        "",
        "Notes: ordinary/correlation/svd = the optimizer step alone on fixed gradients (refreshes forced); amortized "
        "= (310 ordinary + 8 correlation + 2 svd) / 320 (T_u=32, lambda=5); train step = zero_grad + forward + loss "
        "under bf16 autocast + backward + ordinary step; train step amortized = train step + amortized - ordinary "
        "step. Peak memory: torch.cuda.max_memory_allocated over the training steps (set-up step excluded). COAP: "
        "rank ratio 4 (matrix and conv).",
        "",
        *targets(rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
