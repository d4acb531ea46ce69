"""What a projector refresh does to P on a real task: how far P moves, how many columns flip.

Trains the quality benchmark's UNet-DDPM task (see ``quality.py``: same data, model, schedule and
noise) with CoapAdamW for ``--steps`` steps, once per ``--variants`` entry, and after every step
compares each projector tensor with its copy from before the step.  Per refresh kind it prints:

* ``grad RMS``: the median RMS of the gradients of the projected layers at refresh steps;
* ``|ΔP| / |P|``: the median relative Frobenius change of a projector tensor in one refresh;
* ``columns flipped``: for SVD recalibrations, the fraction of new columns whose dot product
  with the old column of the same index is negative (the moments, unless ``restore_state``
  carries them, keep reading those columns' coordinates);
* ``|cos| old/new``: the median absolute cosine between a new column and its predecessor;
* ``subspace overlap``: ``||Q_old^T Q_new||_F^2 / r`` for orthonormal bases ``Q`` of the old and
  new P (1: the same subspace, only its basis turned; r / n: unrelated subspaces).  A low cosine
  with a high overlap is a basis turned within the subspace, which ``basis_alignment="rotation"``
  undoes and ``restore_state`` carries the moments through.

    python benchmarks/refresh_probe.py [--steps 96] [--update-interval 8] [--reproject-factor 3]
        [--variants 'paper;relative;sign'] [--seed 0] [--threads 1]

A variant is ``;``-separated, each a comma-separated list of CoapAdamW options
(``correlation_loss=relative,basis_alignment=sign``) or a name of one of the shortcuts
``paper`` (the defaults), ``relative`` and ``sign``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from quality import TASKS, build_model, load_task_data, lr_factor, step_generator, train_step

SHORTCUTS = {
    "paper": {},
    "relative": {"correlation_loss": "relative"},
    "sign": {"basis_alignment": "sign"},
}


def parse_variant(text: str) -> dict:
    text = text.strip()
    if text in SHORTCUTS:
        return dict(SHORTCUTS[text])
    options = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"Invalid variant option {item!r} (expected key=value or one of {', '.join(SHORTCUTS)})")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def probe(options: dict, args: argparse.Namespace) -> dict[str, list[tuple[float, ...]]]:
    """Per refresh kind: (grad RMS, |ΔP|/|P|, flipped fraction, median |cos|, subspace overlap)
    per tensor and refresh."""
    from coap_plugins.optim import CoapAdamW
    from coap_plugins.train.unet import DDPM

    data = load_task_data("unet")
    model = build_model("unet", args.seed)
    ddpm = DDPM(timesteps=1000)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = CoapAdamW(
        params,
        lr=2e-3,
        weight_decay=0.05,
        rank_ratio_matrix=4,
        rank_ratio_conv=4,
        min_conv_numel=0,
        update_interval=args.update_interval,
        reproject_factor=args.reproject_factor,
        **options,
    )
    cfg = TASKS["unet"]
    out: dict[str, list] = {"correlation": [], "svd": []}
    for step in range(args.steps):
        gen = step_generator(args.seed, step)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * lr_factor(step, args.steps, min(cfg.warmup, args.steps))
        loss = train_step("unet", model, data, gen, cfg.batch, ddpm)
        loss.backward()
        before = {
            (id(p), k): v.clone() for p in params for k, v in opt.state.get(p, {}).items() if k.startswith("proj")
        }
        rms = {id(p): float(p.grad.square().mean().sqrt()) for p in params}
        opt.step()
        opt.zero_grad(set_to_none=True)
        for p in params:
            kind = opt._telemetry.get(p, {}).get("refresh")
            if opt._telemetry.get(p, {}).get("step") != opt.state.get(p, {}).get("step") or kind not in out:
                continue
            for k, new in opt.state[p].items():
                old = before.get((id(p), k))
                if old is None:
                    continue
                cos = (old * new).sum(0) / (old.norm(dim=0) * new.norm(dim=0)).clamp_min(1e-30)
                q_old, q_new = torch.linalg.qr(old)[0], torch.linalg.qr(new)[0]
                overlap = float((q_old.T @ q_new).square().sum() / old.shape[1])
                out[kind].append(
                    (
                        rms[id(p)],
                        float((new - old).norm() / old.norm()),
                        float((cos < 0).float().mean()),
                        float(cos.abs().median()),
                        overlap,
                    )
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--update-interval", type=int, default=8)
    parser.add_argument("--reproject-factor", type=int, default=3)
    parser.add_argument("--variants", default="paper;relative;sign")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(";") if v.strip()]
    print(
        f"UNet-DDPM task of quality.py, CoapAdamW rank ratio 4, T_u {args.update_interval}, "
        f"lambda {args.reproject_factor}, {args.steps} steps, seed {args.seed}\n"
    )
    head = ["variant", "refresh", "tensors x refreshes", "grad RMS", "\\|ΔP\\| / \\|P\\|", "columns flipped"]
    head += ["\\|cos\\| old/new", "subspace overlap"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for text in variants:
        rows = probe(parse_variant(text), args)
        for kind, vals in rows.items():
            if not vals:
                continue
            med = [statistics.median(v[i] for v in vals) for i in range(5)]
            flipped = f"{100 * statistics.fmean(v[2] for v in vals):.0f} %" if kind == "svd" else "-"
            print(
                f"| {text} | {kind} | {len(vals)} | {med[0]:.2e} | {med[1]:.2e} | {flipped} | "
                f"{med[3]:.3f} | {med[4]:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
