"""The COAP settings an adapter (Composer's algorithm, Lightning's callback, the YAML runner) takes.

:class:`CoapSettings` holds and validates them once; the optimizers' constructor arguments
(:meth:`CoapSettings.coap_kwargs`), the policy and the projection schedule are derived from it.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._checks import (
    SettingError,
    check_choice,
    check_min_numel,
    check_nonnegative,
    check_positive_int,
    check_rank,
    check_ratio,
    check_update_scale,
    is_finite_number,
)
from .optim import OPTIMIZERS, CoapOptimizer, get_optimizer_class
from .optim._backward import ACCUMULATIONS, REDUCTIONS
from .optim._base import DEFAULT_RESIDUAL, RESIDUALS
from .policy import CoapPolicy
from .projection import DEFAULT_MIN_CONV_NUMEL
from .projection.linalg import (
    BASIS_ALIGNMENTS,
    CORRELATION_LOSSES,
    DEFAULT_BASIS_ALIGNMENT,
    DEFAULT_CORRELATION_LOSS,
)
from .schedule import ProjectionSchedule

__all__ = ["CoapSettings", "parse_interval", "takes_settings", "translatable_names"]


def translatable_names() -> str:
    """The optimizers ``optimizer="auto"`` can translate, for error messages."""
    return (
        "torch.optim.AdamW / Adam, composer DecoupledAdamW -> CoapAdamW; Adafactor (torch, timm, transformers) "
        "-> CoapAdafactor"
    )


def parse_interval(name: str, value: Any) -> int:
    """An interval in optimizer steps: a positive int, or a string ``"<N>ba"`` (batches)."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(ba|batch|batches|step|steps)\s*", value)
        if m is None:
            raise SettingError(
                name,
                f"{value!r} (expected an integer number of optimizer steps or a batch count "
                "such as '32ba'; epochs, samples and tokens are not supported)",
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
        rank_ratio_cnn: the reference implementation's name for ``rank_ratio_conv``, accepted
            as an alias (default None); giving both with different values is an error.
        exclude: parameter-name patterns kept full rank (default none).
        policy: a :class:`~coap_plugins.CoapPolicy`; when given, the rank arguments and
            ``exclude`` must be left at their defaults (default None: one is built from them).
        update_interval: T_u, an int (optimizer steps) or ``"<N>ba"`` (default 32).
        reproject_factor: lambda, every lambda-th refresh is an SVD recalibration (default 5).
        restore_state: carry moments into a new basis (default False).
        basis_alignment: how a recalibrated basis is laid onto the old one: ``"none"``,
            ``"sign"`` or ``"rotation"`` (default ``"none"``).
        correlation_loss: ``"paper"`` (supplementary Eq. 2) or ``"relative"`` (its reconstruction
            term relative to the gradient's energy: the same step at every gradient scale)
            (default ``"paper"``).
        update_scale: factor on every projected update, a number > 0 or ``"auto"`` (each
            projector's ``size_ratio``), or None for the optimizer's own default (``"auto"`` for
            the AdamW forms, 1.0 for the Adafactor forms) (default None).
        residual: ``"none"`` (the gradient outside the subspace is dropped, as the paper) or
            ``"scaled"`` (applied at the projected update's relative step size) (default ``"scaled"``).
        seed: base seed of the projectors (default 0).
        step_in_backward: run each parameter's update inside the backward pass, as soon as its
            gradient is there, and free the gradient (:class:`~coap_plugins.optim.StepInBackward`)
            (default False).
        backward_reduce: with ``step_in_backward`` under DDP, ``"projected"`` (all-reduce ``G P``
            for the layers whose step needs only that) or ``"full"`` (every gradient, as DDP
            does) (default ``"projected"``).
        backward_accumulate: with ``step_in_backward`` and gradient accumulation, ``"projected"``
            (the micro-batches before the last accumulate ``G P`` where a layer needs only that:
            less memory, one more projection per micro-batch) or ``"full"`` (they accumulate
            ``.grad`` as without the option) (default ``"projected"``).
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
    basis_alignment: str = DEFAULT_BASIS_ALIGNMENT
    correlation_loss: str = DEFAULT_CORRELATION_LOSS
    update_scale: float | str | None = None
    residual: str = DEFAULT_RESIDUAL
    seed: int = 0
    step_in_backward: bool = False
    backward_reduce: str = "projected"
    backward_accumulate: str = "projected"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    rank_ratio_cnn: float | None = None
    _interval: int = field(init=False, repr=False, default=32)

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, str) or (
            self.optimizer != "auto" and self.optimizer.lower() not in OPTIMIZERS
        ):
            raise SettingError("optimizer", f"{self.optimizer!r} (expected 'auto' or one of {', '.join(OPTIMIZERS)})")
        if not isinstance(self.eight_bit, bool):
            raise SettingError("eight_bit", f"{self.eight_bit!r} (must be True or False)")
        if not isinstance(self.restore_state, bool):
            raise SettingError("restore_state", f"{self.restore_state!r} (must be True or False)")
        if not isinstance(self.step_in_backward, bool):
            raise SettingError("step_in_backward", f"{self.step_in_backward!r} (must be True or False)")
        check_choice("backward_reduce", self.backward_reduce, REDUCTIONS)
        check_choice("backward_accumulate", self.backward_accumulate, ACCUMULATIONS)
        check_choice("basis_alignment", self.basis_alignment, BASIS_ALIGNMENTS)
        check_choice("correlation_loss", self.correlation_loss, CORRELATION_LOSSES)
        if self.update_scale is not None:
            check_update_scale(self.update_scale)
        check_choice("residual", self.residual, RESIDUALS)
        check_rank(self.rank)
        check_ratio("rank_ratio_matrix", self.rank_ratio_matrix)
        check_ratio("rank_ratio_conv", self.rank_ratio_conv)
        check_ratio("rank_ratio_cnn", self.rank_ratio_cnn)
        conv_name = "rank_ratio_conv"
        if self.rank_ratio_cnn is not None:
            if self.rank_ratio_conv is not None and self.rank_ratio_conv != self.rank_ratio_cnn:
                raise ValueError(
                    f"Conflicting settings: rank_ratio_cnn={self.rank_ratio_cnn!r} and "
                    f"rank_ratio_conv={self.rank_ratio_conv!r} (rank_ratio_cnn is an alias of rank_ratio_conv: "
                    "give one)"
                )
            if self.rank_ratio_conv is None:
                conv_name = "rank_ratio_cnn"
            self.rank_ratio_conv = self.rank_ratio_cnn
        check_min_numel("min_conv_numel", self.min_conv_numel)
        self._interval = parse_interval("update_interval", self.update_interval)
        check_positive_int("reproject_factor", self.reproject_factor)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SettingError("seed", f"{self.seed!r} (must be an integer)")
        for key in ("lr", "eps", "weight_decay"):
            check_nonnegative(key, getattr(self, key))
        betas = self.betas
        if not (
            isinstance(betas, (tuple, list))
            and len(betas) == 2
            and all(is_finite_number(b) and 0 <= b < 1 for b in betas)
        ):
            raise SettingError("betas", f"{betas!r} (must be a pair of finite numbers in [0, 1))")
        self.betas = (betas[0], betas[1])
        if self.policy is not None:
            if not isinstance(self.policy, CoapPolicy):
                raise SettingError("policy", f"{self.policy!r} (expected a coap_plugins.CoapPolicy or None)")
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
            basis_alignment=self.basis_alignment,
            correlation_loss=self.correlation_loss,
            residual=self.residual,
            seed=self.seed,
            **({} if self.update_scale is None else {"update_scale": self.update_scale}),
        )

    def optimizer_class(self, family: str | None = None) -> type[CoapOptimizer]:
        """The class to build: the named one, or the ``family`` (``"adamw"``/``"adafactor"``)."""
        name = self.optimizer.lower() if self.optimizer != "auto" else f"coap_{family or 'adamw'}"
        if self.eight_bit and not name.endswith("8bit"):
            name += "8bit"
        return get_optimizer_class(name)

    @classmethod
    def from_arguments(cls, adapter: str, **kwargs: Any) -> CoapSettings:
        """The settings an adapter was called with; an unknown argument is a TypeError naming
        the adapter, as Python's own would."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        for key in kwargs:
            if key not in known:
                close = [k for k in known if k.startswith(key[:6])] if len(key) >= 6 else []
                hint = f"; did you mean {sorted(close)[0]!r}?" if close else ""
                raise TypeError(f"{adapter}() got an unexpected keyword argument {key!r}{hint}")
        return cls(**kwargs)


def takes_settings(init: Callable[..., None]) -> Callable[..., None]:
    """Give an adapter's ``__init__(self, optimizer="auto", *, <its own arguments>, **settings)``
    the explicit signature of every :class:`CoapSettings` field (keyword-only, with their types
    and defaults), so ``inspect``, IDEs and LightningCLI's argument parser see the settings that
    are declared once, here."""
    own = [p for p in inspect.signature(init).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in own}
    hints = typing.get_type_hints(CoapSettings)
    extra = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
        for f in dataclasses.fields(CoapSettings)
        if f.init and f.name not in taken
    ]
    positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]
    init.__signature__ = inspect.Signature(positional + extra + keyword, return_annotation=None)  # type: ignore[attr-defined]
    return init
