"""Framework-free parts of the adapters: settings, optimizer translation, scheduler re-binding.

The Composer algorithm and the Lightning callback share these:

* :class:`CoapSettings` holds and validates every COAP setting an adapter takes;
* :func:`translate_optimizer` turns a torch optimizer into its COAP counterpart, keeping the
  user's param groups one-to-one (same order, lr, betas, eps, weight decay, extra keys) through
  :meth:`~coap_plugins.CoapPolicy.param_groups`;
* :func:`build_optimizer` builds a COAP optimizer from the settings alone (no user optimizer);
* :func:`rebind_lr_scheduler` points a torch ``LRScheduler`` built on the old optimizer at the
  new one;
* :func:`find_coap_optimizers` finds the COAP optimizers behind optimizer wrappers (Composer's
  ``SAMOptimizer``, Lightning's ``LightningOptimizer``);
* :func:`reroute_groups` re-derives the per-parameter routing of a COAP optimizer after module
  surgery replaced parameters in its groups;
* :func:`settle_refresh` tells whether a requested refresh reached an optimizer step.
"""

from __future__ import annotations

import functools
import math
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._checks import check_min_numel, check_positive_int, check_rank, check_ratio
from ..optim import OPTIMIZERS, CoapAdafactor, CoapAdamW, CoapOptimizer, get_optimizer_class
from ..policy import CoapPolicy
from ..projection import DEFAULT_MIN_CONV_NUMEL
from ..schedule import ProjectionSchedule

__all__ = [
    "CoapSettings",
    "build_optimizer",
    "find_coap_optimizers",
    "parse_interval",
    "rebind_lr_scheduler",
    "refresh_metrics",
    "remember_routing",
    "reroute_groups",
    "routing_summary",
    "routing_table",
    "settle_refresh",
    "translate_optimizer",
    "translatable_names",
]

_ADAM_NAMES = ("AdamW", "Adam", "DecoupledAdamW")
_ADAFACTOR_NAMES = ("Adafactor",)
# torch implementation switches: meaningless for COAP, dropped from the groups
_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay")
# where optimizer wrappers conventionally keep the optimizer they wrap: Composer's SAMOptimizer
# (base_optimizer), Lightning's LightningOptimizer (_optimizer), and the usual spellings elsewhere
WRAPPED_OPTIMIZER_ATTRS = ("base_optimizer", "optimizer", "optim", "_optimizer")


def translatable_names() -> str:
    """The optimizers ``optimizer="auto"`` can translate, for error messages."""
    return "torch.optim.AdamW / Adam, composer DecoupledAdamW -> CoapAdamW; Adafactor (torch, timm, transformers) -> CoapAdafactor"


