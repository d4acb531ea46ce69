"""Framework-free parts of the adapters: settings, optimizer translation, scheduler re-binding.

The Composer algorithm and the Lightning callback share these:

* :class:`CoapSettings` holds and validates every COAP setting an adapter takes;
* :func:`translate_optimizer` turns a torch optimizer into its COAP counterpart, keeping the
  user's param groups one-to-one (same order, lr, betas, eps, weight decay, extra keys) through
  :meth:`~coap_plugins.CoapPolicy.param_groups`;
* :func:`build_optimizer` builds a COAP optimizer from the settings alone (no user optimizer);
* :func:`rebind_lr_scheduler` points a torch ``LRScheduler`` built on the old optimizer at the
  new one.
"""

from __future__ import annotations

import functools
import math
import re
import weakref
from collections.abc import Sequence
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
    "parse_interval",
    "rebind_lr_scheduler",
    "refresh_metrics",
    "routing_summary",
    "routing_table",
    "translate_optimizer",
    "translatable_names",
]

_ADAM_NAMES = ("AdamW", "Adam", "DecoupledAdamW")
_ADAFACTOR_NAMES = ("Adafactor",)
# torch implementation switches: meaningless for COAP, dropped from the groups
_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay")


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
        exclude: parameter-name patterns kept full rank (default none).
        policy: a :class:`~coap_plugins.CoapPolicy`; when given, the rank arguments and
            ``exclude`` must be left at their defaults (default None: one is built from them).
        update_interval: T_u, an int (optimizer steps) or ``"<N>ba"`` (default 32).
        reproject_factor: lambda, every lambda-th refresh is an SVD recalibration (default 5).
        restore_state: carry moments into a new basis (default False).
        seed: base seed of the projectors (default 0).
        lr, betas, eps, weight_decay: used only when there is no user optimizer to translate
            (defaults 1e-3, (0.9, 0.999), 1e-8, 1e-2).
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
        check_min_numel("min_conv_numel", self.min_conv_numel)
        self._interval = parse_interval("update_interval", self.update_interval)
        check_positive_int("reproject_factor", self.reproject_factor)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"Invalid seed: {self.seed!r} (must be an integer)")
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and self.lr >= 0):
            raise ValueError(f"Invalid lr: {self.lr!r} (must be a number >= 0)")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"Invalid weight_decay: {self.weight_decay!r} (must be a number >= 0)")
        if self.policy is not None:
            if not isinstance(self.policy, CoapPolicy):
                raise ValueError(f"Invalid policy: {self.policy!r} (expected a coap_plugins.CoapPolicy or None)")
            given = [
                k
                for k, v, d in (
                    ("rank", self.rank, None),
                    ("rank_ratio_matrix", self.rank_ratio_matrix, None),
                    ("rank_ratio_conv", self.rank_ratio_conv, None),
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
