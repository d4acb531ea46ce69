"""CoapAdamW: AdamW with COAP's projected moments."""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_lr, check_nonnegative, conv_ratio_alias
from ..projection import DEFAULT_MIN_CONV_NUMEL, Projector
from ..projection.linalg import DEFAULT_BASIS_ALIGNMENT, DEFAULT_CORRELATION_LOSS
from ._base import DEFAULT_RESIDUAL, DEFAULT_UPDATE_SCALE, CoapOptimizer, _Batch, coap_defaults
from ._functional import adam_projected_updates, adamw_full_rank
from ._storage import MomentStorage

__all__ = ["CoapAdamW"]

ParamsT = Any  # an iterable of tensors, of (name, tensor) pairs, or of param-group dicts


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
        foreach: the full-rank tensors' update: ``True`` is torch's multi-tensor AdamW (one
            ``torch._foreach_*`` call per operation for the whole group), ``False`` its
            single-tensor loop; each equals ``torch.optim.AdamW`` with the same flag bit for bit.
            ``None`` (default) is ``True`` (on CPU too: the two give identical results there).
            Projected parameters always take the batched path.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> opt = CoapAdamW(model.parameters(), lr=1e-3, rank_ratio_matrix=4, update_interval=32)
    """

    nonnegative_moments = frozenset({"exp_avg_sq"})
    _later_settings = {**CoapOptimizer._later_settings, "foreach": None}

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
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
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
        if group["foreach"] not in (None, True, False):
            raise ValueError(f"Invalid foreach: {group['foreach']!r} (expected True, False or None)")
        super()._validate_group(group)

    # -- moments -----------------------------------------------------------------------------
    def _moment_shapes(self, shape: tuple[int, ...], group: dict) -> dict[str, tuple[int, ...]]:
        return {"exp_avg": shape, "exp_avg_sq": shape}

    def _direction_moment(self, state: dict, core: torch.Tensor) -> torch.Tensor:
        return self._storage.load(state, "exp_avg")

    def _rotate_moments(self, state: dict, proj: Projector, new: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        # The first moment rotates exactly; the second moment is an elementwise average of
        # squares, carried by the squared rotation (keeps it non-negative; exact for
        # permutations and sign flips of the basis).
        load, store = self._storage.load, self._storage.store
        m, v = load(state, "exp_avg"), load(state, "exp_avg_sq")
        store(state, "exp_avg", torch.where(ok, proj.rotate(m, state, new, squared=False), m))
        store(state, "exp_avg_sq", torch.where(ok, proj.rotate(v, state, new, squared=True).clamp_min_(0), v))

    def _full_rank_equivalent_bytes(self, p: torch.Tensor, group: dict) -> int:
        return 2 * p.numel() * p.element_size()

    # -- updates -----------------------------------------------------------------------------
    def _full_rank_update(self, group: dict, params: tuple, grads: tuple, states: tuple, splits: tuple) -> None:
        """torch.optim.AdamW's update, bit for bit (``foreach`` as torch's flag)."""
        beta1, beta2 = group["betas"]
        load = self._storage.load
        exp_avgs = [load(st, "exp_avg") for st in states]
        exp_avg_sqs = [load(st, "exp_avg_sq") for st in states]
        adamw_full_rank(
            list(params),
            list(grads),
            exp_avgs,
            exp_avg_sqs,
            [st["step"] for st in states],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            foreach=group["foreach"] is not False,
        )
        self._store_moments(states, exp_avgs, exp_avg_sqs)

    def _projected_update(self, group: dict, batches: list[_Batch]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        states = [m.state for b in batches for m in b.members]
        load = self._storage.load
        exp_avgs = [load(st, "exp_avg") for st in states]
        exp_avg_sqs = [load(st, "exp_avg_sq") for st in states]
        cores = [c for b in batches for c in b.cores]
        updates = adam_projected_updates(
            exp_avgs,
            exp_avg_sqs,
            cores,
            [st["step"] for st in states],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
        )
        self._store_moments(states, exp_avgs, exp_avg_sqs)
        self._apply_batches(group, batches, updates, cores, decay=1 - lr * wd if wd != 0 else None)

    def _store_moments(self, states: list, exp_avgs: list, exp_avg_sqs: list) -> None:
        if type(self._storage).store is MomentStorage.store:  # fp32: the math ran on the state itself
            return
        for st, m, v in zip(states, exp_avgs, exp_avg_sqs):
            self._storage.store(st, "exp_avg", m)
            self._storage.store(st, "exp_avg_sq", v)