def parse_interval(name: str, value: Any) -> int:
    """An interval in optimizer steps: a positive int, or a string ``"<N>ba"`` (batches)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(ba|batch|batches|step|steps)\s*", value)
        if m is None:
            raise ValueError(
                f"Invalid {name}: {value!r} (expected an integer number of optimizer steps or a batch count "
                "such as '32ba'; epochs, samples and tokens are not supported)"
            )
        value = int(m.group(1))
    return check_positive_int(name, value)


def _is_finite_number(value: Any, low: float) -> bool:
    """A real number (not a bool, not a tensor), finite and >= ``low``."""
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    )


@dataclass
class CoapSettings:
    """Every COAP setting an adapter takes, validated on construction.

    Args:
        optimizer: ``"auto"`` (translate the user's optimizer: AdamW/Adam -> CoapAdamW,
            Adafactor -> CoapAdafactor) or a COAP optimizer name (``"coap_adamw"``,
            ``"coap_adafactor"``, ... , see :data:`coap_plugins.optim.OPTIMIZERS`) to use whatever
            the user passed (default ``"auto"``).
        eight_bit: use the 8-bit form of the chosen optimizer (default False).
        rank, rank_ratio_matrix, rank_ratio_conv, min_conv_numel: ranks and size floor, as in
            :class:`~coap_plugins.CoapPolicy` (defaults None, None, None, 9216).
        rank_ratio_cnn: the reference implementation's name for ``rank_ratio_conv``, accepted
            as an alias (default None); giving both with different values is an error.
        exclude: parameter-name patterns kept full rank (default none).
        policy: a :class:`~coap_plugins.CoapPolicy`; when given, the rank arguments and
            ``exclude`` must be left at their defaults (default None: one is built from them).
        update_interval: T_u, an int (optimizer steps) or ``"<N>ba"`` (default 32).
        reproject_factor: lambda, every lambda-th refresh is an SVD recalibration (default 5).
        restore_state: carry moments into a new basis (default False).
        seed: base seed of the projectors (default 0).
        lr, betas, eps, weight_decay: used only when there is no user optimizer to translate
            (defaults 1e-3, (0.9, 0.999), 1e-8, 1e-2); always validated: finite, ``lr``, ``eps``
            and ``weight_decay`` >= 0, each beta in [0, 1).
    """

    optimizer: str = "auto"
    eight_bit: bool = False
    rank: int | None = None
    rank_ratio_matrix: float | None = None
    rank_ratio_conv: float | None = None
    min_conv_numel: int = DEFAULT_MIN_CONV_NUMEL
    exclude: Sequence[str] = ()
    policy: CoapPolicy | None = None
    update_interval: int | str = 32
    reproject_factor: int = 5
    restore_state: bool = False
    seed: int = 0
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    rank_ratio_cnn: float | None = None
    _interval: int = field(init=False, repr=False, default=32)

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, str) or (self.optimizer != "auto" and self.optimizer.lower() not in OPTIMIZERS):
            raise ValueError(
                f"Invalid optimizer: {self.optimizer!r} (expected 'auto' or one of {', '.join(OPTIMIZERS)})"
            )
        if not isinstance(self.eight_bit, bool):
            raise ValueError(f"Invalid eight_bit: {self.eight_bit!r} (must be True or False)")
        if not isinstance(self.restore_state, bool):
            raise ValueError(f"Invalid restore_state: {self.restore_state!r} (must be True or False)")
        check_rank(self.rank)
        check_ratio("rank_ratio_matrix", self.rank_ratio_matrix)
        check_ratio("rank_ratio_conv", self.rank_ratio_conv)
        check_ratio("rank_ratio_cnn", self.rank_ratio_cnn)
        conv_name = "rank_ratio_conv"
        if self.rank_ratio_cnn is not None:
            if self.rank_ratio_conv is not None and self.rank_ratio_conv != self.rank_ratio_cnn:
                raise ValueError(
                    f"Conflicting settings: rank_ratio_cnn={self.rank_ratio_cnn!r} and "
                    f"rank_ratio_conv={self.rank_ratio_conv!r} (rank_ratio_cnn is an alias of rank_ratio_conv: give one)"
                )
            if self.rank_ratio_conv is None:
                conv_name = "rank_ratio_cnn"
            self.rank_ratio_conv = self.rank_ratio_cnn
        check_min_numel("min_conv_numel", self.min_conv_numel)
        self._interval = parse_interval("update_interval", self.update_interval)
        check_positive_int("reproject_factor", self.reproject_factor)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"Invalid seed: {self.seed!r} (must be an integer)")
        for key in ("lr", "eps", "weight_decay"):
            if not _is_finite_number(getattr(self, key), low=0.0):
                raise ValueError(f"Invalid {key}: {getattr(self, key)!r} (must be a finite number >= 0)")
        betas = self.betas
        if not (
            isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_is_finite_number(b, low=0.0) and b < 1 for b in betas)
        ):
            raise ValueError(f"Invalid betas: {betas!r} (must be a pair of finite numbers in [0, 1))")
        self.betas = (betas[0], betas[1])
        if self.policy is not None:
            if not isinstance(self.policy, CoapPolicy):
                raise ValueError(f"Invalid policy: {self.policy!r} (expected a coap_plugins.CoapPolicy or None)")
            given = [
                k
                for k, v, d in (
                    ("rank", self.rank, None),
                    ("rank_ratio_matrix", self.rank_ratio_matrix, None),
                    (conv_name, self.rank_ratio_conv, None),
                    ("min_conv_numel", self.min_conv_numel, DEFAULT_MIN_CONV_NUMEL),
                    ("exclude", tuple(self.exclude), ()),
                )
                if v != d
            ]
            if given:
                raise ValueError(
                    f"Conflicting settings: a policy was given together with {', '.join(given)}; "
                    "set them on the CoapPolicy instead"
                )
        else:
            self.policy = CoapPolicy(
                exclude=self.exclude,
                min_conv_numel=self.min_conv_numel,
                rank=self.rank,
                rank_ratio_matrix=self.rank_ratio_matrix,
                rank_ratio_conv=self.rank_ratio_conv,
            )

    @property
    def interval(self) -> int:
        """``update_interval`` in optimizer steps."""
        return self._interval

    def schedule(self) -> ProjectionSchedule:
        return ProjectionSchedule(self._interval, self.reproject_factor)

    def coap_kwargs(self) -> dict[str, Any]:
        """Constructor arguments shared by every COAP optimizer."""
        policy = self.policy
        assert policy is not None
        return dict(
            rank=policy.rank,
            rank_ratio_matrix=policy.rank_ratio_matrix,
            rank_ratio_conv=policy.rank_ratio_conv,
            min_conv_numel=policy.min_conv_numel,
            update_interval=self._interval,
            reproject_factor=self.reproject_factor,
            restore_state=self.restore_state,
            seed=self.seed,
        )

    def optimizer_class(self, family: str | None = None) -> type[CoapOptimizer]:
        """The class to build: the named one, or the ``family`` (``"adamw"``/``"adafactor"``)."""
        name = self.optimizer.lower() if self.optimizer != "auto" else f"coap_{family or 'adamw'}"
        if self.eight_bit and not name.endswith("8bit"):
            name += "8bit"
        return get_optimizer_class(name)


def _family(optimizer: torch.optim.Optimizer) -> str | None:
    names = [c.__name__ for c in type(optimizer).__mro__]
    if isinstance(optimizer, CoapOptimizer):
        return None
    if any(n in _ADAM_NAMES for n in names):
        return "adamw"
    if any(n in _ADAFACTOR_NAMES for n in names):
        return "adafactor"
    return None


def _adam_group(group: dict[str, Any], decoupled_by_lr: bool, source: str) -> dict[str, Any]:
    for flag in ("amsgrad", "maximize"):
        if group.get(flag):
            raise ValueError(f"Cannot translate {source} with {flag}=True: COAP's AdamW has no {flag} (set {flag}=False)")
    if source == "Adam" and group.get("weight_decay") and not group.get("decoupled_weight_decay", False):
        raise ValueError(
            f"Cannot translate Adam with weight_decay={group['weight_decay']}: Adam adds it to the gradient (L2), "
            "CoapAdamW decays the weights (as AdamW). Use torch.optim.AdamW, or Adam with weight_decay=0"
        )
    out = {k: v for k, v in group.items() if k not in _IMPL_KEYS + ("amsgrad", "maximize")}
    if decoupled_by_lr and out.get("weight_decay", 0):
        # DecoupledAdamW multiplies weights by 1 - wd * lr / initial_lr; AdamW by 1 - lr * wd'.
        base = out.get("initial_lr") or out["lr"]
        out["weight_decay"] = out["weight_decay"] / base if base else 0.0
    return out


def _adafactor_group(group: dict[str, Any], source_is_torch: bool) -> dict[str, Any]:
    if group.get("maximize"):
        raise ValueError("Cannot translate Adafactor with maximize=True (set maximize=False)")
    if group.get("caution"):
        raise ValueError("Cannot translate Adafactor with caution=True: CoapAdafactor has no cautious update (set caution=False)")
    out = {k: v for k, v in group.items() if k not in _IMPL_KEYS + ("maximize", "caution")}
    if "eps_scale" in out:
        # timm.optim.Adafactor: eps and eps_scale where transformers has eps=(eps1, eps2); its
        # parameter scaling only acts with relative_step (an explicit lr is applied as is)
        out["eps"] = (out.pop("eps"), out.pop("eps_scale"))
        out["scale_parameter"] = bool(out.get("scale_parameter", True) and out.get("relative_step"))
        out.pop("min_dim_size_to_factor", None)  # COAP factors every projected moment
    elif source_is_torch:
        # torch.optim.Adafactor: (lr, beta2_decay, eps=(eps1, eps2), d, weight_decay), no first moment
        eps1, eps2 = out.pop("eps", (None, 1e-3))
        out["eps"] = (1e-30 if eps1 is None else eps1, eps2)
        out["decay_rate"] = out.pop("beta2_decay", -0.8)
        out["clip_threshold"] = out.pop("d", 1.0)
        out.setdefault("beta1", None)
        out.setdefault("relative_step", False)
    return out


def translate_optimizer(
    optimizer: torch.optim.Optimizer, model: nn.Module, settings: CoapSettings, *, adapter: str = "CoapAlgorithm"
) -> CoapOptimizer:
    """The COAP counterpart of ``optimizer``, its param groups kept one-to-one.

    AdamW / Adam / Composer's DecoupledAdamW become CoapAdamW, Adafactor becomes CoapAdafactor
    (8-bit forms with ``settings.eight_bit``).  Each group keeps its order, lr, betas, eps,
    weight decay and every extra key (``initial_lr`` included, so schedulers keep their base);
    DecoupledAdamW's lr-free weight decay is converted to AdamW's (``wd / initial_lr``).  The
    projector kind of each parameter comes from ``settings.policy``.  Any other optimizer is
    refused unless ``settings.optimizer`` names a COAP optimizer, in which case the groups keep
    lr, weight decay and their extra keys and everything else takes the COAP defaults.
    ``adapter`` is the name the refusal message gives the caller (``"CoapCallback"`` in Lightning).
    """
    if isinstance(optimizer, CoapOptimizer):
        raise ValueError(f"The optimizer is already a COAP optimizer ({type(optimizer).__name__}); nothing to translate")
    name = type(optimizer).__name__
    if any(optimizer.state.values()):
        raise ValueError(f"Cannot translate {name}: it already holds state (swap it before the first step)")
    family = _family(optimizer)
    if settings.optimizer == "auto" and family is None:
        raise ValueError(
            f"{adapter} cannot translate {name}: supported are {translatable_names()}. "
            f"Pass one of those, or name the COAP optimizer explicitly (optimizer='coap_adamw', ...) "
            f"to keep {name}'s lr and weight decay and use COAP defaults for the rest"
        )
    cls = settings.optimizer_class(family)
    target = "adafactor" if issubclass(cls, CoapAdafactor) else "adamw"
    groups = []
    for group in optimizer.param_groups:
        group = {k: v for k, v in group.items() if k != "param_names"}
        if family == target == "adamw":
            group = _adam_group(group, "DecoupledAdamW" in [c.__name__ for c in type(optimizer).__mro__], name)
        elif family == target == "adafactor":
            group = _adafactor_group(group, isinstance(optimizer, getattr(torch.optim, "Adafactor", ())))
        else:
            # foreign hyperparameters: keep lr, weight decay and the user's extra keys only
            group = {k: v for k, v in group.items() if k in ("params", "lr", "weight_decay", "initial_lr") or k not in optimizer.defaults}
        groups.append(group)
    assert settings.policy is not None
    new_groups = settings.policy.param_groups(model, groups)
    return cls(new_groups, **settings.coap_kwargs())


def build_optimizer(model: nn.Module, settings: CoapSettings) -> CoapOptimizer:
    """A COAP optimizer over every trainable parameter of ``model`` from the settings alone."""
    cls = settings.optimizer_class("adamw")
    assert settings.policy is not None
    groups = settings.policy.param_groups(model)
    if issubclass(cls, CoapAdamW):
        hyper = dict(lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, weight_decay=settings.weight_decay)
    else:
        hyper = dict(lr=settings.lr, weight_decay=settings.weight_decay)
    return cls(groups, **hyper, **settings.coap_kwargs())


def _track_step_calls(optimizer: torch.optim.Optimizer) -> None:
    """Mark ``optimizer.step`` the way a torch ``LRScheduler`` does, so the scheduler can tell
    that the optimizer stepped before it (otherwise it warns about the call order)."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    func = optimizer.step.__func__  # type: ignore[attr-defined]
    ref = weakref.ref(optimizer)

    @functools.wraps(func)
    def step(*args: Any, **kwargs: Any) -> Any:
        opt = ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return func.__get__(opt, type(opt))(*args, **kwargs)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = step  # type: ignore[method-assign]


