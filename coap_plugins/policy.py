"""Module-type policy: which projector each layer gets, with what rank, and why."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._checks import check_min_numel, check_rank, check_ratio
from .projection import DEFAULT_MIN_CONV_NUMEL, Projector, build_projector
from .projection.routing import PROJECTION_REASONS

__all__ = ["CoapPolicy", "LayerRoute"]

_POLICY_KINDS = ("matrix", "tucker2", "none")
_NOT_IN_MODEL = "full rank: not a parameter of the model the policy routed"


@dataclass(frozen=True)
class LayerRoute:
    """How one parameter is treated, and why."""

    name: str
    module_type: str
    shape: tuple[int, ...]
    kind: str  # "matrix" | "tucker2" | "none"
    projector: Projector | None
    reason: str


class CoapPolicy:
    """Maps module types to projector kinds and turns a model into COAP param groups.

    Defaults: ``nn.Linear`` weights -> matrix projector, ``nn.Conv2d`` weights -> Tucker-2,
    every other parameter (biases, norms, embeddings, ...) full rank.  Subclasses of a mapped
    type inherit its kind (the most specific mapped type wins).

    Args:
        module_kinds: module type -> ``"matrix" | "tucker2" | "none"`` for its ``weight``
            (default ``{nn.Linear: "matrix", nn.Conv2d: "tucker2"}``).
        exclude: shell-style patterns matched against parameter and module names; a match keeps
            the parameter full rank (e.g. ``("fc", "head.*")`` for a classifier head).
        min_numel: weights with fewer elements stay full rank (default 0).
        min_conv_numel: convs with at most this many elements stay full rank (default 9216,
            the reference's 32*32*3*3).
        rank, rank_ratio_matrix, rank_ratio_conv: ranks per kind, as in
            :class:`~coap_plugins.CoapAdamW` (ratio 4 when none is given).

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> policy = CoapPolicy(rank_ratio_conv=4, exclude=["fc"])
        >>> opt = CoapAdamW(policy.param_groups(model), lr=1e-3)
        >>> print(policy.explain(model))  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        module_kinds: Mapping[type[nn.Module], str] | None = None,
        exclude: Sequence[str] = (),
        min_numel: int = 0,
        min_conv_numel: int = DEFAULT_MIN_CONV_NUMEL,
        rank: int | None = None,
        rank_ratio_matrix: float | None = None,
        rank_ratio_conv: float | None = None,
    ) -> None:
        kinds = dict(module_kinds) if module_kinds is not None else {nn.Linear: "matrix", nn.Conv2d: "tucker2"}
        for mtype, kind in kinds.items():
            if not (isinstance(mtype, type) and issubclass(mtype, nn.Module)):
                raise ValueError(f"Invalid module type in module_kinds: {mtype!r} (expected an nn.Module subclass)")
            if kind not in _POLICY_KINDS:
                raise ValueError(
                    f"Invalid projector kind for {mtype.__name__}: {kind!r} "
                    f"(expected one of {', '.join(_POLICY_KINDS)})"
                )
        if isinstance(exclude, str):
            exclude = [exclude]
        for pattern in exclude:
            if not isinstance(pattern, str):
                raise ValueError(f"Invalid exclude pattern: {pattern!r} (expected a string)")
        check_min_numel("min_numel", min_numel)
        check_min_numel("min_conv_numel", min_conv_numel)
        check_rank(rank)
        check_ratio("rank_ratio_matrix", rank_ratio_matrix)
        check_ratio("rank_ratio_conv", rank_ratio_conv)
        self.module_kinds = kinds
        self.exclude = tuple(exclude)
        self.min_numel = min_numel
        self.min_conv_numel = min_conv_numel
        self.rank = rank
        self.rank_ratio_matrix = rank_ratio_matrix
        self.rank_ratio_conv = rank_ratio_conv

    def __repr__(self) -> str:
        kinds = {t.__name__: k for t, k in self.module_kinds.items()}
        return (
            f"CoapPolicy(module_kinds={kinds}, exclude={list(self.exclude)}, min_numel={self.min_numel}, "
            f"min_conv_numel={self.min_conv_numel}, rank={self.rank}, rank_ratio_matrix={self.rank_ratio_matrix}, "
            f"rank_ratio_conv={self.rank_ratio_conv})"
        )

    @property
    def group_settings(self) -> dict[str, Any]:
        """The rank settings this policy was given, written into every group it builds.

        Settings left at ``None`` are not written, so the optimizer's own arguments apply to
        them; the size floor is the policy's own business (it is applied while routing).
        """
        settings = {
            "rank": self.rank,
            "rank_ratio_matrix": self.rank_ratio_matrix,
            "rank_ratio_conv": self.rank_ratio_conv,
        }
        return {k: v for k, v in settings.items() if v is not None}

    def _kind_for(self, module: nn.Module) -> str | None:
        for cls in type(module).__mro__:
            if cls in self.module_kinds:
                return self.module_kinds[cls]
        return None

    def _excluded_by(self, *names: str) -> str | None:
        for pattern in self.exclude:
            if any(fnmatch.fnmatchcase(n, pattern) for n in names if n):
                return pattern
        return None

    def route(self, model: nn.Module) -> list[LayerRoute]:
        """Every parameter of ``model`` (shared ones once), in ``named_parameters`` order."""
        owners: dict[int, tuple[str, nn.Module, str]] = {}
        for mod_name, module in model.named_modules():
            for attr, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), (mod_name, module, attr))
        routes = []
        for name, p in model.named_parameters():
            mod_name, module, attr = owners[id(p)]
            shape = tuple(p.shape)
            kind = self._kind_for(module) if attr == "weight" else None
            pattern = self._excluded_by(name, mod_name)
            if kind is None or kind == "none":
                why = (
                    f"{type(module).__name__}.{attr} is not mapped to a projector"
                    if kind is None
                    else f"{type(module).__name__} mapped to 'none'"
                )
                proj, reason = None, why
            elif pattern is not None:
                proj, reason = None, f"excluded by pattern {pattern!r}"
            elif p.numel() < self.min_numel:
                proj, reason = None, f"{p.numel()} < min_numel={self.min_numel} elements"
            else:  # the shape rules (size floor, ranks, memory) are the optimizer's own
                proj, reason = build_projector(
                    shape,
                    kind,
                    rank=self.rank,
                    rank_ratio_matrix=self.rank_ratio_matrix,
                    rank_ratio_conv=self.rank_ratio_conv,
                    min_conv_numel=self.min_conv_numel,
                    floor_tucker2=True,
                )
            routes.append(
                LayerRoute(
                    name=name,
                    module_type=type(module).__name__,
                    shape=shape,
                    kind=proj.kind if proj is not None else "none",
                    projector=proj,
                    reason=reason,
                )
            )
        return routes

    def param_groups(self, model: nn.Module, base_groups: Iterable[Any] | None = None) -> list[dict[str, Any]]:
        """COAP param groups one-to-one with ``base_groups`` (same order, same hyperparameters).

        Each returned group keeps every key of its base group (lr, betas, eps, weight decay,
        any extra key), lists its parameters as ``(name, tensor)`` pairs in the same order, and
        adds ``projection`` (one kind per parameter), ``projection_reasons`` (why, one plain
        string per parameter: the optimizer reports it for the parameters this policy keeps full
        rank, see :meth:`~coap_plugins.CoapOptimizer.routing`) and the rank settings this policy
        was given (those left at ``None`` come from the optimizer's arguments).  Keeping
        the groups one-to-one is what keeps LR schedulers bound by position (``LambdaLR``'s
        ``base_lrs``) pairing with the right group after an optimizer swap.

        Args:
            model: the module whose parameters are routed.
            base_groups: the user's groups (e.g. ``optimizer.param_groups``), a list of group
                dicts, or an iterable of parameters; ``None`` means one group with every
                parameter of ``model`` that requires grad.
        """
        routes = {}
        for route, (_, p) in zip(self.route(model), model.named_parameters()):
            routes[id(p)] = route
        if base_groups is None:
            groups: list[dict[str, Any]] = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        else:
            groups = list(base_groups)
            if not groups:
                raise ValueError("Invalid base_groups: empty (pass the user's param groups or None)")
            if not isinstance(groups[0], Mapping):
                groups = [{"params": groups}]
        out = []
        for gi, group in enumerate(groups):
            if not isinstance(group, Mapping) or "params" not in group:
                raise ValueError(
                    f"Invalid base_groups[{gi}]: expected a dict with a 'params' list, got {type(group).__name__}"
                )
            params = group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            named, kinds, reasons = [], [], []
            for pi, item in enumerate(params):
                p = item[1] if isinstance(item, tuple) else item
                route = routes.get(id(p))
                if route is None:
                    name = item[0] if isinstance(item, tuple) else f"group{gi}.param{pi}"
                    kinds.append("none")
                    reasons.append(_NOT_IN_MODEL)
                else:
                    name = route.name
                    kinds.append(route.kind)
                    reasons.append(route.reason)
                named.append((name, p))
            new = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            new.update(self.group_settings)
            new["params"] = named
            new["projection"] = kinds
            new[PROJECTION_REASONS] = reasons
            out.append(new)
        return out

    def explain(self, model: nn.Module) -> str:
        """A table of every parameter: shape, projector, and the reason for the choice."""
        rows = [("parameter", "module", "shape", "projector", "why")]
        for r in self.route(model):
            rows.append((r.name, r.module_type, "x".join(map(str, r.shape)) or "scalar", r.kind, r.reason))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
        return "\n".join(lines)
