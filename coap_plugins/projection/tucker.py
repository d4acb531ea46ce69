"""Tucker-2 projector for conv weights O x I x k1 x k2 (supplementary Sec. 1.5, Algorithm 2).

The projected gradient is the core ``G x_1 P_O^T x_2 P_I^T``.  Each mode is the tall matrix
problem of :mod:`.linalg` on an unfolding of G:

* output mode: ``H_O = G_(1)^T`` ((I k) x O) with ``P_O`` (O x r_O);
* input mode: ``H_I = G_(2)^T`` ((O k) x I) with ``P_I`` (I x r_I), skipped for 1x1 convs
  (only the output mode is projected) and whenever ``r_I`` would not be smaller than I.

Layout: the core is stored as ``(r_O, k, r_I)`` with ``k = k1 * k2``, so both contractions are
single 2-D matmuls on contiguous operands (``(r_O x O) @ (O x I k)`` and
``(r_O k x I) @ (I x r_I)``) instead of 4-D einsums; only the r_O-reduced intermediate is
transposed.
"""

from __future__ import annotations

import copy
import math

import torch

from .linalg import (
    DEFAULT_BASIS_ALIGNMENT,
    DEFAULT_CORRELATION_LOSS,
    Split,
    SvdFallbacks,
    correlation_step,
    recalibrate,
)
from .matrix import RefreshKind, setup_sketch

__all__ = ["Tucker2Projector"]

# Seeds of the two modes of one layer must differ; any odd constant keeps them apart.
_IN_MODE_SEED_OFFSET = 0x9E3779B1


