"""What the adapters report about COAP: the routing table and the metrics of a refresh."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .optim import CoapOptimizer

__all__ = ["refresh_metrics", "routing_summary", "routing_table"]


def routing_table(optimizers: Sequence[CoapOptimizer]) -> dict[str, str]:
    """``coap/routing/<param>`` -> ``"<projector> <ranks> <shape>"`` for every parameter, logged
    once as hyperparameters by both framework adapters."""
    table = {}
    for oi, opt in enumerate(optimizers):
        for row in opt.routing():
            name = row["name"] or f"group{row['group']}.param{row['index']}"
            proj = row["projector"]
            if proj is None:
                desc = "full rank"
            else:
                ranks = proj.ranks
                desc = f"{proj.kind} {ranks}" if ranks else proj.kind
            key = f"coap/routing/{name}" if len(optimizers) == 1 else f"coap/routing/opt{oi}/{name}"
            table[key] = f"{desc} {'x'.join(map(str, row['shape']))}"
    return table


def routing_summary(optimizers: Sequence[CoapOptimizer]) -> str:
    """A short human summary of the routing: how many parameters got which projector."""
    counts: dict[str, int] = {}
    for opt in optimizers:
        for row in opt.routing():
            kind = row["projector"].kind if row["projector"] is not None else "full rank"
            counts[kind] = counts.get(kind, 0) + 1
    parts = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    return f"COAP routing: {parts} parameter(s)"


def refresh_metrics(optimizers: Sequence[CoapOptimizer]) -> dict[str, float]:
    """The ``coap/*`` metrics both adapters log after a refresh (means over refreshed layers)."""
    reports = [opt.coap_report() for opt in optimizers]
    total = sum(r["state_bytes"] for r in reports)
    full = sum(r["full_rank_bytes"] for r in reports)
    layers = [e for r in reports for e in r["layers"] if e.get("last_refresh_step") is not None]
    recon = [e["recon_error"] for e in layers if "recon_error" in e]
    cos = [e["cos"] for e in layers if "cos" in e]
    metrics = {
        "coap/state_bytes": float(total),
        "coap/full_rank_state_bytes": float(full),
        "coap/state_ratio": total / full if full else math.nan,
        "coap/refresh_seconds": sum(r["last_refresh_seconds"] for r in reports),
    }
    if recon:
        metrics["coap/reconstruction_error"] = sum(recon) / len(recon)
    if cos:
        metrics["coap/cosine"] = sum(cos) / len(cos)
    return metrics
