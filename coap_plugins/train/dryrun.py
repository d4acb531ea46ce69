"""``coap-train RECIPE --dry-run``: what a run would build, and the optimizer state it would hold.

:func:`dry_run` builds the model and the optimizer exactly as :func:`coap_plugins.train.cli.run`
does (the data's channels and classes from the shards' ``meta.json``), translates the optimizer
the way ``CoapAlgorithm`` / ``CoapCallback`` do when the recipe has a ``coap`` section, and
returns a text report: the resolved recipe, one routing row per parameter and the predicted
optimizer-state bytes against the full-rank equivalent.  Nothing is trained and nothing is
written into ``output_dir`` (the digits shards are written into the data cache when missing,
as a run would; no other data is written or downloaded).

Nothing heavy is imported until :func:`dry_run` is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer

    from .config import DataConfig, TrainConfig

__all__ = ["dry_run"]

_ADAPTER = "coap-train --dry-run"


def _shard_meta(data: DataConfig) -> dict[str, Any]:
    """The ``meta.json`` of the shards a run of ``data`` would read.

    Digits shards are written when missing (cheap, as a run does); anything else must already be
    on disk: a dry run downloads nothing.

    Raises:
        FileNotFoundError: the shards are not there; the message says where they were looked for.
    """
    from .data import read_meta
    from .loader import cache_dir, prepare_shards

    if data.name == "digits":
        return read_meta(prepare_shards(data))
    # where a run reads the shards (or, for cifar10 with download and no path, downloads into)
    where = Path(data.path) if data.path else cache_dir() / "cifar10-shards"
    if (where / "meta.json").is_file():
        return read_meta(where)
    if data.name == "cifar10" and data.download:
        how = (
            "a dry run downloads nothing: train the recipe once (it downloads CIFAR-10), or run "
            "`coap-data cifar10 SRC --out DIR` and set data.path=DIR"
        )
    else:
        tool = "cifar10" if data.name == "cifar10" else "imagefolder"
        how = f"write them with `coap-data {tool} SRC --out {where}`"
    raise FileNotFoundError(
        f"no shards found for data.name={data.name!r}: {where / 'meta.json'} does not exist "
        f"(the data's in_chans and num_classes come from it); {how}"
    )


def _runner_model(task: nn.Module) -> nn.Module:
    """The module the framework adapters route on: both runners hold the :class:`TaskModule` as
    ``.task`` (Composer's ``CoapTaskModel``, Lightning's ``CoapTaskModule``, whose other members
    hold no parameters), so the parameters are named ``task.net.<layer>`` as in a run."""
    from torch import nn

    holder = nn.Module()
    holder.task = task
    return holder


def _human(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.2f} {unit}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _coap_rows(optimizer: Any) -> list[tuple[str, ...]]:
    """One row per parameter from the COAP optimizer's own routing and prediction."""
    rows = []
    for row in optimizer.routing():
        p = optimizer.param_groups[row["group"]]["params"][row["index"]]
        proj = row["projector"]
        ranks = ", ".join(f"{k}={v}" for k, v in proj.ranks.items() if v is not None) if proj is not None else "-"
        rows.append(
            (
                row["name"] or f"group{row['group']}.param{row['index']}",
                _shape(row["shape"]),
                proj.kind if proj is not None else "none",
                ranks,
                f"{optimizer.predicted_state_bytes(p):,}",
                row["reason"],
            )
        )
    return rows


