"""CoapAdafactor: Adafactor with COAP's projected moments (supplementary Algorithm 1)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._checks import check_lr, check_nonnegative, conv_ratio_alias
from ..projection import DEFAULT_MIN_CONV_NUMEL, Projector
from ..projection.linalg import DEFAULT_BASIS_ALIGNMENT, DEFAULT_CORRELATION_LOSS, Split
from ._base import DEFAULT_RESIDUAL, CoapOptimizer, _Batch, coap_defaults
from .adamw import ParamsT

__all__ = ["CoapAdafactor", "adafactor_direction"]


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """2-D view used for factoring: (first dim, everything else).

    A tensor with 3 or more dims is factored as the matrix (first dim, the rest), as
    supplementary Algorithm 1 factors its projected gradient (row sums over the last axis,
    column sums over the first).  For COAP's Tucker-2 core ``(r_O, k, r_I)`` this keeps one
    statistic per output-mode direction and one per (kernel position, input-mode direction):
    ``r_O + k r_I`` numbers, the factorization of the core's mode-1 unfolding, the same
    unfolding its output projector is built from.  Hugging Face's Adafactor factors the last two
    dims instead (``(r_O, k)`` rows and ``(r_O, r_I)`` columns, ``r_O (k + r_I)`` numbers) and
    timm's the two largest: more state, and for a full-rank ``O x I x 3 x 3`` conv under the
    last-two rule, 6 of every 9 elements' worth of statistics.  The first moment (``r_O k r_I``)
    dominates COAP-Adafactor's state either way.
    """
    return t.reshape(t.shape[0], -1)


def adafactor_direction(
    grad: torch.Tensor,
    second: dict[str, torch.Tensor],
    *,
    beta2t: float,
    eps1: float,
    clip_threshold: float,
    split: Split | None = None,
) -> torch.Tensor:
    """Adafactor's normalized, clipped update for ``grad``; updates the second moment in place.

    ``second`` holds ``exp_avg_sq_row`` and ``exp_avg_sq_col`` (the factored second moment of the
    2-D view of a tensor with two or more dims: row and column means of ``grad^2 + eps1``) or
    ``exp_avg_sq`` (1-D tensors).  With ``split`` ``grad`` is this rank's rows of the whole
    tensor (FSDP2): the row statistics are local, the column means, the mean row statistic and
    the update's RMS are sums over ranks (two small all-reduces).
    """
    sq = grad.square().add_(eps1)
    rows = grad.shape[0] if split is None else split.total
    if "exp_avg_sq" in second:
        second["exp_avg_sq"].mul_(beta2t).add_(sq, alpha=1 - beta2t)
        update = second["exp_avg_sq"].rsqrt().mul_(grad)
    else:
        sq2 = _as_matrix(sq)
        row, col = second["exp_avg_sq_row"], second["exp_avg_sq_col"]
        row.mul_(beta2t).add_(sq2.mean(dim=1), alpha=1 - beta2t)
        if split is None:
            col.mul_(beta2t).add_(sq2.mean(dim=0), alpha=1 - beta2t)
            row_mean = row.mean()
        else:
            col_sum, row_sum = split.sum(sq2.sum(dim=0), row.sum())
            col.mul_(beta2t).add_(col_sum / rows, alpha=1 - beta2t)
            row_mean = row_sum / rows
        r_factor = (row / row_mean).rsqrt_().unsqueeze(1)
        c_factor = col.rsqrt().unsqueeze(0)
        update = (r_factor * c_factor).view(grad.shape).mul_(grad)
    if split is None:
        rms = update.square().mean().sqrt()
    else:
        (sq_sum,) = split.sum(update.square().sum())
        rms = (sq_sum / (rows * math.prod(grad.shape[1:]))).sqrt()
    update.div_((rms / clip_threshold).clamp_(min=1.0))
    return update


class CoapAdafactor(CoapOptimizer):
    """Adafactor whose first moment and factored second moment live in COAP's projected space.

    The routing, projectors, schedule and per-group overrides are those of
    :class:`~coap_plugins.CoapAdamW`.  The step follows the usual Adafactor (relative step
    size, parameter scaling, factored second moment, update clipping) applied to the projected
    gradient; the first moment averages the clipped update (the learning rate is applied after
    it, so schedulers take effect at once).

    With ``beta1=None`` (no first moment, the lean setting) the correlation update's direction
    term uses the current projected gradient ``G P`` in place of the moment: it then rewards
    keeping the restored gradient aligned with the gradient itself, row by row.  Note that
    Adafactor's factored second moment is already sublinear: without a first moment the
    projectors cost more memory than they save (``coap_report()`` shows it); COAP pays off for
    Adafactor through the first moment.  Routing is the same as for CoapAdamW, so the two
    optimizers project the same layers.

    Args:
        params: parameters, ``(name, parameter)`` pairs or param-group dicts.
        lr: external learning rate (a float or a 1-element tensor), or ``None`` for Adafactor's
            relative step (default None).
        eps: ``(eps1, eps2)``: regularizer of the squared gradient and floor of the parameter
            scale (default (1e-30, 1e-3)).
        clip_threshold: threshold of the update's RMS (default 1.0).
        decay_rate: exponent of the second-moment decay, ``beta2_t = 1 - t^decay_rate``
            (default -0.8).
        beta1: first-moment coefficient, or ``None`` for none (default 0.9, as Algorithm 1).
        weight_decay: decoupled weight decay, scaled by the step's learning rate (default 0.0).
        scale_parameter: scale the step by the parameter's RMS (default True).
        relative_step: time-dependent step size; defaults to ``lr is None``.
        warmup_init: warm the relative step up from 0 (default False; needs ``relative_step``).
        rank, rank_ratio_matrix, rank_ratio_conv, update_interval, reproject_factor,
        restore_state, basis_alignment, correlation_loss, residual, min_conv_numel, seed,
        rank_ratio_cnn: as
            :class:`~coap_plugins.CoapAdamW`.  ``update_scale`` too, but its default here is 1.0:
            Adafactor caps the RMS of its update at ``clip_threshold``, and a larger factor lifts
            the update past the cap its stability rests on (on the UNet task ``"auto"`` made
            CoapAdafactor 30 % worse, ``docs/RESULTS.md``).  With
            ``restore_state`` the first moment is carried into the new basis; the factored
            second moment (row and column means) is kept as it is.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
        >>> opt = CoapAdafactor(model.parameters(), rank_ratio_conv=4)
    """

    nonnegative_moments = frozenset({"exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col"})
    replicated_moments = frozenset({"exp_avg_sq_col"})

    def __init__(
        self,
        params: ParamsT,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = 0.9,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool | None = None,
        warmup_init: bool = False,
        *,
        rank: int | None = None,
        rank_ratio_matrix: float | None = None,
        rank_ratio_conv: float | None = None,
        update_interval: int = 32,
        reproject_factor: int = 5,
        restore_state: bool = False,
        basis_alignment: str = DEFAULT_BASIS_ALIGNMENT,
        correlation_loss: str = DEFAULT_CORRELATION_LOSS,
        update_scale: float | str = 1.0,
        residual: str = DEFAULT_RESIDUAL,
        min_conv_numel: int = DEFAULT_MIN_CONV_NUMEL,
        seed: int = 0,
        rank_ratio_cnn: float | None = None,
    ) -> None:
        if relative_step is None:
            relative_step = lr is None
        defaults = dict(
            lr=lr,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            beta1=beta1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
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
        lr, beta1 = group["lr"], group["beta1"]
        if lr is None and not group["relative_step"]:
            raise ValueError("Invalid learning rate: None needs relative_step=True (or pass a float lr)")
        if lr is not None:
            check_lr(lr)
            if group["relative_step"]:
                raise ValueError(f"Invalid learning rate: {lr} cannot be combined with relative_step=True")
        if group["warmup_init"] and not group["relative_step"]:
            raise ValueError("Invalid warmup_init: True needs relative_step=True")
        eps = group["eps"]
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
            raise ValueError(f"Invalid epsilon value: {eps!r} (expected a pair of finite floats >= 0)")
        for e in eps:
            check_nonnegative("epsilon value", e)
        if beta1 is not None and not (isinstance(beta1, (int, float)) and 0.0 <= beta1 < 1.0):
            raise ValueError(f"Invalid beta1: {beta1!r} (must be in [0, 1), or None)")
        decay = group["decay_rate"]
        if not (isinstance(decay, (int, float)) and -1.0 <= decay < 0.0):
            raise ValueError(f"Invalid decay_rate: {decay!r} (must be in [-1, 0))")
        clip = group["clip_threshold"]
        if not (isinstance(clip, (int, float)) and 0.0 < clip < math.inf):
            raise ValueError(f"Invalid clip_threshold: {clip!r} (must be a finite number > 0)")
        check_nonnegative("weight_decay value", group["weight_decay"])
        super()._validate_group(group)

    # -- moments -----------------------------------------------------------------------------
    def _moment_shapes(self, shape: tuple[int, ...], group: dict) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        if group["beta1"] is not None:
            shapes["exp_avg"] = shape
        if len(shape) >= 2:
            shapes["exp_avg_sq_row"] = (shape[0],)
            shapes["exp_avg_sq_col"] = (math.prod(shape[1:]),)
        else:
            shapes["exp_avg_sq"] = shape
        return shapes

    def _direction_moment(self, state: dict, core: torch.Tensor) -> torch.Tensor:
        return self._storage.load(state, "exp_avg") if "exp_avg" in state else core

    def _rotate_moments(self, state: dict, proj: Projector, new: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        if "exp_avg" in state:
            m = self._storage.load(state, "exp_avg")
            self._storage.store(state, "exp_avg", torch.where(ok, proj.rotate(m, state, new, squared=False), m))

    def _full_rank_equivalent_bytes(self, p: torch.Tensor, group: dict) -> int:
        shapes = self._moment_shapes(tuple(p.shape), group)
        return 4 * sum(math.prod(s) for s in shapes.values())

    # -- updates -----------------------------------------------------------------------------
    def _step_lr(self, p: torch.Tensor, group: dict, step: int, split: Split | None = None) -> float | torch.Tensor:
        """The step's learning rate; a 0-d device tensor when scaled by the parameter's RMS
        (reading it back would cost a host sync per parameter and step on a GPU); with ``split``
        ``p`` is this rank's rows and the RMS is the whole parameter's."""
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            lr = min(min_step, 1.0 / math.sqrt(step))
        else:
            lr = group["lr"]
        if group["scale_parameter"]:
            # in fp32 at least (bf16/fp16 weights are upcast in the reduction; float64 stays)
            acc = torch.promote_types(p.dtype, torch.float32)
            if split is None:
                rms = torch.linalg.vector_norm(p, dtype=acc) / math.sqrt(p.numel())
            else:
                (sq,) = split.sum(torch.linalg.vector_norm(p, dtype=acc).square())
                rms = sq.sqrt() / math.sqrt(split.total * math.prod(p.shape[1:]))
            return rms.clamp_min_(group["eps"][1]).mul_(lr)
        return lr

    def _decay_only(self, p: torch.Tensor, group: dict[str, Any], split: Split | None = None) -> None:
        if group["weight_decay"] != 0:
            p.mul_(1 - self._step_lr(p, group, 1, split) * group["weight_decay"])

    def _direction(
        self,
        p: torch.Tensor,
        g: torch.Tensor,
        state: dict,
        group: dict,
        split: Split | None = None,
        g_split: Split | None = None,
    ) -> torch.Tensor:
        """The step's update for ``g`` (a full gradient or a projected core), scaled by its
        negative learning rate, with the moments updated and the weight decay applied to ``p``.
        ``split``: how ``p``'s rows are split across ranks (FSDP2), ``g_split`` ``g``'s."""
        step = state["step"]
        lr = self._step_lr(p, group, step, split)
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        keys = ("exp_avg_sq",) if "exp_avg_sq" in state else ("exp_avg_sq_row", "exp_avg_sq_col")
        second = {k: self._storage.load(state, k) for k in keys}
        update = adafactor_direction(
            g, second, beta2t=beta2t, eps1=group["eps"][0], clip_threshold=group["clip_threshold"], split=g_split
        )
        for k, v in second.items():
            self._storage.store(state, k, v)
        if group["beta1"] is not None:
            update = self._storage.load(state, "exp_avg").lerp_(update, 1 - group["beta1"])
            self._storage.store(state, "exp_avg", update)
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])
        return update * lr.neg() if isinstance(lr, torch.Tensor) else update * -lr

    def _full_rank_update(self, group: dict, params: tuple, grads: tuple, states: tuple, splits: tuple) -> None:
        """Adafactor per tensor (its factored statistics have a shape of their own per tensor)."""
        for p, g, state, split in zip(params, grads, states, splits):
            p.add_(self._direction(p, g, state, group, split, split).to(p.dtype))

    def _projected_update(self, group: dict, batches: list[_Batch]) -> None:
        cores = [c for b in batches for c in b.cores]
        members = [m for b in batches for m in b.members]
        updates = [
            self._direction(m.param, core, m.state, group, m.split, m.core_split) for m, core in zip(members, cores)
        ]
        self._apply_batches(group, batches, updates, cores)
