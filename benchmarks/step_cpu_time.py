"""CPU time of CoapAdamW's ordinary step, from the torch profiler: steadier than wall time on a
shared machine, and runnable against any checkout of the package to compare two versions.

Per row (single weights at rank ratio 4, timm ResNet-18 and ResNet-50 with the gradients of one
2x3x64x64 batch), the sum of the ops' self CPU time over several ordinary steps after 3 warm-up
steps, per step.  Compare versions by running it alternately from each checkout:

    PYTHONPATH=OLD_CHECKOUT python benchmarks/step_cpu_time.py before
    PYTHONPATH=NEW_CHECKOUT python benchmarks/step_cpu_time.py now
    python benchmarks/step_cpu_time.py now --quick   # one small row (a smoke test)
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import profile

from coap_plugins import CoapAdamW


def single(shape: tuple[int, ...]) -> list[torch.nn.Parameter]:
    p = torch.nn.Parameter(torch.randn(shape) * 0.02)
    p.grad = torch.randn(shape)
    return [p]


def net(name: str) -> list[torch.nn.Parameter]:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=1000, zero_init_last=False)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 1000, (2,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return list(model.parameters())


ROWS = [
    ("1024x1024", lambda: single((1024, 1024)), 30),
    ("4096x1024", lambda: single((4096, 1024)), 10),
    ("512x512x3x3", lambda: single((512, 512, 3, 3)), 10),
    ("256x1024x1x1", lambda: single((256, 1024, 1, 1)), 30),
    ("resnet18", lambda: net("resnet18"), 3),
    ("resnet50", lambda: net("resnet50"), 3),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("label", help="printed first on the line (e.g. before / now)")
    parser.add_argument("--quick", action="store_true", help="the 256x1024x1x1 row only, 3 steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [("256x1024x1x1", ROWS[3][1], 3)] if args.quick else ROWS
    out = []
    for name, make, steps in rows:
        params = make()
        opt = CoapAdamW(params, lr=1e-3, rank_ratio_matrix=4, rank_ratio_conv=4, update_interval=10**9)
        for _ in range(3):
            opt.step()
        with profile() as prof:
            for _ in range(steps):
                opt.step()
        per_step = sum(e.self_cpu_time_total for e in prof.key_averages()) / steps / 1e3
        out.append(f"{name}={per_step:.2f}")
    print(args.label, "ms per ordinary step:", " ".join(out))


if __name__ == "__main__":
    main()
