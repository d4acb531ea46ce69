"""Step time, dispatched ops, host syncs and state size of CoapAdamW against torch.optim.AdamW.

What is measured, per row (single weights at rank ratio 4, and whole timm ResNet-18 and ResNet-50):

* torch.optim.AdamW: one step with its default settings;
* CoapAdamW (``rank_ratio_matrix=4, rank_ratio_conv=4``): an ordinary step (no refresh due),
  a correlation-update step and a recalibration (low-cost SVD) step, both forced with
  ``request_refresh``, the first step of a fresh optimizer (projector set-up), and the
  amortized step of the default schedule (T_u=32, lambda=5): over 320 steps there are 8
  correlation and 2 SVD refreshes, computed as ``(310 ordinary + 8 corr + 2 svd) / 320`` from
  the measured medians;
* the floor of an ordinary step: the multiply-adds of its projection and back-projection
  (``Projector.step_macs()``, summed over projected parameters) at this machine's fp32 matmul
  rate, measured in the same run from 2048x2048 @ 2048x2048 products taken among the row's steps;
* state bytes: ``CoapAdamW.state_bytes()`` against the tensors torch AdamW holds;
* dispatched aten ops and host syncs of one step of each kind (``coap_plugins.profiling.
  DispatchCounter``: every op the step dispatches, views included, and the value reads among
  them), next to torch.optim.AdamW with ``foreach=True`` and ``foreach=False``;
* GaLoreAdamW (if installed) on 4096x1024 at rank 256: ordinary step and its refresh step (the
  first step of a fresh optimizer, which runs the full SVD);
* CoapAdamW8bit (moments in blockwise 8 bits): its ordinary step against the 32-bit COAP step of
  the same row, and its state bytes; ``bitsandbytes.optim.AdamW8bit`` (full-rank 8-bit Adam) as a
  comparison row on 4096x1024 and on ResNet-18.

Every time is the median of several repetitions after warm-up, with ``p.grad`` assigned once and
kept fixed.  All ratios are measured side by side in one run: within a row the timed calls take
turns (round-robin), so load from other processes or clock drift falls on every column alike and
the ratios compare like with like on the same machine.  ``--quick`` (a smoke test) takes fewer
repetitions and skips the ResNets and GaLore.

    python benchmarks/optimizer_step.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from coap_plugins import CoapAdamW, CoapAdamW8bit

try:
    from coap_plugins.profiling import DispatchCounter
except ImportError:  # an older version of the package, timed for comparison: no counts
    DispatchCounter = None

SHAPES = [
    (1024, 1024),
    (4096, 1024),
    (1024, 4096),
    (768, 3072),
    (128, 64, 3, 3),
    (256, 256, 3, 3),
    (512, 512, 3, 3),
    (256, 1024, 1, 1),
]
COAP = dict(lr=1e-3, rank_ratio_matrix=4, rank_ratio_conv=4)
NEVER = 10**9  # an update_interval no run reaches: ordinary steps only
FULL, QUICK = (
    SimpleNamespace(warmup=2, cheap=10, refresh=5, first=5),
    SimpleNamespace(warmup=1, cheap=3, refresh=2, first=2),
)
RESNET = SimpleNamespace(warmup=2, cheap=5, refresh=3, first=3)  # a whole model: fewer reps


def clocked(fn):
    """A callable that runs ``fn()`` and returns the seconds it took."""

    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def interleave(runs: dict, warmup: int) -> dict[str, float]:
    """Median seconds of each ``name: (timed callable, reps)``; the callables take turns, so
    drift or load on the machine falls on every column of a row alike."""
    for fn, _ in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(max(n for _, n in runs.values())):
        for name, (fn, n) in runs.items():
            if i < n:
                times[name].append(fn())
    return {name: statistics.median(t) for name, t in times.items()}


def matmul():
    """A timed 2048x2048 @ 2048x2048 fp32 product: 2048^3 multiply-adds."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return clocked(lambda: a @ b)