def _plain_rows(optimizer: Optimizer, model: nn.Module, cfg: TrainConfig) -> tuple[list[tuple[str, ...]], int, int]:
    """Rows and ``(predicted, full-rank)`` bytes of the plain optimizer (a recipe without ``coap``).

    The optimizer's own step runs once on a shape-only copy: the model moved to the ``meta``
    device (no memory, no arithmetic), its optimizer built again by the recipe's builder, zero
    gradients; its state is then counted as a run's summary counts it.
    """
    import torch

    from .common import build_optimizer
    from .outputs import optimizer_state_bytes

    why = f"full rank: the recipe has no coap section (the plain {type(optimizer).__name__} update)"
    model.to("meta")  # this dry run's own copy: nothing else holds it
    twin = build_optimizer(cfg, model.task.net)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    twin.step()
    used, full = optimizer_state_bytes(twin)
    rows = []
    for name, p in model.named_parameters():
        held = sum(v.numel() * v.element_size() for v in twin.state.get(p, {}).values() if torch.is_tensor(v))
        rows.append((name, _shape(tuple(p.shape)), "none", "-", f"{held:,}", why))
    return rows, used, full


def dry_run(cfg: TrainConfig) -> str:
    """The report of ``coap-train RECIPE --dry-run`` for the validated recipe ``cfg``.

    Three parts: the resolved config (:func:`~coap_plugins.train.config.to_yaml`); the routing,
    one row per parameter with its shape, projector kind, ranks, predicted state bytes and the
    reason (the COAP optimizer's :meth:`~coap_plugins.CoapOptimizer.routing`); and the predicted
    optimizer-state bytes (:meth:`~coap_plugins.CoapOptimizer.predicted_state_bytes`) against the
    full-rank equivalent (:meth:`~coap_plugins.CoapOptimizer.full_rank_state_bytes`; two fp32
    moments per element for a plain optimizer, as the run's ``summary.json`` counts them), in
    bytes, binary units and a percentage.  Nothing is trained and ``output_dir`` is not created.

    Raises:
        FileNotFoundError: the recipe's shards cannot be found (digits shards are written).
    """
    import torch

    from ..settings import CoapSettings
    from ..translate import translate_optimizer
    from .common import build_optimizer, coap_kwargs
    from .config import to_yaml
    from .tasks import TaskModule, build_model

    meta = _shard_meta(cfg.data)
    with torch.random.fork_rng(devices=[]):  # the run's initial weights, without moving the caller's RNG
        torch.manual_seed(cfg.seed)
        net = build_model(cfg, int(meta["channels"]), len(meta["classes"]))
    model = _runner_model(TaskModule(cfg, net, meta))
    optimizer = build_optimizer(cfg, net)
    if cfg.coap is not None:
        coap = translate_optimizer(optimizer, model, CoapSettings(**coap_kwargs(cfg.coap)), adapter=_ADAPTER)
        rows = _coap_rows(coap)
        used, full = coap.predicted_state_bytes(), coap.full_rank_state_bytes()
        what = f"{type(coap).__name__} (translated from {type(optimizer).__name__})"
        kinds: dict[str, int] = {}
        for row in rows:
            kinds[row[2]] = kinds.get(row[2], 0) + 1
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    else:
        rows, used, full = _plain_rows(optimizer, model, cfg)
        what = f"{type(optimizer).__name__} (no coap section)"
        counts = f"{len(rows)} none"
    header = ("parameter", "shape", "projector", "ranks", "state bytes", "reason")
    ratio = f"{100 * used / full:.2f} %" if full else "n/a"
    lines = [
        f"coap-train dry run: {cfg.name} ({cfg.trainer}); nothing is trained or written to {cfg.output_dir}",
        "",
        "== resolved config ==",
        to_yaml(cfg).rstrip(),
        "",
        f"== routing: {what}, {len(rows)} parameters ({counts}) ==",
        *_table([header, *rows]),
        "",
        "== predicted optimizer state ==",
        f"optimizer:             {what}",
        f"predicted state:       {used:,} bytes ({_human(used)})",
        f"full-rank equivalent:  {full:,} bytes ({_human(full)})",
        f"ratio:                 {ratio} of full rank",
        "(held from each parameter's first usable gradient on; a projected layer whose gradient is still zero, "
        "e.g. behind a zero-initialised norm, allocates its state at the first step that reaches it)",
    ]
    return "\n".join(lines)
