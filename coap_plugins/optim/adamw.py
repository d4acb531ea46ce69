"""CoapAdamW: AdamW with COAP's projected moments."""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_lr, check_nonnegative, conv_ratio_alias
from ..projection import DEFAULT_MIN_CONV_NUMEL, Projector
from ..projection.linalg import DEFAULT_BASIS_ALIGNMENT, DEFAULT_CORRELATION_LOSS
from ._base import DEFAULT_RESIDUAL, DEFAULT_UPDATE_SCALE, CoapOptimizer, coap_defaults

__all__ = ["CoapAdamW", "adam_moments", "adam_update_scale"]

ParamsT = Any  # an iterable of tensors, of (name, tensor) pairs, or of param-group dicts


def adam_moments(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float
) -> None:
    """Adam's moment updates, in place, in the order torch.optim.AdamW applies them."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def adam_update_scale(
    lr: float | torch.Tensor, beta1: float, beta2: float, step: int
) -> tuple[float | torch.Tensor, float]:
    """``(step_size, sqrt(bias_correction2))`` as torch.optim.AdamW computes them (``step_size``
    is a 0-d tensor when ``lr`` is one)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return lr / bias_correction1, bias_correction2**0.5


class CoapAdamW(CoapOptimizer):
    """AdamW whose moments live in COAP's low-rank projected space.

    2-D weights get a matrix projector, conv weights above ``min_conv_numel`` a Tucker-2
    projector, everything else (biases, norms, small convs) the plain AdamW update; a
    :class:`~coap_plugins.CoapPolicy` decides per parameter instead when its groups are passed.
    Every COAP setting can be overridden per param group.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param-group dicts.  Groups may set
            ``projection`` to one of ``"auto" | "matrix" | "tucker2" | "none"`` or to a list with
            one kind per parameter.
        lr: learning rate, a float or a 1-element tensor (as torch.optim.AdamW; a tensor lr is
            never read back in the step) (default 1e-3).
        betas: coefficients of the running averages (default (0.9, 0.999)).
        eps: term added to the denominator (default 1e-8, as torch).
        weight_decay: decoupled weight decay, applied as torch.optim.AdamW does (default 1e-2).
        rank: rank of matrix projectors when no ratio is given (default None).
        rank_ratio_matrix: matrix rank = min(m, n) // ratio; wins over ``rank`` (default None;
            with neither, ratio 4).
        rank_ratio_conv: Tucker-2 ranks = O // sqrt(ratio), I // sqrt(ratio); O // ratio when only
            the output mode is projected (1x1 convs) (default None = 4).  ``rank_ratio_cnn`` (the
            reference code's name) is accepted as an alias.
        update_interval: T_u, steps between projector refreshes (default 32).
        reproject_factor: lambda, every lambda-th refresh is a low-cost SVD (default 5).
        restore_state: carry the moments into the new basis when the projector changes
            (default False, as the reference).
        basis_alignment: how a recalibrated (SVD) basis is laid onto the old one before the
            moments read it: ``"none"`` (as the decomposition returns it; each column's sign is
            an arbitrary convention), ``"sign"`` (each new column flipped to point along its
            predecessor) or ``"rotation"`` (the orthonormal basis of the new subspace nearest
            the old one) (default ``"none"``).
        correlation_loss: the correlation update's loss: ``"paper"`` (supplementary Eq. 2, whose
            reconstruction term is a mean over the entries, so its step shrinks with the square
            of the gradient's scale) or ``"relative"`` (that term relative to the gradient's
            energy: the same step at every gradient scale) (default ``"paper"``).
        update_scale: factor on every projected update: a number > 0, or ``"auto"`` for each
            projector's ``size_ratio`` (``min(m, n) / r``; ``(O / r_O) (I / r_I)`` for Tucker-2).
            Adam normalizes r projected coordinates where AdamW normalizes min(m, n), so the
            paper's update is that many times smaller (default ``"auto"``; 1.0 is the paper's).
        residual: what becomes of the part of the gradient outside the subspace: ``"none"``
            (dropped, as the paper) or ``"scaled"`` (applied at ``|update| / |projected
            gradient|``, the step size the projected update takes; no state) (default
            ``"scaled"``).
        min_conv_numel: convs with at most this many elements stay full rank (default 9216).
        seed: base seed of the projectors' random starts (default 0).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> opt = CoapAdamW(model.parameters(), lr=1e-3, rank_ratio_matrix=4, update_interval=32)
    """

    nonnegative_moments = frozenset({"exp_avg_sq"})

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int | None = None,
        rank_ratio_matrix: float | None = None,
        rank_ratio_conv: float | None = None,
        update_interval: int = 32,
        reproject_factor: int = 5,
        restore_state: bool = False,
        basis_alignment: str = DEFAULT_BASIS_ALIGNMENT,
        correlation_loss: str = DEFAULT_CORRELATION_LOSS,
        update_scale: float | str = DEFAULT_UPDATE_SCALE,
        residual: str = DEFAULT_RESIDUAL,
        min_conv_numel: int = DEFAULT_MIN_CONV_NUMEL,
        seed: int = 0,
        rank_ratio_cnn: float | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            **coap_defaults(
                rank=rank,
                rank_ratio_matrix=rank_ratio_matrix,
                rank_ratio_conv=conv_ratio_alias(rank_ratio_conv, rank_ratio_cnn),
                update_interval=update_interval,
                reproject_factor=reproject_factor,
                restore_state=restore_state,
                basis_alignment=basis_alignment,
                correlation_loss=correlation_loss,
                update_scale=update_scale,
                residual=residual,
                min_conv_numel=min_conv_numel,
                seed=seed,
            ),
        )
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_nonnegative("epsilon value", group["eps"])
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair of floats in [0, 1))")
        for i, b in enumerate(betas):
            if isinstance(b, torch.Tensor):
                raise ValueError(
                    f"Invalid beta parameter at index {i}: a Tensor beta is not supported by "
                    f"{type(self).__name__}, pass a float"
                )
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b!r} (must be in [0, 1))")
        check_nonnegative("weight_decay value", group["weight_decay"])
        super()._validate_group(group)

    # -- moments -----------------------------------------------------------------------------
    def _moment_shapes(self, shape: tuple[int, ...], group: dict) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": shape, "exp_avg_sq": shape}

    def _direction_moment(self, state: dict, core: torch.Tensor) -> torch.Tensor:
        return self._storage.load(state, "exp_avg")

    def _rotate_moments(self, state: dict, proj: Projector, new: dict[str, torch.Tensor]) -> None:
        # The first moment rotates exactly; the second moment is an elementwise average of
        # squares, carried by the squared rotation (keeps it non-negative; exact for
        # permutations and sign flips of the basis).
        load, store = self._storage.load, self._storage.store
        store(state, "exp_avg", proj.rotate(load(state, "exp_avg"), state, new, squared=False))
        store(state, "exp_avg_sq", proj.rotate(load(state, "exp_avg_sq"), state, new, squared=True).clamp_min_(0))

    def _full_rank_equivalent_bytes(self, p: torch.Tensor, group: dict) -> int:
        return 2 * p.numel() * p.element_size()

    # -- updates -----------------------------------------------------------------------------
    def _full_rank_step(self, p: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
        """The torch.optim.AdamW single-tensor update (bit-identical for fp32 parameters)."""
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        if not state:
            state["step"] = 0
            self._init_moments(state, tuple(p.shape), p, group)
        state["step"] += 1
        if wd != 0:
            p.mul_(1 - lr * wd)
        exp_avg, exp_avg_sq = self._storage.load(state, "exp_avg"), self._storage.load(state, "exp_avg_sq")
        adam_moments(exp_avg, exp_avg_sq, g, beta1, beta2)
        step_size, bc2_sqrt = adam_update_scale(lr, beta1, beta2, state["step"])
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(group["eps"])
        if isinstance(step_size, torch.Tensor):  # a tensor lr: scale on the device, never read it
            p.add_((exp_avg / denom).mul_(-step_size).to(p.dtype))
        elif p.dtype == torch.float32:
            p.addcdiv_(exp_avg, denom, value=-step_size)
        else:
            p.add_((exp_avg / denom).to(p.dtype), alpha=-step_size)
        self._storage.store(state, "exp_avg", exp_avg)
        self._storage.store(state, "exp_avg_sq", exp_avg_sq)

    def _update_projected(
        self, p: torch.Tensor, core: torch.Tensor, state: dict, group: dict, proj: Projector, grad: torch.Tensor
    ) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        exp_avg, exp_avg_sq = self._storage.load(state, "exp_avg"), self._storage.load(state, "exp_avg_sq")
        adam_moments(exp_avg, exp_avg_sq, core, beta1, beta2)
        self._storage.store(state, "exp_avg", exp_avg)
        self._storage.store(state, "exp_avg_sq", exp_avg_sq)
        step_size, bc2_sqrt = adam_update_scale(lr, beta1, beta2, state["step"])
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(group["eps"])
        update = torch.div(exp_avg, denom, out=denom)
        if wd != 0:
            p.mul_(1 - lr * wd)
        if isinstance(step_size, torch.Tensor):  # a tensor lr: scale on the device, never read it
            self._apply_projected(p, update.mul_(step_size), -1.0, core, grad, state, group, proj)
        else:
            self._apply_projected(p, update, -step_size, core, grad, state, group, proj)