def held_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of all tensors an optimizer holds in its state (GaLore keeps P inside an object)."""
    values = (getattr(v, "ortho_matrix", v) for st in opt.state.values() for v in st.values())
    return sum(v.nbytes for v in values if isinstance(v, torch.Tensor))


def describe(proj) -> str:
    if proj.kind == "matrix":
        return f"matrix r{proj.rank}"
    return f"tucker2 ({proj.rank_out}, {proj.rank_in if proj.rank_in is not None else '-'})"


def measure(name: str, params: list, reps) -> dict:
    """All timings of one row, taken in turns."""
    ref = torch.optim.AdamW(params, lr=1e-3)
    opt = CoapAdamW(params, update_interval=NEVER, **COAP)
    opt8 = CoapAdamW8bit(params, update_interval=NEVER, **COAP)

    def refresh(kind):
        opt.request_refresh(kind)
        opt.step()

    t = interleave(
        {
            "adamw": (clocked(ref.step), reps.cheap),
            "ordinary": (clocked(opt.step), reps.cheap),
            "ordinary8": (clocked(opt8.step), reps.cheap),
            "corr": (clocked(lambda: refresh("correlation")), reps.refresh),
            "svd": (clocked(lambda: refresh("svd")), reps.refresh),
            "first": (lambda: clocked(CoapAdamW(params, **COAP).step)(), reps.first),  # construction not timed
            "matmul": (matmul(), reps.cheap),
        },
        reps.warmup,
    )
    projs = [row["projector"] for row in opt.routing() if row["projector"] is not None]
    return dict(
        t,
        counts=dispatch_counts(params),
        name=name,
        numel=sum(p.numel() for p in params),
        projector=describe(projs[0]) if len(params) == 1 else f"{len(projs)} of {len(params)} projected",
        macs=sum(p.step_macs() for p in projs),
        amortized=(310 * t["ordinary"] + 8 * t["corr"] + 2 * t["svd"]) / 320,
        bytes=opt.state_bytes(),
        bytes8=opt8.state_bytes(),
        adamw_bytes=held_bytes(ref),
    )


def dispatch_counts(params: list) -> dict[str, tuple[int, int]] | None:
    """``kind -> (ops, syncs)`` of one step of each kind (after a warm-up step where it matters)."""
    if DispatchCounter is None:
        return None

    def count(fn) -> tuple[int, int]:
        with DispatchCounter() as c:
            fn()
        return c.ops, c.syncs

    out = {}
    for foreach in (True, False):
        ref = torch.optim.AdamW(params, lr=1e-3, foreach=foreach)
        ref.step()
        out["torch foreach" if foreach else "torch single"] = count(ref.step)
    opt = CoapAdamW(params, update_interval=NEVER, **COAP)
    opt.batched_products = True  # the accelerator path (the CPU multiplies layer by layer: see _Batch)
    out["set-up"] = count(opt.step)
    out["ordinary"] = count(opt.step)
    for kind in ("correlation", "svd"):
        opt.request_refresh(kind)
        out[kind] = count(opt.step)
    return out


def measure_bnb(name: str, params: list, reps) -> dict | None:
    """bitsandbytes' full-rank AdamW8bit against torch AdamW, same parameters, taken in turns."""
    try:
        from bitsandbytes.optim import AdamW8bit
    except ImportError:
        return None
    ref, opt = torch.optim.AdamW(params, lr=1e-3), AdamW8bit(params, lr=1e-3)
    t = interleave(
        {
            "adamw": (clocked(ref.step), reps.cheap),
            "ordinary": (clocked(opt.step), reps.cheap),
            "matmul": (matmul(), reps.cheap),
        },
        reps.warmup,
    )
    return dict(
        t,
        name=f"{name} bnb AdamW8bit",
        numel=sum(p.numel() for p in params),
        projector="full rank, 8-bit",
        macs=0,
        corr=None,
        svd=None,
        first=None,
        amortized=None,
        ordinary8=None,
        bytes=held_bytes(opt),
        bytes8=None,
        adamw_bytes=held_bytes(ref),
    )


