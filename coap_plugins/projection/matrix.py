"""Matrix projector for 2-D weights: the shorter side of W (m x n) is reduced to rank r."""

from __future__ import annotations

import copy
from typing import Literal

import torch

from .linalg import (
    DEFAULT_BASIS_ALIGNMENT,
    DEFAULT_CORRELATION_LOSS,
    Split,
    SvdFallbacks,
    _low_cost_svd_householder,
    correlation_step,
    random_orthonormal,
    recalibrate,
)

__all__ = ["MatrixProjector", "RefreshKind"]

RefreshKind = Literal["correlation", "svd"]


def setup_sketch(
    h: torch.Tensor, rank: int, seed: int, fallbacks: SvdFallbacks | None = None, split: Split | None = None
) -> torch.Tensor:
    """First projector of a layer: a low-cost SVD pass from a seeded random start.

    The pass spans ``H^T H P``: the randomized range finder with one power iteration, so the
    start is already close to the top-r right subspace (the next recalibration refines it).  Runs
    once per layer, at its first usable gradient; ``fallbacks`` as :func:`recalibrate`.  With a
    ``split`` of the columns every rank draws the whole start and keeps its rows, so a sharded
    layer starts where the unsharded one does.
    """
    cols = split is not None and split.axis == "cols"
    p = random_orthonormal(split.total if cols else h.shape[1], rank, seed, device=h.device)
    if cols:
        p = split.mine(p)
    a = h @ p
    if cols:
        (a,) = split.sum(a)
    return _low_cost_svd_householder(h, a, rank, split)[0]


