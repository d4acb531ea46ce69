"""Step time and state size of CoapAdamW against torch.optim.AdamW, and against a compute floor.

What is measured, per row (single weights at rank ratio 4, and a whole timm ResNet-18):

* torch.optim.AdamW: one step with its default settings;
* CoapAdamW (``rank_ratio_matrix=4, rank_ratio_conv=4``): an ordinary step (no refresh due),
  a correlation-update step and a recalibration (low-cost SVD) step, both forced with
  ``request_refresh``, the first step of a fresh optimizer (projector set-up), and the
  amortized step of the default schedule (T_u=32, lambda=5): over 320 steps there are 8
  correlation and 2 SVD refreshes, computed as ``(310 ordinary + 8 corr + 2 svd) / 320`` from
  the measured medians;
* the floor of an ordinary step: the multiply-adds of its projection and back-projection
  (``Projector.step_macs()``, summed over projected parameters) at this machine's fp32 matmul
  rate, measured in the same run from 2048x2048 @ 2048x2048 products;
* state bytes: ``CoapAdamW.state_bytes()`` against the tensors torch AdamW holds;
* GaLoreAdamW (if installed) on 4096x1024 at rank 256: ordinary step and its refresh step (the
  first step of a fresh optimizer, which runs the full SVD).

Every time is the median of several repetitions after warm-up, with ``p.grad`` assigned once and
kept fixed; all ratios are measured side by side in one run, so they compare like with like on
the same machine.  ``--quick`` (a smoke test) takes fewer repetitions and skips ResNet-18 and
GaLore.

    python benchmarks/optimizer_step.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from coap_plugins import CoapAdamW

SHAPES = [(1024, 1024), (4096, 1024), (1024, 4096), (768, 3072),
          (128, 64, 3, 3), (256, 256, 3, 3), (512, 512, 3, 3), (256, 1024, 1, 1)]
COAP = dict(lr=1e-3, rank_ratio_matrix=4, rank_ratio_conv=4)
NEVER = 10**9  # an update_interval no run reaches: ordinary steps only


def timed(fn, reps: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_step(make, reps: int) -> float:
    """Median seconds of the first step of a fresh optimizer (construction not timed)."""
    times = []
    for _ in range(reps):
        opt = make()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(reps: int) -> float:
    """fp32 multiply-adds per second of a 2048^3 matmul (median)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2048**3 / timed(lambda: a @ b, reps, warmup=1)