def rebind_lr_scheduler(scheduler: Any, old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> bool:
    """Point a torch LR scheduler built on ``old`` at ``new``; returns whether it was bound to ``old``.

    The groups must correspond one-to-one (as :func:`translate_optimizer` guarantees): the
    scheduler's ``base_lrs`` pair with the groups by position, and each new group already holds
    the lr the scheduler last set.
    """
    if getattr(scheduler, "optimizer", None) is not old:
        return False
    if len(old.param_groups) != len(new.param_groups):
        raise ValueError(
            f"Cannot re-bind {type(scheduler).__name__}: the old optimizer has {len(old.param_groups)} param groups, "
            f"the new one {len(new.param_groups)}"
        )
    scheduler.optimizer = new
    _track_step_calls(new)
    new._opt_called = getattr(old, "_opt_called", False)  # type: ignore[attr-defined]
    return True


def find_coap_optimizers(optimizers: Iterable[Any]) -> list[CoapOptimizer]:
    """The COAP optimizers in ``optimizers``, looking through optimizer wrappers.

    A wrapper (Composer's ``SAMOptimizer``, Lightning's ``LightningOptimizer``, ...) is followed
    through the attribute that conventionally holds the optimizer it wraps
    (:data:`WRAPPED_OPTIMIZER_ATTRS`), recursively; each object is visited once, so wrappers that
    point at each other end the search.  Order of first appearance, no duplicates.
    """
    found: list[CoapOptimizer] = []
    seen: set[int] = set()
    todo = list(optimizers)[::-1]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, CoapOptimizer):
            found.append(obj)
            continue
        inner = [getattr(obj, attr, None) for attr in WRAPPED_OPTIMIZER_ATTRS]
        todo.extend(o for o in reversed(inner) if o is not None and callable(getattr(o, "step", None)))
    return found