class MatrixProjector:
    """Projects the gradient of an m x n weight onto r directions of its shorter side.

    Works on the "tall" view ``H`` of the gradient (``G`` when m >= n, ``G^T`` otherwise), so
    the projector ``P`` is ``min(m, n) x r`` and the moments are ``max(m, n) x r``.  The object
    itself is stateless: the projector lives in ``state["proj"]`` (fp32) so that
    ``optimizer.state_dict()`` carries it.

    Args:
        shape: the weight's shape ``(m, n)``.
        rank: r, with ``1 <= r < min(m, n)``.
    """

    kind = "matrix"
    # set on the local view of a sharded layer (:meth:`sharded`): the split, and the state keys
    # that are split with the weight
    split: Split | None = None
    sharded_keys: frozenset[str] = frozenset()
    # how the core's (and the moments') rows are split across the ranks of a sharded layer
    core_split: Split | None = None

    def __init__(self, shape: tuple[int, int] | torch.Size, rank: int) -> None:
        rows, cols = int(shape[0]), int(shape[1])
        if not 1 <= rank < min(rows, cols):
            raise ValueError(f"Invalid rank: {rank} (must be in [1, {min(rows, cols)}) for shape {tuple(shape)})")
        self.shape = (rows, cols)
        self.rank = rank
        self.transposed = rows < cols
        self.long, self.short = max(rows, cols), min(rows, cols)

    def __repr__(self) -> str:
        return f"MatrixProjector(shape={self.shape}, rank={self.rank})"

    # -- sharding ----------------------------------------------------------------------------
    def sharded(self, rows: Split) -> MatrixProjector:
        """The projector of this rank's rows of the weight, ``rows`` describing how the weight's
        first dimension is split (FSDP2's ``Shard(0)``).

        A tall weight (m >= n) has its gradient's rows split: ``P`` (n x r) is replicated (every
        rank holds the same), the moments (m x r) are sharded with the weight, and an ordinary
        step needs no collective.  A wide weight (m < n) is projected along its rows, the split
        dimension: ``P`` (m x r) is sharded with the weight, and the projection ``G^T P`` (n x r)
        is a sum over ranks, reduce-scattered so that each rank keeps n/world of its rows: the
        moments (n x r) are sharded along n, and the update is all-gathered (n x r) before the
        back-projection (together the bytes of one all-reduce per step).  A refresh gathers the
        projection and the first moment it reads.  Sizes (``moment_shape``, ``state_shapes``)
        become the local ones."""
        local = copy.copy(self)
        axis = "cols" if self.transposed else "rows"
        local.split = Split(axis, rows.group, rows.world, rows.rank, rows.total, rows.chunk)
        if self.transposed:
            n = self.long
            local.core_split = Split("rows", rows.group, rows.world, rows.rank, n, -(-n // rows.world))
            local.short = local.split.local
            local.long = local.core_split.local
            local.sharded_keys = frozenset({"proj"})
        else:
            local.core_split = local.split
            local.long = local.split.local
        return local

    @property
    def _wide_split(self) -> bool:
        return self.split is not None and self.split.axis == "cols"

    # -- sizes -------------------------------------------------------------------------------
    @property
    def ranks(self) -> dict[str, int]:
        """The ranks this projector reduces to, by argument name: ``{"rank": r}``."""
        return {"rank": self.rank}

    @property
    def moment_shape(self) -> tuple[int, int]:
        return (self.long, self.rank)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"proj": (self.short, self.rank)}

    def projector_numel(self) -> int:
        return self.short * self.rank

    @property
    def size_ratio(self) -> float:
        """``min(m, n) / r``: how many times the projected side is reduced (``update_scale="auto"``)."""
        return min(self.shape) / self.rank

    def step_macs(self) -> int:
        """Multiply-adds an ordinary step cannot avoid: projection and back-projection."""
        return 2 * self.long * self.short * self.rank

    # -- the hot path ----------------------------------------------------------------------
    def tall(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.T if self.transposed else grad

    def setup(self, state: dict, grad: torch.Tensor, seed: int, fallbacks: SvdFallbacks | None = None) -> None:
        state["proj"] = setup_sketch(self.tall(grad), self.rank, seed, fallbacks, self.split)

    def project(self, state: dict, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        core = self.tall(grad) @ state["proj"]
        if self._wide_split:  # a sum over ranks, of which each keeps its rows
            core = self.core_split.scatter_sum(core)
        return core, None

    # -- batches of same-shaped layers -------------------------------------------------------
    def project_batch(self, projs: dict[str, torch.Tensor], grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``H_b P_b`` for a stack of gradients ``(B, m, n)``: the cores ``(B, long, r)``.

        ``projs`` holds the layers' stacked projectors, ``"proj"`` ``(B, short, r)``, and their
        transposes, ``"proj_t"`` (the optimizer keeps both between steps)."""
        tall = grads.transpose(1, 2) if self.transposed else grads
        return torch.bmm(tall, projs["proj"]), None

    def back_project_batch(
        self, projs: dict[str, torch.Tensor], cores: torch.Tensor, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``U_b P_b^T`` in the weights' orientation, ``(B, m, n)``; added in place into ``into``
        (a contiguous fp32 ``(B, m, n)`` tensor, e.g. a view of the weight itself) when given."""
        a, b = (projs["proj"], cores.transpose(1, 2)) if self.transposed else (cores, projs["proj_t"])
        return torch.bmm(a, b) if into is None else into.baddbmm_(a, b)

    def apply_update(self, param: torch.Tensor, update: torch.Tensor, state: dict, alpha: float) -> None:
        """``param += alpha * update P^T`` (in the weight's orientation)."""
        p = state["proj"]
        if self._wide_split:  # every rank's rows of the update, for its rows of the weight
            update = self.core_split.gather(update)
        if param.dtype == torch.float32 and param.is_contiguous():
            if self.transposed:
                param.addmm_(p, update.T, alpha=alpha)
            else:
                param.addmm_(update, p.T, alpha=alpha)
        else:
            delta = p @ update.T if self.transposed else update @ p.T
            param.add_(delta.to(param.dtype), alpha=alpha)

    # -- refreshes ---------------------------------------------------------------------------
    def refresh(
        self,
        state: dict,
        grad: torch.Tensor,
        projected: torch.Tensor,
        ctx: None,
        kind: RefreshKind,
        moment: torch.Tensor,
        correlation_loss: str = DEFAULT_CORRELATION_LOSS,
        alignment: str = DEFAULT_BASIS_ALIGNMENT,
        fallbacks: SvdFallbacks | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """New projector tensors from this step's gradient; ``projected`` is ``H P`` (reused).
        ``fallbacks``: as :func:`~coap_plugins.projection.linalg.recalibrate` (no host sync).

        ``moment`` is the projected first moment before this step's update (``M_{t-1}``);
        ``correlation_loss`` picks the correlation update's loss (``"paper"`` or ``"relative"``,
        :func:`~coap_plugins.projection.linalg.correlation_grad`), ``alignment`` how a
        recalibrated basis is laid onto the old one (:func:`~coap_plugins.projection.linalg.align_basis`).
        Also returns the direction term (mean row cosine of ``M P^T`` and ``H``) that a
        correlation update computes on its way, ``None`` for a recalibration.
        """
        h = self.tall(grad)
        if self._wide_split:  # the refresh reads the whole projection and moment
            projected, moment = self.core_split.gather(projected), self.core_split.gather(moment)
        if kind == "correlation":
            new_p, res = correlation_step(h, state["proj"], projected, moment, loss=correlation_loss, split=self.split)
            return {"proj": new_p}, res.cos
        return {"proj": recalibrate(state["proj"], h, projected, self.rank, alignment, fallbacks, self.split)}, None

    def rotate(self, core: torch.Tensor, state: dict, new: dict[str, torch.Tensor], squared: bool) -> torch.Tensor:
        """Carry a projected moment from the old basis into the new one (``restore_state``)."""
        t = state["proj"].T @ new["proj"]
        if self.split is not None and self.split.axis == "cols":
            (t,) = self.split.sum(t)
        return core @ (t * t) if squared else core @ t