def measure_galore(shape, reps) -> dict | None:
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:
        return None
    p = torch.nn.Parameter(torch.randn(shape) * 0.02)
    p.grad = torch.randn(shape)
    rank = 256

    def make():
        group = {"params": [p], "rank": rank, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}
        return GaLoreAdamW([group], lr=1e-3, no_deprecation_warning=True)

    ref, opt = torch.optim.AdamW([p], lr=1e-3), make()
    opt.step()  # the refresh; the next 199 steps are ordinary
    t = interleave(
        {
            "adamw": (clocked(ref.step), reps.cheap),
            "ordinary": (clocked(opt.step), reps.cheap),
            "svd": (lambda: clocked(make().step)(), reps.refresh),  # its refresh: a fresh first step, full SVD
            "matmul": (matmul(), reps.cheap),
        },
        reps.warmup,
    )
    return dict(
        t,
        name="x".join(map(str, shape)) + " GaLoreAdamW",
        numel=p.numel(),
        projector=f"galore r{rank}",
        macs=2 * p.numel() * rank,
        corr=None,
        first=t["svd"],
        amortized=None,
        ordinary8=None,
        bytes=held_bytes(opt),
        bytes8=None,
        adamw_bytes=held_bytes(ref),
    )


def resnet_params(name: str = "resnet18") -> list:
    """All parameters of a timm ResNet, with real gradients of one small random batch.

    ``zero_init_last=False``: timm's default zero-initialises the last norm of every residual
    block, which zeroes the gradients of all 16 block convs at init, so COAP would only decay
    them (no projection) and the row would measure almost nothing.
    """
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=1000, zero_init_last=False)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 1000, (2,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    assert all(p.grad is not None and p.grad.any() for p in params if p.dim() == 4), "a conv has a zero gradient"
    return params


def ms(t: float | None, base: float | None = None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.2f}" + (f" ({t / base:.2f}x)" if base else "")


def floor(r: dict) -> float:
    """Seconds of the row's projection multiply-adds at the matmul rate measured in its turns."""
    return r["macs"] * r["matmul"] / 2048**3


def table(rows: list) -> list[str]:
    head = [
        "shape",
        "elements",
        "projector",
        "AdamW ms",
        "ordinary ms (xAdamW)",
        "floor ms (GMAC/s)",
        "ordinary/floor",
        "correlation ms (xAdamW)",
        "corr/ordinary",
        "recal ms (xAdamW)",
        "recal/ordinary",
        "first step ms (xAdamW)",
        "amortized ms (xAdamW)",
        "state MiB COAP / AdamW (ratio)",
        "8-bit ordinary ms (x32-bit COAP)",
        "8-bit state MiB (xAdamW)",
    ]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        a, o = r["adamw"], r["ordinary"]
        has_floor = r["macs"] > 0
        cells = [
            r["name"],
            f"{r['numel']:,}",
            r["projector"],
            ms(a),
            ms(o, a),
            f"{ms(floor(r))} ({2048**3 / r['matmul'] / 1e9:.0f})" if has_floor else "-",
            f"{o / floor(r):.2f}" if has_floor else "-",
            ms(r["corr"], a),
            f"{r['corr'] / o:.2f}" if r["corr"] else "-",
            ms(r["svd"], a),
            f"{r['svd'] / o:.2f}" if r["svd"] else "-",
            ms(r["first"], a),
            ms(r["amortized"], a),
            f"{r['bytes'] / 2**20:.2f} / {r['adamw_bytes'] / 2**20:.2f} ({r['bytes'] / r['adamw_bytes']:.3f})",
            ms(r["ordinary8"], o),
            f"{r['bytes8'] / 2**20:.2f} ({r['bytes8'] / r['adamw_bytes']:.3f})" if r["bytes8"] else "-",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


COUNT_KINDS = ("ordinary", "correlation", "svd", "set-up", "torch foreach", "torch single")


def count_table(rows: list) -> list[str]:
    """Dispatched ops / host syncs per step of each kind, per row."""
    counted = [r for r in rows if r.get("counts")]
    if not counted:
        return []
    head = ["shape", "params (projected)"] + [f"{k} ops / syncs" for k in COUNT_KINDS] + ["ordinary / torch foreach"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in counted:
        c = r["counts"]
        ratio = c["ordinary"][0] / c["torch foreach"][0]
        cells = [r["name"], r["projector"]] + [f"{c[k][0]:,} / {c[k][1]}" for k in COUNT_KINDS] + [f"{ratio:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def targets(rows: list) -> list[str]:
    by = {r["name"]: r for r in rows}
    out = ["## Targets", ""]

    def check(what, figures, ok):
        shown = ", ".join(f"{k} {v}" for k, v in figures) or "not measured"
        out.append(f"- {what}: {shown} -> {('PASS' if ok else 'MISS') if figures else 'SKIPPED'}")

    coap = [r for r in rows if r["corr"] is not None]
    big = [r for r in coap if r["numel"] >= 2**20 and not r["name"].startswith("resnet")]
    check(
        "ordinary <= 1.5x floor (single weights >= 1M elements)",
        [(r["name"], f"{r['ordinary'] / floor(r):.2f}x") for r in big],
        all(r["ordinary"] <= 1.5 * floor(r) for r in big),
    )
    nets = [r for r in coap if r["name"].startswith("resnet")]
    check(
        "ordinary <= 1.3x floor (ResNet-18, ResNet-50)",
        [(r["name"], f"{r['ordinary'] / floor(r):.2f}x") for r in nets],
        all(r["ordinary"] <= 1.3 * floor(r) for r in nets),
    )
    counted = {r["name"]: r["counts"] for r in coap if r.get("counts")}
    r18, r50 = counted.get("resnet18"), counted.get("resnet50")
    check(
        "ordinary step of ResNet-18 <= 250 dispatched ops",
        [("resnet18", r18["ordinary"][0])] if r18 else [],
        bool(r18) and r18["ordinary"][0] <= 250,
    )
    check(
        "ordinary step of ResNet-50 <= 2x torch AdamW foreach's ops",
        [("resnet50", f"{r50['ordinary'][0] / r50['torch foreach'][0]:.2f}x")] if r50 else [],
        bool(r50) and r50["ordinary"][0] <= 2 * r50["torch foreach"][0],
    )
    check(
        "host syncs: 0 per ordinary step, <= 2 per refresh step (every counted row)",
        [
            (name, "/".join(str(c[k][1]) for k in ("ordinary", "correlation", "svd", "set-up")))
            for name, c in counted.items()
        ],
        all(
            c["ordinary"][1] == 0 and max(c["correlation"][1], c["svd"][1], c["set-up"][1]) <= 2
            for c in counted.values()
        ),
    )
    check(
        "correlation step <= 1.6x ordinary",
        [(r["name"], f"{r['corr'] / r['ordinary']:.2f}x") for r in coap],
        all(r["corr"] <= 1.6 * r["ordinary"] for r in coap),
    )
    g, c = by.get("4096x1024 GaLoreAdamW"), by["4096x1024"]
    check(
        "recalibration of 4096x1024 <= 1/5 of GaLore's refresh",
        [("4096x1024", f"{c['svd'] / g['svd']:.3f} (1/{g['svd'] / c['svd']:.1f})")] if g else [],
        bool(g) and c["svd"] <= g["svd"] / 5,
    )
    t = by["512x512x3x3"]
    check(
        "Tucker-2 recalibration of 512x512x3x3 <= 4x its ordinary step",
        [("512x512x3x3", f"{t['svd'] / t['ordinary']:.2f}x")],
        t["svd"] <= 4 * t["ordinary"],
    )
    r = by.get("resnet18")
    check(
        "first step of whole ResNet-18 <= 2 s",
        [("resnet18", f"{r['first']:.2f} s")] if r else [],
        bool(r) and r["first"] <= 2.0,
    )
    check(
        "CoapAdamW8bit state on ResNet-18 <= 13 % of torch AdamW's",
        [("resnet18", f"{r['bytes8'] / r['adamw_bytes']:.3f}")] if r else [],
        bool(r) and r["bytes8"] <= 0.13 * r["adamw_bytes"],
    )
    check(
        "ordinary 8-bit step <= 1.5x the 32-bit COAP step",
        [(c["name"], f"{c['ordinary8'] / c['ordinary']:.2f}x") for c in coap],
        all(c["ordinary8"] <= 1.5 * c["ordinary"] for c in coap),
    )
    return out


def adamw_default() -> str:
    """What torch.optim.AdamW() runs on CPU tensors (asks a private torch helper)."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:
        return "not known"
    fused, foreach = _default_to_fused_or_foreach([torch.zeros(1)], False, False)
    return f"foreach={foreach}, fused={fused}"


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
    reps = QUICK if args.quick else FULL
    load = os.getloadavg()[0]  # other processes on the machine make every timing noisier
    rows = []
    for shape in SHAPES:
        p = torch.nn.Parameter(torch.randn(shape) * 0.02)
        p.grad = torch.randn(shape)
        rows.append(measure("x".join(map(str, shape)), [p], reps))
    if not args.quick:
        resnet = resnet_params("resnet18")
        rows.append(measure("resnet18", resnet, RESNET))
        rows.append(measure("resnet50", resnet_params("resnet50"), RESNET))
        galore = measure_galore((4096, 1024), reps)
        big = torch.nn.Parameter(torch.randn(4096, 1024) * 0.02)
        big.grad = torch.randn(4096, 1024)
        extra = [galore, measure_bnb("4096x1024", [big], reps), measure_bnb("resnet18", resnet, RESNET)]
        rows += [r for r in extra if r]
    rates = [2048**3 / r["matmul"] / 1e9 for r in rows]
    lines = [
        "# Optimizer step benchmark",
        "",
        f"Command: `{shlex.join([sys.executable] + sys.argv)}`",
        "",
        f"Machine: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 matmul rate "
        f"(2048^3 products) {statistics.median(rates):.1f} GMAC/s, median over rows (range {min(rates):.1f} "
        f"to {max(rates):.1f}); 1-minute load average at start {load:.2f}",
        "",
        *table(rows),
        "",
        "Dispatched aten ops / host syncs of one step (views included; syncs: value reads, data-dependent "
        "shapes, device-to-host copies), on the path an accelerator runs (COAP's batched products; on the CPU "
        "it multiplies layer by layer, which the timings above measure):",
        "",
        *count_table(rows),
        "",
        "Notes: each row's timings are taken in turns (AdamW, ordinary, correlation, recal, first step, matmul, "
        "round-robin), medians of %d reps after %d warm-up calls (refreshes: %d reps, first step: %d fresh "
        "optimizers%s). "
        % (
            reps.cheap,
            reps.warmup,
            reps.refresh,
            reps.first,
            "" if args.quick else f"; ResNet-18: {RESNET.cheap} / {RESNET.refresh} / {RESNET.first}",
        )
        + f"AdamW = torch.optim.AdamW defaults ({adamw_default()} on this device). "
        "(xAdamW) = time / AdamW time of the same row, same run. floor = sum of Projector.step_macs() over projected "
        "parameters / the fp32 matmul rate measured in the row's turns (in brackets, GMAC/s). recal = low-cost SVD "
        "refresh; corr/ordinary and recal/ordinary are relative to the ordinary COAP step. amortized = (310 ordinary "
        "+ 8 correlation + 2 recal) / 320 from the medians (default schedule T_u=32, lambda=5; set-up step "
        "excluded). GaLore: recal and first step = its refresh (first step of a fresh optimizer, full SVD); its "
        "floor uses the same 2mnr multiply-adds. 8-bit: CoapAdamW8bit's ordinary step (x the 32-bit COAP ordinary "
        "step of the row) and state; bnb AdamW8bit rows: bitsandbytes' full-rank 8-bit AdamW (its CPU path). "
        "ResNets: timm resnet18 / resnet50 built with zero_init_last=False (the "
        "default zeroes every block conv's gradient at init), gradients of one 2x3x64x64 batch. Counts: torch's "
        "AdamW (not capturable) keeps its step counts as CPU tensors and reads each one back per step (2 value reads "
        "per parameter, counted in its column); on a GPU those reads stay on the host. A CPU run cannot see "
        "device-to-host copies, so a COAP refresh step that needs an SVD fallback counts one sync less here than "
        "on a GPU.",
        "",
        *targets(rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
