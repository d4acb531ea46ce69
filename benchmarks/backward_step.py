"""Peak memory and time of one training step with COAP's step inside backward against the
normal mode (``optimizer.step()`` after backward), side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/backward_step.py [--out FILE] [--quick]

For a conv-heavy model (torchvision's ResNet-50, 10 classes, 64x64 input) and a linear-heavy one
(an MLP of 2048-wide layers), each trained by CoapAdamW (rank ratio 4 for matrices and
convolutions), it prints per mode:

* the peak memory of one ordinary training step (forward, backward, step), above the memory
  held when the step starts (the parameters and the optimizer state, the same in both modes).
  On the CPU: every allocation and free the profiler records (``profile_memory=True``), summed in
  order; on CUDA: ``torch.cuda.max_memory_allocated`` less the memory allocated at the start;
* how much lower the backward mode's peak is, in bytes and as a fraction of the projected
  parameters' gradient bytes (the target is at least 0.8: those gradients are what the mode
  frees; the full-rank ones are small and freed too);
* the median time of a step (forward, backward, step) over ``--steps`` ordinary steps, the two
  modes alternating, and its ratio to the normal mode;
* that both modes end with the same weights (bit-equal).

Rows per model: 1 micro-batch (``residual="scaled"``, the default); 4 micro-batches with the
default residual (whose steps need the whole gradient: the micro-batches before the last
accumulate ``.grad`` as in the normal mode); 4 micro-batches with ``residual="none"``, where the
backward mode accumulates them in the projected space (``G P``, one more projection per
micro-batch).  The weights are bit-equal where the arithmetic is the same; with projected
accumulation the update of step 2 (both modes from the same weights and state) is compared, as
later steps compound the rounding of a sum taken in another order (BatchNorm on random data
makes this trajectory chaotic).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from coap_plugins.optim import CoapAdamW, StepInBackward

MiB = 2**20


def resnet50() -> tuple[nn.Module, tuple[int, ...]]:
    from torchvision.models import resnet50 as build

    return build(num_classes=10), (3, 64, 64)


def mlp(width: int = 2048, depth: int = 6) -> tuple[nn.Module, tuple[int, ...]]:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(3 * 32 * 32, width), nn.GELU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.GELU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers), (3, 32, 32)


MODELS = {"ResNet-50": resnet50, "MLP 6x2048": mlp}


class Run:
    """One model and optimizer in one mode, with its own data stream."""

    def __init__(self, name: str, backward: bool, accum: int, residual: str, batch: int, device: torch.device):
        torch.manual_seed(0)
        self.model, shape = MODELS[name]()
        self.model.to(device)
        self.opt = CoapAdamW(
            self.model.parameters(), lr=1e-3, rank_ratio_matrix=4, rank_ratio_conv=4, residual=residual
        )
        self.hooks = StepInBackward(self.opt) if backward else None
        self.accum, self.batch, self.shape, self.device = accum, batch, shape, device
        self.gen = torch.Generator().manual_seed(1)

    def step(self) -> None:
        for k in range(self.accum):
            x = torch.randn(self.batch, *self.shape, generator=self.gen).to(self.device)
            y = torch.randint(0, 10, (self.batch,), generator=self.gen).to(self.device)
            last = k == self.accum - 1
            with contextlib.nullcontext() if self.hooks is None or last else self.hooks.no_step():
                (F.cross_entropy(self.model(x), y) / self.accum).backward()
        self.opt.step()
        self.opt.zero_grad()

    def projected_grad_bytes(self) -> int:
        """Bytes of the gradients of the projected parameters (fp32, as the models here)."""
        rows = self.opt.routing()
        return sum(math.prod(r["shape"]) * 4 for r in rows if r["projector"] is not None)


def peak_above_start(run: Run) -> int:
    """Peak bytes allocated during one step above those held at its start."""
    if run.device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def timed(run: Run) -> float:
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run.step()
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(name: str, accum: int, residual: str, batch: int, steps: int, device: torch.device) -> dict:
    normal = Run(name, False, accum, residual, batch, device)
    backward = Run(name, True, accum, residual, batch, device)
    for run in (normal, backward):  # set-up (step 1): every state allocated
        run.step()
    # step 2 from equal weights and state (step 1 is bit-equal in every mode): its update's
    # largest relative difference, per parameter
    before = [p.detach().clone() for p in normal.model.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(before, backward.model.parameters()))
    normal.step()
    backward.step()
    step2 = max(
        float((p - q).norm() / (p - p0).norm().clamp_min(1e-30))
        for p, q, p0 in zip(normal.model.parameters(), backward.model.parameters(), before)
    )
    peaks = {"normal": peak_above_start(normal), "backward": peak_above_start(backward)}
    times: dict[str, list[float]] = {"normal": [], "backward": []}
    for i in range(steps):  # alternating, the first of each pair swapped every step
        order = [("normal", normal), ("backward", backward)][:: 1 if i % 2 == 0 else -1]
        for mode, run in order:
            times[mode].append(timed(run))
    equal = all(torch.equal(p, q) for p, q in zip(normal.model.parameters(), backward.model.parameters()))
    grad_bytes = normal.projected_grad_bytes()
    t_normal, t_backward = statistics.median(times["normal"]), statistics.median(times["backward"])
    return dict(
        model=name,
        accum=accum,
        residual=residual,
        peak_normal=peaks["normal"],
        peak_backward=peaks["backward"],
        saved=peaks["normal"] - peaks["backward"],
        projected_grad_bytes=grad_bytes,
        fraction=(peaks["normal"] - peaks["backward"]) / grad_bytes,
        t_normal=t_normal,
        t_backward=t_backward,
        time_ratio=t_backward / t_normal,
        bit_equal=equal,
        step2_update_diff=step2,
    )


def table(rows: list[dict], device: torch.device, steps: int) -> str:
    head = [
        "model",
        "micro-batches, residual",
        "peak normal MiB",
        "peak in backward MiB",
        "saved MiB",
        "projected grads MiB",
        "saved / projected grads",
        "step ms normal",
        "step ms in backward",
        "time ratio",
        "same weights",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    f"{r['accum']}, {r['residual']}",
                    f"{r['peak_normal'] / MiB:.1f}",
                    f"{r['peak_backward'] / MiB:.1f}",
                    f"{r['saved'] / MiB:.1f}",
                    f"{r['projected_grad_bytes'] / MiB:.1f}",
                    f"{r['fraction']:.2f}",
                    f"{r['t_normal'] * 1e3:.0f}",
                    f"{r['t_backward'] * 1e3:.0f}",
                    f"{r['time_ratio']:.3f}",
                    "bit-equal" if r["bit_equal"] else f"step 2: update within {r['step2_update_diff']:.1e} (relative)",
                ]
            )
            + " |"
        )
    where = "CUDA (max_memory_allocated)" if device.type == "cuda" else "CPU (profiler memory records)"
    lines.append("")
    lines.append(
        f"Device: {where}, torch {torch.__version__}, {torch.get_num_threads()} thread(s). Peak: above the memory held "
        f"at the step's start (parameters + optimizer state, equal in both modes). Time: median of {steps} steps per "
        "mode, alternating. CoapAdamW, rank ratio 4 (matrices and convolutions), default schedule (ordinary steps)."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--quick", action="store_true", help="the MLP only, narrower, 2 timed steps (a smoke run)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode (default 10)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.quick:
        MODELS["MLP 6x2048"] = lambda: mlp(width=256, depth=4)
    names = ["MLP 6x2048"] if args.quick else list(MODELS)
    steps = 2 if args.quick else args.steps
    rows = []
    for name in names:
        batch = 8 if name == "ResNet-50" else 64
        for accum, residual in ((1, "scaled"), (4, "scaled"), (4, "none")):
            rows.append(measure(name, accum, residual, batch, steps, device))
            print(rows[-1], flush=True)
    out = table(rows, device, steps)
    print(out)
    if args.out:
        Path(args.out).write_text(
            "# Step inside backward: peak memory and time\n\n"
            f"`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/backward_step.py --steps {steps}"
            + (" --quick" if args.quick else "")
            + (" --device cuda" if device.type == "cuda" else "")
            + "`\n\n"
            + out
            + "\n"
        )


if __name__ == "__main__":
    main()