class Tucker2Projector:
    """Projects an O x I x k1 x k2 gradient to an ``r_O x k x r_I`` core (stateless; tensors in state).

    Args:
        shape: the weight's shape ``(O, I, k1, k2)``.
        rank_out: r_O, in ``[1, O)`` and at most ``I k`` (the rank of the output unfolding).
        rank_in: r_I in ``[1, I)`` and at most ``O k``, or ``None`` to leave the input mode unprojected
            (always the case for 1x1 convs).
    """

    kind = "tucker2"
    # set on the local view of a sharded layer (:meth:`sharded`): the splits of the two modes
    split: Split | None = None
    split_in: Split | None = None
    # on a sharded layer: P_O is split with the weight, the core (and its moments) along r_O
    sharded_keys: frozenset[str] = frozenset()
    core_split: Split | None = None

    def __init__(self, shape: tuple[int, ...] | torch.Size, rank_out: int, rank_in: int | None) -> None:
        if len(shape) != 4:
            raise ValueError(f"Tucker2Projector needs a 4-D conv weight shape, got {tuple(shape)}")
        out_ch, in_ch, k1, k2 = (int(s) for s in shape)
        k = k1 * k2
        if not (1 <= rank_out < out_ch and rank_out <= in_ch * k):
            raise ValueError(
                f"Invalid rank_out: {rank_out} (must be in [1, {out_ch}) and at most I*k={in_ch * k} for shape "
                f"{tuple(shape)})"
            )
        if rank_in is not None:
            if k == 1:
                raise ValueError(
                    f"1x1 convs project the output mode only; got rank_in={rank_in} for shape {tuple(shape)}"
                )
            if not (1 <= rank_in < in_ch and rank_in <= out_ch * k):
                raise ValueError(
                    f"Invalid rank_in: {rank_in} (must be in [1, {in_ch}) and at most O*k={out_ch * k} for shape "
                    f"{tuple(shape)})"
                )
        self.shape = (out_ch, in_ch, k1, k2)
        self.out_ch, self.in_ch, self.k = out_ch, in_ch, k
        self.rank_out, self.rank_in = rank_out, rank_in
        self.core_in = rank_in if rank_in is not None else in_ch
        self.core_rows = rank_out  # the core's first dimension held here (r_O, or a shard of it)

    def __repr__(self) -> str:
        return f"Tucker2Projector(shape={self.shape}, rank_out={self.rank_out}, rank_in={self.rank_in})"

    # -- sharding ----------------------------------------------------------------------------
    def sharded(self, rows: Split) -> Tucker2Projector:
        """The projector of this rank's output channels, ``rows`` describing how the weight's
        first dimension (O) is split (FSDP2's ``Shard(0)``).

        The output mode is projected along O, the split dimension: ``P_O`` (O x r_O) is sharded
        with the weight, and ``P_O^T G_(1)`` (r_O x I k) is a sum over ranks, reduce-scattered
        so that each rank keeps r_O/world of its rows: the core and its moments
        (r_O x k x r_I) are sharded along r_O, and the update is all-gathered (the core's size)
        before the back-projection.  ``P_I`` (I x r_I) is replicated: every rank holds the same.
        The input mode's unfolding has the local rows ``(o, kk)``, so its refreshes reduce r x r
        and r x I products; a refresh gathers the core-sized terms it reads.  Sizes become local."""
        local = copy.copy(self)
        local.split = Split("cols", rows.group, rows.world, rows.rank, rows.total, rows.chunk)
        local.split_in = Split("rows", rows.group, rows.world, rows.rank, rows.total, rows.chunk).scaled(self.k)
        r = self.rank_out
        local.core_split = Split("rows", rows.group, rows.world, rows.rank, r, -(-r // rows.world))
        local.core_rows = local.core_split.local
        local.out_ch = local.split.local
        local.sharded_keys = frozenset({"proj_out"})
        return local

    # -- sizes -------------------------------------------------------------------------------
    @property
    def ranks(self) -> dict[str, int | None]:
        """The ranks this projector reduces to, by argument name: ``{"rank_out": r_O,
        "rank_in": r_I}`` (``rank_in`` is ``None`` when only the output mode is projected)."""
        return {"rank_out": self.rank_out, "rank_in": self.rank_in}

    @property
    def moment_shape(self) -> tuple[int, int, int]:
        return (self.core_rows, self.k, self.core_in)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"proj_out": (self.out_ch, self.rank_out)}
        if self.rank_in is not None:
            shapes["proj_in"] = (self.in_ch, self.rank_in)
        return shapes

    def projector_numel(self) -> int:
        return sum(math.prod(s) for s in self.state_shapes().values())

    @property
    def size_ratio(self) -> float:
        """``(O / r_O) (I / r_I)`` (``O / r_O`` with the input mode unprojected): how many times
        the channel modes are reduced together, as :attr:`MatrixProjector.size_ratio`."""
        return self.shape[0] / self.rank_out * self.in_ch / self.core_in

    def step_macs(self) -> int:
        """Multiply-adds of projection plus back-projection (output mode first: the cheaper order)."""
        macs = self.out_ch * self.in_ch * self.k * self.rank_out
        if self.rank_in is not None:
            macs += self.rank_out * self.k * self.in_ch * self.rank_in
        return 2 * macs

    # -- unfoldings --------------------------------------------------------------------------
    def _out_unfolding(self, grad: torch.Tensor) -> torch.Tensor:
        """G_(1): O x (I k), columns ordered (i, kk)."""
        return grad.reshape(self.out_ch, self.in_ch * self.k)

    def _in_unfolding_t(self, grad: torch.Tensor) -> torch.Tensor:
        """H_I = G_(2)^T as a contiguous (O k) x I matrix, rows ordered (o, kk)."""
        g3 = grad.reshape(self.out_ch, self.in_ch, self.k)
        return g3.transpose(1, 2).reshape(self.out_ch * self.k, self.in_ch)

    def _to_core_layout(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """(rows, I k) with columns (i, kk) -> (rows, k, I)."""
        return t.view(rows, self.in_ch, self.k).transpose(1, 2)

    # -- the hot path ----------------------------------------------------------------------
    def setup(self, state: dict, grad: torch.Tensor, seed: int, fallbacks: SvdFallbacks | None = None) -> None:
        state["proj_out"] = setup_sketch(self._out_unfolding(grad).T, self.rank_out, seed, fallbacks, self.split)
        if self.rank_in is not None:
            state["proj_in"] = setup_sketch(
                self._in_unfolding_t(grad), self.rank_in, seed + _IN_MODE_SEED_OFFSET, fallbacks, self.split_in
            )

    def project(self, state: dict, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the core ``(r_O, k, r_I)`` and ``P_O^T G_(1)`` ((r_O, I k), kept for refreshes)."""
        t1 = state["proj_out"].T @ self._out_unfolding(grad)
        if self.split is not None:  # contracts the split output channels: each rank keeps its rows
            t1 = self.core_split.scatter_sum(t1)
        t1k = self._to_core_layout(t1, self.core_rows)
        if self.rank_in is None:
            return t1k.contiguous(), t1
        core = t1k.reshape(self.core_rows * self.k, self.in_ch) @ state["proj_in"]
        return core.view(self.moment_shape), t1

    # -- batches of same-shaped layers -------------------------------------------------------
    def project_batch(self, projs: dict[str, torch.Tensor], grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`project` for a stack of gradients ``(B, O, I, k1, k2)``: cores ``(B, r_O, k, r_I)``
        and the ``(B, r_O, I k)`` stack of ``P_O^T G_(1)`` (what a refresh reuses).  ``projs``
        holds the stacked projectors and their transposes (``"proj_out_t"``, ``"proj_in_t"``)."""
        batch = grads.shape[0]
        t1 = torch.bmm(projs["proj_out_t"], grads.reshape(batch, self.out_ch, self.in_ch * self.k))
        t1k = t1.view(batch, self.rank_out, self.in_ch, self.k).transpose(2, 3)
        if self.rank_in is None:
            return t1k.contiguous(), t1
        core = torch.bmm(t1k.reshape(batch, self.rank_out * self.k, self.in_ch), projs["proj_in"])
        return core.view(batch, *self.moment_shape), t1

    def back_project_batch(
        self, projs: dict[str, torch.Tensor], cores: torch.Tensor, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``U_b x_1 P_O x_2 P_I`` as a ``(B, O, I, k1, k2)`` stack; added in place into ``into`` (a
        contiguous fp32 tensor of that shape, e.g. a view of the weight itself) when given."""
        batch = cores.shape[0]
        if self.rank_in is not None:
            x = torch.bmm(cores.view(batch, self.rank_out * self.k, self.rank_in), projs["proj_in_t"])
            cores = x.view(batch, self.rank_out, self.k, self.in_ch)
        x = cores.transpose(2, 3).reshape(batch, self.rank_out, self.in_ch * self.k)
        if into is None:
            return torch.bmm(projs["proj_out"], x).view(batch, *self.shape)
        into.view(batch, self.out_ch, self.in_ch * self.k).baddbmm_(projs["proj_out"], x)
        return into

    def _restore_in(self, core: torch.Tensor, state: dict) -> torch.Tensor:
        """``core x_2 P_I`` back in the (r_O, I k) layout of G_(1)'s columns."""
        rows = core.shape[0]
        if self.rank_in is not None:
            core = (core.reshape(rows * self.k, self.rank_in) @ state["proj_in"].T).view(rows, self.k, self.in_ch)
        return core.transpose(1, 2).reshape(rows, self.in_ch * self.k)

    def apply_update(self, param: torch.Tensor, update: torch.Tensor, state: dict, alpha: float) -> None:
        """``param += alpha * update x_1 P_O x_2 P_I``."""
        if self.split is not None:  # every rank's rows of the core update, for its output channels
            update = self.core_split.gather(update)
        x = self._restore_in(update, state)
        p_out = state["proj_out"]
        if param.dtype == torch.float32 and param.is_contiguous():
            param.view(self.out_ch, self.in_ch * self.k).addmm_(p_out, x, alpha=alpha)
        else:
            param.add_((p_out @ x).view(param.shape).to(param.dtype), alpha=alpha)

    # -- refreshes ---------------------------------------------------------------------------
    def refresh(
        self,
        state: dict,
        grad: torch.Tensor,
        projected: torch.Tensor,
        ctx: torch.Tensor,
        kind: RefreshKind,
        moment: torch.Tensor,
        correlation_loss: str = DEFAULT_CORRELATION_LOSS,
        alignment: str = DEFAULT_BASIS_ALIGNMENT,
        fallbacks: SvdFallbacks | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Refresh both modes from this step's gradient, each as its own matrix problem.

        ``ctx`` is ``P_O^T G_(1)`` from :meth:`project`, i.e. ``(H_O P_O)^T``; ``moment`` the
        core-shaped first moment before this step; ``correlation_loss`` and ``alignment`` as for
        :meth:`MatrixProjector.refresh` (and ``fallbacks``).  The output mode sees the moment restored along the
        input mode, and vice versa.  Also returns the mean of the modes' direction
        terms for a correlation update, ``None`` for a recalibration.
        """
        if self.split is not None:  # the refresh reads the whole core-sized terms
            ctx, moment = self.core_split.gather(ctx), self.core_split.gather(moment)
        problems = [
            (
                "proj_out",
                self._out_unfolding(grad).T,
                ctx.T,
                self._restore_in(moment, state).T,
                self.rank_out,
                self.split,
            )
        ]
        if self.rank_in is not None:
            h_in = self._in_unfolding_t(grad)
            m_in = (state["proj_out"] @ moment.reshape(self.rank_out, -1)).view(self.out_ch * self.k, self.rank_in)
            problems.append(("proj_in", h_in, h_in @ state["proj_in"], m_in, self.rank_in, self.split_in))
        new: dict[str, torch.Tensor] = {}
        cosines = []
        for key, h, a, m, rank, split in problems:
            if kind == "correlation":
                new[key], res = correlation_step(h, state[key], a, m, loss=correlation_loss, split=split)
                cosines.append(res.cos)
            else:
                new[key] = recalibrate(state[key], h, a, rank, alignment, fallbacks, split)
        return new, torch.stack(cosines).mean() if cosines else None

    def rotate(self, core: torch.Tensor, state: dict, new: dict[str, torch.Tensor], squared: bool) -> torch.Tensor:
        """Carry a core-shaped moment into the new bases (``restore_state``)."""
        t_out = state["proj_out"].T @ new["proj_out"]
        whole = (self.rank_out, self.k, self.core_in)
        if self.split is not None:  # the rotation mixes the core's split rows
            (t_out,) = self.split.sum(t_out)
            core = self.core_split.gather(core)
        t_out = t_out * t_out if squared else t_out
        core = (t_out.T @ core.reshape(self.rank_out, -1)).view(whole)
        if self.rank_in is not None:
            t_in = state["proj_in"].T @ new["proj_in"]
            t_in = t_in * t_in if squared else t_in
            core = (core.reshape(-1, self.rank_in) @ t_in).view(whole)
        return core if self.split is None else self.core_split.mine(core).contiguous()