def held_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of all tensors an optimizer holds in its state (GaLore keeps P inside an object)."""
    values = (getattr(v, "ortho_matrix", v) for st in opt.state.values() for v in st.values())
    return sum(v.nbytes for v in values if isinstance(v, torch.Tensor))


def describe(proj) -> str:
    if proj.kind == "matrix":
        return f"matrix r{proj.rank}"
    return f"tucker2 ({proj.rank_out}, {proj.rank_in if proj.rank_in is not None else '-'})"


def measure(name: str, params: list, reps, rate: float) -> dict:
    """All timings of one row, side by side."""
    ref = torch.optim.AdamW(params, lr=1e-3)
    adamw = timed(ref.step, reps.cheap, reps.warmup)
    adamw_bytes = held_bytes(ref)
    del ref
    opt = CoapAdamW(params, update_interval=NEVER, **COAP)
    ordinary = timed(opt.step, reps.cheap, reps.warmup)

    def refresh(kind):
        opt.request_refresh(kind)
        opt.step()

    corr = timed(lambda: refresh("correlation"), reps.refresh, reps.warmup)
    svd = timed(lambda: refresh("svd"), reps.refresh, reps.warmup)
    first = first_step(lambda: CoapAdamW(params, **COAP), reps.first)
    projs = [row["projector"] for row in opt.routing() if row["projector"] is not None]
    return dict(
        name=name, numel=sum(p.numel() for p in params),
        projector=describe(projs[0]) if len(params) == 1 else f"{len(projs)} of {len(params)} projected",
        adamw=adamw, ordinary=ordinary, floor=sum(p.step_macs() for p in projs) / rate,
        corr=corr, svd=svd, first=first, amortized=(310 * ordinary + 8 * corr + 2 * svd) / 320,
        bytes=opt.state_bytes(), adamw_bytes=adamw_bytes,
    )


def measure_galore(shape, reps, rate: float) -> dict | None:
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:
        return None
    p = torch.nn.Parameter(torch.randn(shape) * 0.02)
    p.grad = torch.randn(shape)
    rank = 256

    def make():
        group = {"params": [p], "rank": rank, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}
        return GaLoreAdamW([group], lr=1e-3)

    ref = torch.optim.AdamW([p], lr=1e-3)
    adamw = timed(ref.step, reps.cheap, reps.warmup)
    adamw_bytes = held_bytes(ref)
    refresh = first_step(make, reps.refresh)
    opt = make()
    opt.step()  # the refresh; the next 199 steps are ordinary
    ordinary = timed(opt.step, reps.cheap, reps.warmup)
    return dict(
        name="x".join(map(str, shape)) + " GaLoreAdamW", numel=p.numel(), projector=f"galore r{rank}",
        adamw=adamw, ordinary=ordinary, floor=2 * p.numel() * rank / rate, corr=None, svd=refresh,
        first=refresh, amortized=None, bytes=held_bytes(opt), adamw_bytes=adamw_bytes,
    )


def resnet18_params() -> list:
    """All parameters of timm's ResNet-18, with real gradients of one small random batch."""
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 1000, (2,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return list(model.parameters())


def ms(t: float | None, base: float | None = None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.2f}" + (f" ({t / base:.2f}x)" if base else "")


def table(rows: list) -> list[str]:
    head = ["shape", "elements", "projector", "AdamW ms", "ordinary ms (xAdamW)", "floor ms", "ordinary/floor",
            "correlation ms (xAdamW)", "corr/ordinary", "recal ms (xAdamW)", "recal/ordinary",
            "first step ms (xAdamW)", "amortized ms (xAdamW)", "state MiB COAP / AdamW (ratio)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        a, o = r["adamw"], r["ordinary"]
        cells = [
            r["name"], f"{r['numel']:,}", r["projector"], ms(a), ms(o, a), ms(r["floor"]), f"{o / r['floor']:.2f}",
            ms(r["corr"], a), f"{r['corr'] / o:.2f}" if r["corr"] else "-", ms(r["svd"], a), f"{r['svd'] / o:.2f}",
            ms(r["first"], a), ms(r["amortized"], a),
            f"{r['bytes'] / 2**20:.2f} / {r['adamw_bytes'] / 2**20:.2f} ({r['bytes'] / r['adamw_bytes']:.3f})",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def targets(rows: list) -> list[str]:
    by = {r["name"]: r for r in rows}
    out = ["## Targets", ""]

    def check(what, figures, ok):
        shown = ", ".join(f"{k} {v}" for k, v in figures) or "not measured"
        out.append(f"- {what}: {shown} -> {('PASS' if ok else 'MISS') if figures else 'SKIPPED'}")

    big = [r for r in rows if "GaLore" not in r["name"] and (r["numel"] >= 2**20 or r["name"] == "resnet18")]
    check("ordinary <= 1.5x floor (shapes >= 1M elements, ResNet-18)",
          [(r["name"], f"{r['ordinary'] / r['floor']:.2f}x") for r in big],
          all(r["ordinary"] <= 1.5 * r["floor"] for r in big))
    coap = [r for r in rows if r["corr"] is not None]
    check("correlation step <= 1.6x ordinary", [(r["name"], f"{r['corr'] / r['ordinary']:.2f}x") for r in coap],
          all(r["corr"] <= 1.6 * r["ordinary"] for r in coap))
    g, c = by.get("4096x1024 GaLoreAdamW"), by["4096x1024"]
    check("recalibration of 4096x1024 <= 1/5 of GaLore's refresh",
          [("4096x1024", f"{c['svd'] / g['svd']:.3f} (1/{g['svd'] / c['svd']:.1f})")] if g else [],
          bool(g) and c["svd"] <= g["svd"] / 5)
    t = by["512x512x3x3"]
    check("Tucker-2 recalibration of 512x512x3x3 <= 4x its ordinary step",
          [("512x512x3x3", f"{t['svd'] / t['ordinary']:.2f}x")], t["svd"] <= 4 * t["ordinary"])
    r = by.get("resnet18")
    check("first step of whole ResNet-18 <= 2 s", [("resnet18", f"{r['first']:.2f} s")] if r else [],
          bool(r) and r["first"] <= 2.0)
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, no ResNet-18 or GaLore (smoke test)")
    parser.add_argument("--out", help="also write the markdown to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.quick:
        reps = SimpleNamespace(warmup=1, cheap=3, refresh=2, first=2)
    else:
        reps = SimpleNamespace(warmup=2, cheap=10, refresh=5, first=5)
    rate = matmul_rate(3 if args.quick else 10)
    rows = []
    for shape in SHAPES:
        p = torch.nn.Parameter(torch.randn(shape) * 0.02)
        p.grad = torch.randn(shape)
        rows.append(measure("x".join(map(str, shape)), [p], reps, rate))
    if not args.quick:
        rows.append(measure("resnet18", resnet18_params(), SimpleNamespace(warmup=2, cheap=5, refresh=3, first=3), rate))
        galore = measure_galore((4096, 1024), reps, rate)
        rows += [galore] if galore else []
    fused, foreach = torch.optim.optimizer._default_to_fused_or_foreach([torch.zeros(1)], False, False)
    lines = [
        "# Optimizer step benchmark", "",
        f"Command: `{shlex.join([sys.executable] + sys.argv)}`", "",
        f"Machine: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"fp32 matmul rate {rate / 1e9:.1f} GMAC/s (2048^3, median)", "",
        *table(rows), "",
        "Notes: medians of %d reps after %d warm-up steps (refreshes: %d reps, first step: %d fresh optimizers%s). "
        % (reps.cheap, reps.warmup, reps.refresh, reps.first, "; ResNet-18: 5 / 3 / 3" if not args.quick else "")
        + f"AdamW = torch.optim.AdamW defaults (foreach={foreach}, fused={fused} on this device). "
        "(xAdamW) = time / AdamW time of the same row, same run. floor = sum of Projector.step_macs() over projected "
        "parameters / the matmul rate. recal = low-cost SVD refresh; corr/ordinary and recal/ordinary are relative to "
        "the ordinary COAP step. amortized = (310 ordinary + 8 correlation + 2 recal) / 320 from the medians "
        "(default schedule T_u=32, lambda=5; set-up step excluded). GaLore: recal and first step = its refresh "
        "(first step of a fresh optimizer, full SVD); ordinary/floor uses the same 2mnr multiply-adds.", "",
        *targets(rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