def settle_refresh(optimizer: CoapOptimizer) -> bool:
    """After the batch whose step should have run a requested refresh: whether it did.

    :meth:`~coap_plugins.optim.CoapOptimizer.step` clears the request of every group it runs;
    a request still pending means no step ran (a skipped AMP step, a wrapper that did not call
    the optimizer).  It is withdrawn, so it does not run later, off the schedule.
    """
    pending = [g for g in optimizer.param_groups if g.get("pending_refresh", "none") != "none"]
    for group in pending:
        group["pending_refresh"] = "none"
    return not pending


def _unwrapped(model: nn.Module) -> nn.Module:
    # DDP adds "module." to every name; route on the names the swap saw
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def remember_routing(optimizer: CoapOptimizer) -> dict[int, str]:
    """The projection kinds of the parameters of ``optimizer``'s unnamed groups, by tensor identity
    (for :func:`reroute_groups`; named groups are looked up by name)."""
    kinds = {}
    for group in optimizer.param_groups:
        if isinstance(group["projection"], list) and "param_names" not in group:
            kinds.update((id(p), k) for p, k in zip(group["params"], group["projection"]))
    return kinds


def _by_name(name: str, table: dict[str, str]) -> str | None:
    # the user may have named the parameters on the inner network ("features.0.weight") where
    # the model the framework holds says "module.features.0.weight"
    parts = name.split(".")
    for i in range(len(parts) - 1):
        kind = table.get(".".join(parts[i:]))
        if kind is not None:
            return kind
    return None


