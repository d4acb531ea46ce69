"""Turning a torch optimizer into its COAP counterpart, and what comes with it.

* :func:`translate_optimizer` turns AdamW / Adam / Composer's DecoupledAdamW / Adafactor into
  the COAP optimizer, keeping the user's param groups one-to-one (same order, lr, betas, eps,
  weight decay, extra keys) through :meth:`~coap_plugins.CoapPolicy.param_groups`: what a
  plain-PyTorch user calls to switch an existing training loop to COAP;
* :func:`build_optimizer` builds a COAP optimizer from the settings alone (no user optimizer);
* :func:`rebind_lr_scheduler` points a torch ``LRScheduler`` built on the old optimizer at the
  new one;
* :func:`find_coap_optimizers` finds the COAP optimizers behind optimizer wrappers (Composer's
  ``SAMOptimizer``, Lightning's ``LightningOptimizer``);
* :func:`reroute_groups` re-derives the per-parameter routing of a COAP optimizer after module
  surgery replaced parameters in its groups.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .optim import CoapAdafactor, CoapAdamW, CoapOptimizer
from .policy import CoapPolicy
from .projection.routing import PROJECTION_REASONS
from .settings import CoapSettings, translatable_names

__all__ = [
    "WRAPPED_OPTIMIZER_ATTRS",
    "build_optimizer",
    "find_coap_optimizers",
    "rebind_lr_scheduler",
    "remember_routing",
    "reroute_groups",
    "translate_optimizer",
]

# (base_optimizer), Lightning's LightningOptimizer (_optimizer), and the usual spellings elsewhere
WRAPPED_OPTIMIZER_ATTRS = ("base_optimizer", "optimizer", "optim", "_optimizer")

# The optimizers ``optimizer="auto"`` translates, as (module, class): checked with isinstance
# against the real classes of the modules already imported (an optimizer of a library's class
# means that library is imported; nothing is imported here for the check).
_ADAM_CLASSES = (("torch.optim", "AdamW"), ("torch.optim", "Adam"), ("composer.optim", "DecoupledAdamW"))
_ADAFACTOR_CLASSES = (
    ("torch.optim", "Adafactor"),
    ("timm.optim", "Adafactor"),
    ("transformers.optimization", "Adafactor"),
)
_DECOUPLED_ADAMW = (("composer.optim", "DecoupledAdamW"),)
# torch implementation switches: meaningless for COAP, dropped from the groups
_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay")


def _loaded_classes(specs: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    found = (getattr(sys.modules.get(module), name, None) for module, name in specs)
    return tuple(c for c in found if isinstance(c, type))


def _family(optimizer: torch.optim.Optimizer) -> str | None:
    if isinstance(optimizer, CoapOptimizer):
        return None
    if isinstance(optimizer, _loaded_classes(_ADAM_CLASSES)):
        return "adamw"
    if isinstance(optimizer, _loaded_classes(_ADAFACTOR_CLASSES)):
        return "adafactor"
    return None


def _adam_group(group: dict[str, Any], decoupled_by_lr: bool, source: str) -> dict[str, Any]:
    for flag in ("amsgrad", "maximize"):
        if group.get(flag):
            raise ValueError(
                f"Cannot translate {source} with {flag}=True: COAP's AdamW has no {flag} (set {flag}=False)"
            )
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
        raise ValueError(
            "Cannot translate Adafactor with caution=True: CoapAdafactor has no cautious update (set caution=False)"
        )
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
    optimizer: torch.optim.Optimizer, model: nn.Module, settings: CoapSettings, *, adapter: str = "translate_optimizer"
) -> CoapOptimizer:
    """The COAP counterpart of ``optimizer``, its param groups kept one-to-one.

    AdamW / Adam / Composer's DecoupledAdamW become CoapAdamW, Adafactor becomes CoapAdafactor
    (8-bit forms with ``settings.eight_bit``).  Each group keeps its order, lr, betas, eps,
    weight decay and every extra key (``initial_lr`` included, so schedulers keep their base);
    DecoupledAdamW's lr-free weight decay is converted to AdamW's (``wd / initial_lr``).  The
    projector kind of each parameter comes from ``settings.policy``.  Any other optimizer is
    refused unless ``settings.optimizer`` names a COAP optimizer, in which case the groups keep
    lr, weight decay and their extra keys and everything else takes the COAP defaults.
    ``adapter`` is the name the refusal message gives the caller (``"CoapAlgorithm"``,
    ``"CoapCallback"``).
    """
    if isinstance(optimizer, CoapOptimizer):
        raise ValueError(
            f"The optimizer is already a COAP optimizer ({type(optimizer).__name__}); nothing to translate"
        )
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
            group = _adam_group(group, isinstance(optimizer, _loaded_classes(_DECOUPLED_ADAMW)), name)
        elif family == target == "adafactor":
            group = _adafactor_group(group, isinstance(optimizer, getattr(torch.optim, "Adafactor", ())))
        else:
            # foreign hyperparameters: keep lr, weight decay and the user's extra keys only
            group = {
                k: v
                for k, v in group.items()
                if k in ("params", "lr", "weight_decay", "initial_lr") or k not in optimizer.defaults
            }
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
        # the policy's reasons go with its kinds (a user's own routing keeps its own; the
        # optimizer ignores a reasons list that no longer lines up with the parameters)
        reasons = list(new.get(PROJECTION_REASONS, ()))
        if not own_routing and reasons and group.get(PROJECTION_REASONS) != reasons:
            group[PROJECTION_REASONS] = reasons
            changed = True
        if "param_names" in group and group["param_names"] != names:
            group["param_names"] = names
            changed = True
    return changed
