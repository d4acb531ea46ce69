"""Matrix kernels of COAP, written for one "tall" problem.

Every projector (matrix or one mode of a Tucker-2 core) reduces to the same problem: a matrix
``H`` (m x n) whose *columns* are projected by an orthonormal-ish ``P`` (n x r), with the
projection ``A = H @ P`` (m x r) and the projected first moment ``M`` (m x r).  The functions
here take ``A`` from the caller, because the optimizer has already computed it for the
projection: the correlation update then needs one more ``H^T X`` product with an m x r matrix
``X`` and r x r algebra; the recalibration needs a QR of ``A`` and one ``Q^T H`` product.
No m x n temporary is formed and autograd is never used.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "BASIS_ALIGNMENTS",
    "CORRELATION_LOSSES",
    "CORRELATION_LR",
    "CORRELATION_MAX_NORM",
    "DEFAULT_BASIS_ALIGNMENT",
    "DEFAULT_CORRELATION_LOSS",
    "align_basis",
    "CorrelationResult",
    "correlation_grad",
    "correlation_loss",
    "correlation_step",
    "low_cost_svd",
    "random_orthonormal",
    "recalibrate",
    "Split",
    "SvdFallbacks",
]

# The reference implementation clips the gradient of the correlation loss to norm 1.0 and takes
# one SGD step of 0.1 on P (supplementary Sec. 1.1, "eta set to 0.1 by default").
CORRELATION_LR = 0.1
CORRELATION_MAX_NORM = 1.0
# ``"paper"``: the loss of supplementary Eq. 2, whose reconstruction term is a mean over the m x n
# entries, so its gradient scales with the gradient's magnitude squared (at RMS 1e-2 one step of
# 0.1 moves P by about 1e-6).  ``"relative"``: the reconstruction term relative to the gradient's
# mean square, ``||H P P^T - H||^2 / ||H||^2``, so the step is the same at every gradient scale.
CORRELATION_LOSSES = ("paper", "relative")
# How a recalibrated basis is laid onto the old one before the moments (kept in the old
# coordinates) read it: ``"none"`` (as the decomposition returns it: each column's sign is an
# arbitrary convention), ``"sign"`` (each new column flipped to point along its predecessor) or
# ``"rotation"`` (the orthonormal basis of the new subspace nearest the old basis: orthogonal
# Procrustes; it keeps the subspace and gives up the singular-vector order).
BASIS_ALIGNMENTS = ("none", "sign", "rotation")
DEFAULT_BASIS_ALIGNMENT = "none"
DEFAULT_CORRELATION_LOSS = "paper"

# Row norms below this are clamped in the cosine, as torch.nn.functional.cosine_similarity does
# (its default eps): a row of G that holds only rounding noise then adds almost nothing to the
# direction term, instead of a full-size cosine of random sign.
COS_EPS = 1e-8
_TINY = 1e-30
# Largest |Z^T Z - I| entry the fast low-cost SVD accepts before its final re-orthonormalization.
ORTHONORMALITY_TOLERANCE = 1e-3


class Split:
    """How one tall problem (``H``, ``P``) is split across the ranks of a process group: the
    local part of a weight that FSDP2 shards on its first dimension (``Shard(0)``).

    ``axis="rows"``: ``H``'s rows are split (the gradient of a tall weight, Tucker-2's input
    mode).  ``P`` (n x r) is whole on every rank, ``A = H P`` and the moments have the local rows;
    the products that contract the rows (``A^T A``, ``A^T H``, ``H^T X``) are sums over ranks.

    ``axis="cols"``: ``H``'s columns, and so ``P``'s rows, are split (a wide weight's ``G^T``,
    Tucker-2's output mode).  ``A = H P`` contracts the split dimension: it is a sum over ranks
    that every rank then holds whole, as it holds the moments; ``P^T P`` and ``H``'s row norms
    are sums too, while ``H^T X`` and the new ``P`` keep the local rows.

    ``total`` is the split dimension's global size, ``offset`` and ``local`` where this rank's
    part starts and how long it is; ``chunk`` the part every rank but the last ones holds
    (``torch.chunk``'s rule, which FSDP2 and DTensor follow).  Only small matrices (r x r, r x n,
    n-vectors) are ever reduced or gathered: never ``H`` itself.
    """

    def __init__(self, axis: str, group, world: int, rank: int, total: int, chunk: int) -> None:
        self.axis, self.group, self.world, self.rank = axis, group, world, rank
        self.total, self.chunk = total, chunk
        self.offset = min(rank * chunk, total)
        self.local = min(chunk, total - self.offset)

    def scaled(self, factor: int) -> "Split":
        """The same split of a dimension ``factor`` times finer (rows ``(o, kk)`` of an unfolding)."""
        return Split(self.axis, self.group, self.world, self.rank, self.total * factor, self.chunk * factor)

    def sum(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """The tensors summed over the group (new tensors, one collective per dtype)."""
        import torch.distributed as dist

        out: list[torch.Tensor | None] = [None] * len(tensors)
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            dist.all_reduce(flat, group=self.group)
            for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
                out[i] = part.view(tensors[i].shape)
        return out  # type: ignore[return-value]

    def scatter_sum(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of ``t`` (``(total, ...)``, a part of a sum) summed over the group:
        a reduce-scatter, the first half of an all-reduce."""
        import torch.distributed as dist

        padded = t.new_zeros((self.chunk * self.world, *t.shape[1:]))
        padded[: t.shape[0]] = t
        out = t.new_empty((self.chunk, *t.shape[1:]))
        dist.reduce_scatter_tensor(out, padded, group=self.group)
        return out[: self.local]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The whole ``(total, ...)`` tensor from every rank's ``(local, ...)`` rows."""
        import torch.distributed as dist

        padded = t.new_zeros((self.chunk, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)[: self.total]

    def mine(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole ``(total, ...)`` tensor."""
        return t[self.offset : self.offset + self.local]


def _split(split: "Split | None", axis: str) -> bool:
    return split is not None and split.axis == axis


class CorrelationResult(NamedTuple):
    """What one correlation-aware update computed (all 0-d tensors stay on the device)."""

    grad: torch.Tensor  # dL/dP, n x r (before clipping)
    mse: torch.Tensor  # MSE(H P P^T, H)
    cos: torch.Tensor  # mean row cosine of (M P^T, H)


def _row_terms(h: torch.Tensor, a: torch.Tensor, m: torch.Tensor, s: torch.Tensor, split: "Split | None" = None):
    """Per-row quantities of the direction term: <M̂_i, H_i>, ||M̂_i||, ||H_i||."""
    dots = (m * a).sum(dim=1)  # <M_i P^T, H_i> = M_i . (H_i P)
    m_norm = ((m @ s) * m).sum(dim=1).clamp_min(0).sqrt()  # ||M_i P^T|| = sqrt(M_i S M_i^T)
    if _split(split, "cols"):  # each rank holds a part of every row of H
        (h_sq,) = split.sum(h.square().sum(dim=1))
        return dots, m_norm, h_sq.sqrt()
    h_norm = torch.linalg.vector_norm(h, dim=1)
    return dots, m_norm, h_norm


def correlation_loss(h: torch.Tensor, p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Supplementary Eq. 2, computed literally (m x n temporaries): the reference for tests.

    ``L(P) = MSE(H P P^T, H) * (1 - mean_i CosSim(M_i P^T, H_i))``.
    """
    g_hat = h @ p @ p.T
    mse = (g_hat - h).pow(2).mean()
    m_hat = m @ p.T
    cos = torch.nn.functional.cosine_similarity(m_hat, h, dim=1, eps=COS_EPS).mean()
    return mse * (1 - cos)


def correlation_grad(
    h: torch.Tensor,
    p: torch.Tensor,
    a: torch.Tensor,
    m: torch.Tensor,
    loss: str = DEFAULT_CORRELATION_LOSS,
    split: Split | None = None,
) -> CorrelationResult:
    """Closed form of dL/dP for ``L = MSE(H P P^T, H) * (1 - CosSim_rows(M P^T, H))``.

    With ``A = H P``, ``S = P^T P`` and ``K = H^T H``:

    * ``dMSE/dP = 2/(mn) (K P S + P P^T K P - 2 K P) = 2/(mn) (H^T A (S - 2I) + P A^T A)``
      (supplementary Eq. 4 with ``Ĝ^T G P = P P^T K P`` and ``G^T Ĝ P = K P S``);
    * ``dCos/dP = 1/m (H^T (w1 * M) - P M^T (w2 * M))`` with per-row weights
      ``w1 = 1 / (|M̂_i| |H_i|)`` and ``w2 = <M̂_i, H_i> / (|M̂_i|^3 |H_i|)`` (Eq. 6), norms clamped
      at ``COS_EPS`` as ``torch.nn.functional.cosine_similarity`` clamps them;
    * ``dL/dP = dMSE (1 - Cos) - MSE dCos``: the product rule gives a minus where the paper's
      Eq. 3 prints a plus; ``tests/test_projection.py`` checks this against autograd.

    Both ``H^T`` terms share one product, so the cost is one ``H^T X`` (m n r multiply-adds)
    plus r x r algebra; ``A`` is the projection the optimizer already holds.

    With ``loss="relative"`` the loss is divided by ``||H||^2 / (m n)`` (the MSE term becomes the
    relative reconstruction error, the same at every gradient scale), and so is the gradient;
    ``mse`` is the plain MSE either way.

    With ``split`` (see :class:`Split`) the arguments are this rank's parts and the result is
    the gradient of the whole problem: replicated for split rows, this rank's rows of it for
    split columns (two small all-reduces either way).
    """
    rows, cols = h.shape
    s = p.T @ p
    ata = a.T @ a
    if _split(split, "cols"):  # P's rows are split: S is a sum over ranks, A is whole everywhere
        (s,) = split.sum(s)
        cols = split.total
    dots, m_norm, h_norm = _row_terms(h, a, m, s, split)
    h_sq = h_norm.square().sum()
    m_c, h_c = m_norm.clamp_min(COS_EPS), h_norm.clamp_min(COS_EPS)
    w1 = 1.0 / (m_c * h_c)
    cos_rows = dots * w1
    if _split(split, "rows"):  # H's rows are split: the sums over rows are sums over ranks
        ata, h_sq, cos_sum = split.sum(ata, h_sq, cos_rows.sum())
        rows = split.total
        cos = cos_sum / rows
    else:
        cos = cos_rows.mean()
    # ||H P P^T - H||^2 = ||H||^2 - 2 tr(A^T A) + tr(A^T A S), with ||H||^2 from the row norms
    sq_err = (h_sq - 2 * torch.trace(ata) + (ata * s).sum()).clamp_min(0)
    mse = sq_err / (rows * cols)
    # |M̂_i| depends on P only where it is not clamped
    w2 = torch.where(m_norm > COS_EPS, cos_rows / m_c.square(), torch.zeros_like(cos_rows))

    c_mse = 2.0 * (1 - cos) / (rows * cols)
    c_cos = mse / rows
    if loss == "relative":  # L / (||H||^2 / (m n)): both terms scaled alike
        rel = (rows * cols) / h_sq.clamp_min(_TINY)
        c_mse, c_cos = c_mse * rel, c_cos * rel
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    # One H^T product carries both terms: X = c_mse * A (S - 2I) - c_cos * (w1 * M).  The
    # coefficients are device values: they scale tensors, never addmm's alpha/beta (a host read)
    x = torch.mm(a, s - 2 * eye).mul_(c_mse).sub_(m * (w1 * c_cos)[:, None])
    grad = h.T @ x
    # The r x r terms: P (c_mse A^T A + c_cos M^T (w2 * M))
    small = torch.mm(m.T, m * (w2 * c_cos)[:, None])
    if _split(split, "rows"):  # both products contract the split rows
        grad, small = split.sum(grad, small)
    small.add_(ata * c_mse)
    grad.addmm_(p, small)
    return CorrelationResult(grad, mse, cos)


def correlation_step(
    h: torch.Tensor,
    p: torch.Tensor,
    a: torch.Tensor,
    m: torch.Tensor,
    *,
    lr: float = CORRELATION_LR,
    max_norm: float = CORRELATION_MAX_NORM,
    loss: str = DEFAULT_CORRELATION_LOSS,
    split: Split | None = None,
) -> tuple[torch.Tensor, CorrelationResult]:
    """One clipped gradient step on P; returns the new P (a new tensor) and the loss terms.

    ``loss`` is ``"paper"`` (supplementary Eq. 2) or ``"relative"`` (see :func:`correlation_grad`);
    ``split`` as there."""
    res = correlation_grad(h, p, a, m, loss, split)
    if _split(split, "cols"):  # the norm of the whole gradient, whose rows are split
        (sq,) = split.sum(res.grad.square().sum())
        norm = sq.sqrt()
    else:
        norm = torch.linalg.vector_norm(res.grad)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return torch.add(p, res.grad * scale, alpha=-lr), res


def align_basis(old: torch.Tensor, new: torch.Tensor, mode: str, split: Split | None = None) -> torch.Tensor:
    """``new`` (n x r) laid onto ``old`` as ``mode`` says (see :data:`BASIS_ALIGNMENTS`); the span
    of ``new`` is never changed.  ``"sign"`` flips the columns whose dot product with their
    predecessor is negative; ``"rotation"`` returns ``new Q`` with ``Q = U V^T`` from the SVD of
    the r x r ``new^T old`` (the orthonormal basis of span(new) nearest ``old`` in Frobenius norm).
    With a ``split`` of the columns the bases are this rank's rows, and those products sums over ranks.
    """
    cols = _split(split, "cols")
    if mode == "sign":
        dots = (old * new).sum(dim=0)
        if cols:
            (dots,) = split.sum(dots)
        return new * torch.where(dots < 0, -1.0, 1.0).to(new.dtype)
    if mode == "rotation":
        cross = new.T @ old
        if cols:
            (cross,) = split.sum(cross)
        # a non-finite basis (a step the optimizer will discard) must not make the SVD raise
        u, _, vh = torch.linalg.svd(torch.nan_to_num(cross.double(), nan=0.0, posinf=0.0, neginf=0.0))
        return new @ (u @ vh).to(new.dtype)
    return new


class SvdFallbacks:
    """Fast recalibrations whose fallback is decided later, for many layers at once.

    The fast low-cost SVD knows on the device whether it succeeded; asking would cost one host
    sync per call.  An optimizer step passes one ``SvdFallbacks`` to every recalibration it runs,
    sets :attr:`guard` (a 0-d bool: is this layer's gradient usable at all?) before each layer,
    and calls :meth:`resolve` once: a single sync reads every flag, and only the layers whose fast
    path failed (and whose gradient was usable) run the Householder form, written in place into
    the tensor the recalibration returned.
    """

    def __init__(self) -> None:
        self.guard: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, object]] = []

    def add(self, ok: torch.Tensor, out: torch.Tensor, fallback) -> None:
        self._pending.append((ok, self.guard, out, fallback))

    def resolve(self) -> int:
        """Run the fallbacks that are needed; returns how many ran.  One host sync when every
        fast path held (the common case), a second (a copy of the flags) when one did not."""
        if not self._pending:
            return 0
        need = torch.stack([~ok if guard is None else guard & ~ok for ok, guard, _, _ in self._pending])
        pending, self._pending = self._pending, []
        if not bool(need.any()):
            return 0
        fell_back = 0
        for (_, _, out, fallback), needed in zip(pending, need.cpu().tolist()):
            if needed:
                out.copy_(fallback())
                fell_back += 1
        return fell_back


def recalibrate(
    old: torch.Tensor | None,
    h: torch.Tensor,
    a: torch.Tensor,
    rank: int,
    alignment: str = DEFAULT_BASIS_ALIGNMENT,
    fallbacks: SvdFallbacks | None = None,
    split: Split | None = None,
) -> torch.Tensor:
    """The new projector of a recalibration: :func:`low_cost_svd` of ``(h, a)`` laid onto ``old``
    (:func:`align_basis`; ``old=None``: as returned).  With ``fallbacks`` no host sync is made:
    the fast path's result is returned and its Householder fallback registered there.  ``split``
    as :func:`low_cost_svd`."""

    def laid(new: torch.Tensor) -> torch.Tensor:
        return new if old is None else align_basis(old, new, alignment, split)

    if fallbacks is None:
        return laid(low_cost_svd(h, a, rank, split)[0])
    z, _, ok = _low_cost_svd_fast(h, a, rank, split)
    out = laid(z)
    fallbacks.add(ok, out, lambda: laid(_low_cost_svd_householder(h, a, rank, split)[0]))
    return out


def low_cost_svd(
    h: torch.Tensor, a: torch.Tensor, rank: int, split: Split | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recalibrate P from ``A = H P_prev``: ``Q = qr(A)``, ``U S Z^T = svd(Q^T H)``, ``P = Z[:, :r]``.

    O(m n r): one product with H and r x r factorizations, never an m x n SVD.  Returns the new
    P (n x r, orthonormal columns) and the singular values of ``Q^T H`` (``sum(S^2)`` is the
    energy of H inside the new subspace).

    ``Q`` is never formed.  With ``C = A^T H`` (the one product with H), ``Q^T H = R^{-T} C``
    where ``A^T A = R^T R``, so its right singular vectors are ``Z = C^T R^{-1} U S^{-1}`` with
    ``U S^2 U^T`` the eigendecomposition of the r x r matrix ``R^{-T} C C^T R^{-1}``.  The r x r
    algebra runs in float64 (the Gram matrices square the condition number), and a Cholesky
    re-orthonormalization of Z removes the fp32 rounding of the last product.  This is 3-4x
    faster on CPU than LAPACK's Householder QR of A plus an SVD of the r x n matrix; when A or
    the gradient is (numerically) rank-deficient the Householder path is used instead (deciding
    that reads one device flag: :class:`SvdFallbacks` batches the decision over many layers).

    With ``split`` (:class:`Split`) ``h`` and ``a`` are this rank's parts: split rows reduce
    ``A^T A`` and ``C`` (r x r and r x n) and give every rank the whole P; split columns reduce
    ``C C^T`` and ``Z^T Z`` (both r x r) and give each rank its rows of P.  Every flag a decision
    reads comes from reduced values, so all ranks take the same path.
    """
    z, sv, ok = _low_cost_svd_fast(h, a, rank, split)
    if bool(ok):
        return z, sv
    return _low_cost_svd_householder(h, a, rank, split)


def _low_cost_svd_fast(
    h: torch.Tensor, a: torch.Tensor, rank: int, split: Split | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fast form of :func:`low_cost_svd` without a host sync: ``(Z, S, ok)``, ``ok`` a 0-d
    bool tensor saying whether every guard held.  Where one fails the factors are replaced by
    identities on the device, so no decomposition sees NaNs or raises, and ``Z`` is garbage that
    the caller must not use (see :class:`SvdFallbacks`)."""
    c = a.T @ h
    a64, c64 = a.double(), c.double()
    gram_a = a64.T @ a64
    if _split(split, "rows"):  # both contract the split rows: sums over ranks, in float64
        c64, gram_a = split.sum(c64, gram_a)
        c = c64.to(c.dtype)
    chol_a, info_a = torch.linalg.cholesky_ex(gram_a)
    eye = torch.eye(chol_a.shape[0], dtype=chol_a.dtype, device=chol_a.device)
    pivots = chol_a.diagonal()
    # A's columns carry fp32 rounding: directions below ~1e-5 of its largest are noise, and
    # R^{-1} would amplify them, so such an A takes the Householder path.
    ok = (info_a == 0) & (pivots.min() > 1e-5 * pivots.max())
    chol_a = torch.where(ok, chol_a, eye)
    cct = c64 @ c64.T
    if _split(split, "cols"):  # C's columns are split
        (cct,) = split.sum(cct)
    t = torch.linalg.solve_triangular(chol_a, cct, upper=False)
    k = torch.linalg.solve_triangular(chol_a, t.T, upper=False)
    k = (k + k.T) / 2
    ok = ok & torch.isfinite(k.sum())
    lam, u = torch.linalg.eigh(torch.where(ok, k, eye))
    lam, u = lam.flip(0)[:rank], u.flip(1)[:, :rank]
    ok = ok & (lam[-1] > lam[0] * 1e-10)
    lam = torch.where(ok, lam, torch.ones_like(lam))
    w = torch.linalg.solve_triangular(chol_a.T, u, upper=True) / lam.sqrt()
    z = c.T @ w.to(c.dtype)
    z64 = z.double()
    gram_z = z64.T @ z64
    if _split(split, "cols"):  # Z has this rank's rows
        (gram_z,) = split.sum(gram_z)
    # Z is orthonormal in exact arithmetic; when the spectrum is steep and A is far from the
    # dominant subspace (a random start), the fp32 product C^T W loses the lower columns (they
    # drown in the rounding of the upper ones) and Z^T Z shows it.  Below the tolerance every
    # column stays within about half a degree of the textbook result; lost columns show defects
    # of 0.05-1.  The re-orthonormalization below would hide it, so check first and take the
    # Householder path when it is exceeded.
    eye_z = torch.eye(rank, dtype=gram_z.dtype, device=gram_z.device)
    defect = (gram_z - eye_z).abs().amax()
    ok = ok & (defect < ORTHONORMALITY_TOLERANCE)
    chol_z, info_z = torch.linalg.cholesky_ex(torch.where(ok, gram_z, eye_z))
    ok = ok & (info_z == 0)
    chol_z = torch.where(ok, chol_z, eye_z)
    z = torch.linalg.solve_triangular(chol_z.T.to(z.dtype), z, upper=True, left=False)
    return z, lam.sqrt().to(c.dtype), ok


def _low_cost_svd_householder(
    h: torch.Tensor, a: torch.Tensor, rank: int, split: Split | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook form (QR of A, SVD of Q^T H): slower, exact for rank-deficient input.

    Split rows: A (m x r) is gathered, its QR taken on every rank, and ``Q^T H`` (r x n) summed;
    split columns: ``Q^T H`` (r x n) is gathered.  Small matrices only, and every rank
    factorizes the same ones."""
    rows = _split(split, "rows")
    q, _ = torch.linalg.qr(split.gather(a) if rows else a)
    if rows:
        (b,) = split.sum(split.mine(q).T @ h)
    elif _split(split, "cols"):
        b = split.gather((q.T @ h).T).T
    else:
        b = q.T @ h
    _, sv, zh = torch.linalg.svd(b, full_matrices=False)
    z = zh[:rank].T
    return (split.mine(z) if _split(split, "cols") else z).contiguous(), sv[:rank]


def random_orthonormal(n: int, r: int, seed: int, *, device: torch.device | None = None) -> torch.Tensor:
    """A seeded random n x r start with orthonormal columns, identical on every device and rank.

    Drawn on the CPU from a private generator (so it neither reads nor advances the global RNG)
    and then moved, so CPU and CUDA runs and every DDP rank start from the same sketch.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float32))
    return q.to(device) if device is not None else q
