"""Side-by-side demo: torch AdamW vs CoapAdamW on a small ResNet, 8x8 digits (``make demo``).

Run ``python -m coap_plugins.demo`` (``--help`` for options).  Both runs start from the same
initial weights and see the same batches in the same order; the table reports test accuracy,
test loss, training wall time and the optimizer state each optimizer actually holds.  Needs
scikit-learn (``pip install coap-plugins[vision]``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .examples import SmallResNet, load_digits_tensors, optimizer_state_bytes, train_classifier
from .optim import CoapAdamW
from .policy import CoapPolicy

__all__ = ["format_table", "main", "parse_args", "run_demo"]

HEAD = "fc"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of the demo.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed options.
    """
    parser = argparse.ArgumentParser(
        prog="python -m coap_plugins.demo",
        description="Train a small ResNet on scikit-learn's 8x8 digits with torch AdamW and with CoapAdamW.",
    )
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training set per run (default 20)")
    parser.add_argument("--size", type=int, default=16, help="images are upsampled to SIZE x SIZE, >= 8 (default 16)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of both runs, cosine-decayed (default 3e-3)")
    parser.add_argument("--weight-decay", type=float, default=1e-2, help="decoupled weight decay of both runs (default 1e-2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the initial weights and the batch order (default 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads during the runs; 0 leaves torch's choice (default 1: the model is too "
        "small to gain much from more, one thread keeps the numbers reproducible across machines and the "
        "timings steady on a busy one)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.size < 8:
        parser.error(f"--size must be >= 8, got {args.size}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    return args


def run_demo(
    *,
    epochs: int = 20,
    size: int = 16,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the same SmallResNet twice, with torch AdamW and with CoapAdamW.

    COAP settings: ``rank_ratio_conv=4``, ``rank_ratio_matrix=4``, the default refresh
    schedule (``update_interval=32``, ``reproject_factor=5``) and the classifier head ``fc``
    kept full rank through ``CoapPolicy(exclude=["fc"])``.

    Args:
        epochs: passes over the training set per run.
        size: image side after upsampling.
        batch_size: training batch size.
        lr: peak learning rate of both runs (cosine decay per step).
        weight_decay: decoupled weight decay of both runs.
        seed: seed of the split, the initial weights and the batch order.

    Returns:
        A dict with ``rows`` (one per optimizer: ``name``, the
        :func:`~coap_plugins.examples.train_classifier` results, ``state_bytes`` and
        ``state_ratio`` to torch AdamW), ``coap_report`` (the COAP optimizer's
        :meth:`~coap_plugins.CoapOptimizer.coap_report` after training), ``policy``, ``model``
        (the untrained initial model both runs copied) and ``data``.
    """
    data = load_digits_tensors(size=size, seed=seed)
    torch.manual_seed(seed)
    initial = SmallResNet()
    policy = CoapPolicy(rank_ratio_conv=4, rank_ratio_matrix=4, exclude=[HEAD])

    rows = []
    report: dict[str, Any] = {}
    for name in ("torch AdamW", "CoapAdamW"):
        model = copy.deepcopy(initial)
        if name == "torch AdamW":
            opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        else:
            opt = CoapAdamW(policy.param_groups(model), lr=lr, weight_decay=weight_decay)
        result = train_classifier(model, opt, data, epochs, batch_size, seed, lr_schedule="cosine")
        result["name"] = name
        result["state_bytes"] = optimizer_state_bytes(opt)
        if isinstance(opt, CoapAdamW):
            report = opt.coap_report()
        rows.append(result)
    base = rows[0]["state_bytes"]
    for row in rows:
        row["state_ratio"] = row["state_bytes"] / base if base else float("nan")
    return {"rows": rows, "coap_report": report, "policy": policy, "model": initial, "data": data}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of :func:`run_demo` as an aligned, markdown-style table.

    Args:
        rows: dicts with ``name``, ``test_accuracy``, ``test_loss``, ``wall_seconds``,
            ``state_bytes`` and ``state_ratio``.

    Returns:
        The table, one line per row plus header and rule lines.
    """
    header = ("optimizer", "test acc (%)", "test loss", "wall (s)", "state bytes", "state / AdamW")
    body = [
        (
            r["name"],
            f"{r['test_accuracy']:.2f}",
            f"{r['test_loss']:.4f}",
            f"{r['wall_seconds']:.1f}",
            f"{r['state_bytes']:,}",
            f"{r['state_ratio']:.3f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(
        "-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)
    ) + "|"
    return "\n".join([fmt(header), rule, *(fmt(b) for b in body)])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m coap_plugins.demo``; prints the comparison table.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status (0).
    """
    args = parse_args(argv)
    previous_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _run_and_print(args)
    finally:
        torch.set_num_threads(previous_threads)
    return 0


def _run_and_print(args: argparse.Namespace) -> None:
    """Run both trainings with the parsed options and print the header lines and the table."""
    print(
        f"COAP demo: SmallResNet on scikit-learn digits upsampled to {args.size}x{args.size}, "
        f"{args.epochs} epoch(s), batch {args.batch_size}, lr {args.lr:g} (cosine), weight decay {args.weight_decay:g}, "
        f"seed {args.seed}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"Python {platform.python_version()}",
        flush=True,
    )
    out = run_demo(
        epochs=args.epochs,
        size=args.size,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
    )
    data = out["data"]
    n_train_steps = out["rows"][0]["steps"]
    layers = out["coap_report"].get("layers", [])
    kinds: dict[str, int] = {}
    for layer in layers:
        if layer["projector"] != "none":
            kinds[layer["projector"]] = kinds.get(layer["projector"], 0) + 1
    projected = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
    n_params = sum(p.numel() for p in out["model"].parameters())
    print(
        f"{len(data.y_train)} train / {len(data.y_test)} test images, {n_params:,} parameters, "
        f"{n_train_steps} steps per run; COAP (rank ratio 4, update_interval 32, reproject_factor 5, "
        f"head '{HEAD}' full rank) projects {projected} layers"
    )
    print()
    print(format_table(out["rows"]))


if __name__ == "__main__":
    sys.exit(main())