def reroute_groups(
    optimizer: CoapOptimizer,
    model: nn.Module,
    policy: CoapPolicy,
    *,
    own_routing: bool = False,
    remembered: dict[int, str] | None = None,
) -> bool:
    """Re-derive each group's ``projection`` list and ``param_names`` from the parameters it holds now.

    Module surgery (Composer's BlurPool, ...) replaces parameters inside the groups and leaves
    the per-parameter lists out of step with ``group["params"]``.  Every parameter is routed by
    ``policy`` on the current ``model`` (by tensor identity), so the outcome does not depend on
    whether the surgery ran before or after the swap, and is named as ``model`` names it (a DDP
    wrapper's ``module.`` prefix left out).  With ``own_routing`` (an optimizer the user built
    with their own routing) a parameter keeps the kind its group gave it, looked up by the
    group's ``param_names`` (surgery leaves them paired with the kinds; a name may lack a
    leading prefix of the model's name) or, in groups without names, by tensor identity in
    ``remembered`` (:func:`remember_routing` at the swap); only the parameters not found,
    added by surgery, are routed by ``policy``.  Groups with one projection string for
    every parameter are left as they are.  Idempotent; returns whether anything changed.  A
    parameter that already has optimizer state and would change kind is refused (its state has
    the other kind's shapes).
    """
    model = _unwrapped(model)
    derived = policy.param_groups(model, [{"params": list(g["params"])} for g in optimizer.param_groups])
    changed = False
    for gi, (group, new) in enumerate(zip(optimizer.param_groups, derived)):
        old = group["projection"]
        if not isinstance(old, list):
            continue
        names = [name for name, _ in new["params"]]
        kinds = list(new["projection"])
        if own_routing and "param_names" in group:
            table = dict(zip(group["param_names"], old))
            kinds = [_by_name(n, table) or k for n, k in zip(names, kinds)]
        elif own_routing:
            known = remembered or {}
            kinds = [known.get(id(p), k) for p, k in zip(group["params"], kinds)]
        for i, (p, kind) in enumerate(zip(group["params"], kinds)):
            before = old[i] if i < len(old) else None
            if before != kind and optimizer.state.get(p):
                raise ValueError(
                    f"Cannot re-route {names[i]} (param group {gi}) from {before!r} to {kind!r}: it already has "
                    "optimizer state. Apply module surgery before training starts"
                )
        if kinds != old:
            group["projection"] = kinds
            changed = True
        if "param_names" in group and group["param_names"] != names:
            group["param_names"] = names
            changed = True
    return changed


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
                ranks = {k: v for k, v in vars(proj).items() if "rank" in k}
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
