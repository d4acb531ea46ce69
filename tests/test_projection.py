import math

import pytest
import torch

from coap_plugins.projection import MatrixProjector, Tucker2Projector, build_projector
from coap_plugins.projection.linalg import (
    correlation_grad,
    correlation_loss,
    correlation_step,
    low_cost_svd,
    random_orthonormal,
)

f64 = torch.float64


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _autograd_grad(h, p, m):
    p = p.clone().requires_grad_(True)
    correlation_loss(h, p, m).backward()
    return p.grad


@pytest.mark.parametrize("rows,cols,rank", [(48, 20, 5), (64, 64, 16)])
def test_closed_form_matches_autograd_matrix(rows, cols, rank):
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, cols, generator=g, dtype=f64)
    p = torch.randn(cols, rank, generator=g, dtype=f64) / math.sqrt(cols)  # not orthonormal on purpose
    m = torch.randn(rows, rank, generator=g, dtype=f64)
    res = correlation_grad(h, p, h @ p, m)
    assert _rel(res.grad, _autograd_grad(h, p, m)) < 1e-5
    assert float(abs(res.mse * (1 - res.cos) - correlation_loss(h, p, m))) < 1e-12


def test_closed_form_clamps_tiny_rows_like_cosine_similarity():
    """Rows of G that hold only rounding noise (and moment rows near zero) are clamped at 1e-8 in
    the cosine, as torch.nn.functional.cosine_similarity does: the closed form follows autograd."""
    g = torch.Generator().manual_seed(11)
    h = torch.randn(40, 16, generator=g, dtype=f64)
    h[:5] *= 1e-12  # noise rows
    p = torch.randn(16, 4, generator=g, dtype=f64) / 4
    m = torch.randn(40, 4, generator=g, dtype=f64)
    m[5:8] *= 1e-12
    res = correlation_grad(h, p, h @ p, m)
    assert _rel(res.grad, _autograd_grad(h, p, m)) < 1e-5
    # the noise rows add (almost) nothing to the direction term
    cos_all = float(res.cos)
    cos_real = float(torch.nn.functional.cosine_similarity(m[8:] @ p.T, h[8:], dim=1).sum() / 40)
    assert abs(cos_all - cos_real) < 1e-3


def test_closed_form_wide_weight_uses_transposed_problem():
    # W is 12 x 40: the projector reduces the 12-long side, so the tall problem is H = G^T.
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(12, 40, generator=g, dtype=f64)
    proj = MatrixProjector((12, 40), 3)
    assert proj.transposed and proj.moment_shape == (40, 3) and proj.state_shapes() == {"proj": (12, 3)}
    h = proj.tall(grad)
    p = torch.randn(12, 3, generator=g, dtype=f64)
    m = torch.randn(40, 3, generator=g, dtype=f64)
    assert _rel(correlation_grad(h, p, h @ p, m).grad, _autograd_grad(h, p, m)) < 1e-5


def test_paper_sign_of_eq3_is_wrong():
    """The product rule gives dMSE (1 - Cos) - MSE dCos; the '+' printed in Eq. 3 disagrees with autograd."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(30, 10, generator=g, dtype=f64)
    p = torch.randn(10, 4, generator=g, dtype=f64)
    m = torch.randn(30, 4, generator=g, dtype=f64)
    auto = _autograd_grad(h, p, m)
    # rebuild the two pieces separately with autograd and combine with a '+'
    pp = p.clone().requires_grad_(True)
    mse = (h @ pp @ pp.T - h).pow(2).mean()
    cos = torch.nn.functional.cosine_similarity(m @ pp.T, h, dim=1).mean()
    (d_mse,) = torch.autograd.grad(mse, pp, retain_graph=True)
    (d_cos,) = torch.autograd.grad(cos, pp)
    plus = d_mse * (1 - cos.detach()) + d_cos * mse.detach()
    minus = d_mse * (1 - cos.detach()) - d_cos * mse.detach()
    assert _rel(minus, auto) < 1e-10
    assert _rel(plus, auto) > 1e-3


def _tucker_mode_losses(grad, p_out, p_in, m_core):
    """Supplementary Eq. 2 per mode of a Tucker-2 projector, written with einsum (m x n temporaries)."""
    o, i, k1, k2 = grad.shape
    k = k1 * k2
    g3 = grad.reshape(o, i, k)
    # output mode: H_O = G_(1)^T, moment restored along the input mode
    h_out = g3.reshape(o, i * k).T
    m_out = torch.einsum("akb,ib->aik", m_core, p_in).reshape(-1, i * k).T
    # input mode: H_I = G_(2)^T with rows (o, kk), moment restored along the output mode
    h_in = g3.permute(0, 2, 1).reshape(o * k, i)
    m_in = torch.einsum("akb,oa->okb", m_core, p_out).reshape(o * k, -1)
    return (h_out, p_out, m_out), (h_in, p_in, m_in)


def test_closed_form_matches_autograd_tucker2():
    g = torch.Generator().manual_seed(3)
    shape = (12, 10, 3, 3)
    grad = torch.randn(shape, generator=g, dtype=f64)
    proj = Tucker2Projector(shape, 5, 4)
    state = {
        "proj_out": torch.linalg.qr(torch.randn(12, 5, generator=g, dtype=f64))[0],
        "proj_in": torch.linalg.qr(torch.randn(10, 4, generator=g, dtype=f64))[0],
    }
    m_core = torch.randn(proj.moment_shape, generator=g, dtype=f64)
    core, ctx = proj.project(state, grad)
    # the core is the definition G x1 P_O^T x2 P_I^T, laid out (r_O, k, r_I)
    ref_core = torch.einsum("oikl,oa,ib->aklb", grad, state["proj_out"], state["proj_in"])
    assert torch.allclose(core, ref_core.reshape(5, 9, 4), atol=1e-12)
    new, _ = proj.refresh(state, grad, core, ctx, "correlation", m_core)
    for (h, p, m), key in zip(
        _tucker_mode_losses(grad, state["proj_out"], state["proj_in"], m_core), ("proj_out", "proj_in")
    ):
        auto = _autograd_grad(h, p, m)
        scale = min(1.0, 1.0 / (float(auto.norm()) + 1e-6))
        expected = p - 0.1 * scale * auto
        assert _rel(new[key] - p, expected - p) < 1e-5


def test_tucker_back_projection_is_adjoint_of_projection():
    g = torch.Generator().manual_seed(4)
    shape = (16, 8, 3, 3)
    proj = Tucker2Projector(shape, 6, 3)
    state = {
        "proj_out": torch.linalg.qr(torch.randn(16, 6, generator=g, dtype=f64))[0],
        "proj_in": torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=f64))[0],
    }
    x = torch.randn(shape, generator=g, dtype=f64)
    u = torch.randn(proj.moment_shape, generator=g, dtype=f64)
    w = torch.zeros(shape, dtype=f64)
    proj.apply_update(w, u, state, 1.0)
    core, _ = proj.project(state, x)
    # <project(x), u> == <x, back(u)>
    assert abs(float((core * u).sum() - (x * w).sum())) < 1e-10


def test_correlation_step_clips_to_unit_norm_and_uses_lr_0_1():
    g = torch.Generator().manual_seed(5)
    h = 100 * torch.randn(50, 20, generator=g, dtype=f64)
    p = torch.randn(20, 6, generator=g, dtype=f64)
    m = torch.randn(50, 6, generator=g, dtype=f64)
    new_p, res = correlation_step(h, p, h @ p, m)
    assert float(res.grad.norm()) > 1.0
    assert float((new_p - p).norm()) == pytest.approx(0.1, rel=1e-5)


def test_low_cost_svd_recovers_top_subspace():
    g = torch.Generator().manual_seed(6)
    m, n, r = 200, 80, 8
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.cat([torch.linspace(10, 5, r), 1e-3 * torch.rand(n - r, generator=g)])
    h = (u * s) @ v.T
    p0 = random_orthonormal(n, r, seed=0)
    p, sv = low_cost_svd(h, h @ p0, r)
    assert torch.allclose(p.T @ p, torch.eye(r), atol=1e-5)
    cosines = torch.linalg.svdvals(p.T @ v[:, :r]).clamp(max=1.0)
    largest_angle = float(torch.arccos(cosines.min()))
    assert largest_angle < 1e-3
    assert torch.allclose(sv, s[:r], rtol=1e-4)


def test_random_start_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = random_orthonormal(32, 4, seed=11)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a, random_orthonormal(32, 4, seed=11))
    assert not torch.equal(a, random_orthonormal(32, 4, seed=12))


@pytest.mark.parametrize(
    "shape,kwargs,expected",
    [
        ((64, 32), {}, ("matrix", 8)),
        ((64, 32), {"rank": 5}, ("matrix", 5)),
        ((64, 32), {"rank": 5, "rank_ratio_matrix": 2}, ("matrix", 16)),  # the ratio wins
        ((64, 32), {"rank": 32}, (None, None)),  # rank not below min(m, n)
        ((3, 100), {}, ("matrix", None)),  # 3 // 4 -> at least 1
        ((64, 64, 3, 3), {}, ("tucker2", (32, 32))),
        ((64, 64, 3, 3), {"rank_ratio_conv": 16}, ("tucker2", (16, 16))),
        ((32, 32, 3, 3), {}, (None, None)),  # 9216 elements: at the floor
        ((256, 64, 1, 1), {"min_conv_numel": 0}, ("tucker2", (64, None))),  # r_O capped at I, output mode only
        ((128,), {}, (None, None)),
        ((4, 5, 6), {}, (None, None)),
    ],
)
def test_build_projector_routing(shape, kwargs, expected):
    proj, reason = build_projector(shape, **kwargs)
    kind, rank = expected
    assert isinstance(reason, str) and reason
    if kind is None:
        assert proj is None
        return
    assert proj.kind == kind
    if kind == "matrix" and rank is not None:
        assert proj.rank == rank
    if kind == "matrix" and rank is None:
        assert proj.rank == 1
    if kind == "tucker2":
        assert (proj.rank_out, proj.rank_in) == rank


def test_build_projector_rejects_unknown_kind_and_wrong_shapes():
    with pytest.raises(ValueError, match=r"Invalid projection kind: 'svd'"):
        build_projector((4, 4), "svd")
    with pytest.raises(ValueError, match="needs a 2-D weight"):
        build_projector((4, 4, 3, 3), "matrix")
    with pytest.raises(ValueError, match="needs a 4-D conv weight"):
        build_projector((40, 40), "tucker2", min_conv_numel=0)


def test_projector_rank_bounds():
    with pytest.raises(ValueError, match=r"Invalid rank: 8 \(must be in \[1, 8\)"):
        MatrixProjector((8, 20), 8)
    with pytest.raises(ValueError, match="Invalid rank_out"):
        Tucker2Projector((8, 2, 1, 1), 4, None)  # r_O above I*k
    with pytest.raises(ValueError, match="output mode only"):
        Tucker2Projector((8, 8, 1, 1), 2, 2)


def test_low_cost_svd_fast_path_agrees_with_householder_form():
    from coap_plugins.projection.linalg import _low_cost_svd_householder

    g = torch.Generator().manual_seed(8)
    h = torch.randn(120, 60, generator=g) * torch.logspace(0, -2, 60)
    a = h @ random_orthonormal(60, 12, seed=3)
    p_fast, s_fast = low_cost_svd(h, a, 12)
    p_ref, s_ref = _low_cost_svd_householder(h, a, 12)
    assert torch.allclose(s_fast, s_ref, rtol=1e-4)
    # same subspace, same ordering: columns agree up to sign
    assert torch.allclose((p_fast * p_ref).sum(0).abs(), torch.ones(12), atol=1e-4)


def test_low_cost_svd_rank_deficient_gradient_still_gives_orthonormal_p():
    g = torch.Generator().manual_seed(9)
    h = torch.randn(80, 3, generator=g) @ torch.randn(3, 40, generator=g)  # rank 3 < r = 8
    p, sv = low_cost_svd(h, h @ random_orthonormal(40, 8, seed=1), 8)
    assert torch.allclose(p.T @ p, torch.eye(8), atol=1e-5)
    # the rank-3 row space is inside the new subspace
    assert float((h - h @ p @ p.T).norm() / h.norm()) < 1e-5
    assert sv.shape == (8,) and float(sv[3:].max()) < 1e-4 * float(sv[0])


# -- the low-cost SVD on steep spectra from an unaligned start ------------------------------------
def _steep(m, n, spread, seed, r=64):
    """G = U diag(s) V^T: s log-spaced from 1 to ``spread`` over the first r values, a tail below."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=f64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=f64))
    s = torch.full((min(m, n),), min(1e-5, spread / 10), dtype=f64)
    s[:r] = torch.logspace(0, math.log10(spread), r, dtype=f64)
    return ((u * s) @ v.T).float()


def _column_angles_deg(p, q):
    cos = ((p.double() * q.double()).sum(0).abs() / (p.double().norm(dim=0) * q.double().norm(dim=0))).clamp(max=1)
    return torch.rad2deg(torch.acos(cos))


def _textbook(h, a, rank):
    q, _ = torch.linalg.qr(a.double())
    _, _, zh = torch.linalg.svd(q.T @ h.double(), full_matrices=False)
    return zh[:rank].T


@pytest.mark.parametrize("spread", [1e-2, 1e-3, 1e-4, 1e-5])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("shape", [(512, 256), (256, 512)])
def test_low_cost_svd_keeps_every_column_on_steep_spectra_from_a_random_start(spread, seed, shape):
    g = _steep(*shape, spread, seed)
    h = g if shape[0] >= shape[1] else g.T  # the tall orientation a MatrixProjector works on
    p0 = random_orthonormal(h.shape[1], 64, 100 + seed)
    a = h @ p0
    new, _ = low_cost_svd(h, a, 64)
    assert float(_column_angles_deg(new, _textbook(h, a, 64)).max()) < 1.0
    # and the result goes through a projector's SVD refresh the same way
    proj = MatrixProjector(shape, 64)
    state = {"proj": p0}
    out, _ = proj.refresh(state, g, proj.project(state, g)[0], None, "svd", torch.zeros(max(shape), 64))
    assert float(_column_angles_deg(out["proj"], _textbook(h, a, 64)).max()) < 1.0


@pytest.mark.parametrize("spread", [1e-3, 1e-5])
def test_tucker2_svd_refresh_keeps_every_column_on_steep_spectra(spread):
    # output unfolding G_(1) (256 x 576) with a steep spectrum; both modes against the textbook form
    g1 = _steep(256, 64 * 9, spread, 3)
    grad = g1.reshape(256, 64, 3, 3)
    proj = Tucker2Projector(grad.shape, 64, 16)
    state = {"proj_out": random_orthonormal(256, 64, 5), "proj_in": random_orthonormal(64, 16, 6)}
    core, ctx = proj.project(state, grad)
    new, _ = proj.refresh(state, grad, core, ctx, "svd", torch.zeros(proj.moment_shape))
    h_out = proj._out_unfolding(grad).T
    h_in = proj._in_unfolding_t(grad)
    assert float(_column_angles_deg(new["proj_out"], _textbook(h_out, h_out @ state["proj_out"], 64)).max()) < 1.0
    assert float(_column_angles_deg(new["proj_in"], _textbook(h_in, h_in @ state["proj_in"], 16)).max()) < 1.0


def test_low_cost_svd_keeps_its_fast_path_when_the_start_is_aligned():
    # the usual refresh: P from the previous recalibration is already close; no fallback needed
    h = _steep(512, 256, 1e-4, 0)
    p_prev = _textbook(h, h @ random_orthonormal(256, 64, 1), 64).float()
    a = h @ p_prev
    calls = []
    import coap_plugins.projection.linalg as linalg

    real = linalg._low_cost_svd_householder
    linalg._low_cost_svd_householder = lambda *args: calls.append(1) or real(*args)
    try:
        new, _ = low_cost_svd(h, a, 64)
    finally:
        linalg._low_cost_svd_householder = real
    assert calls == []
    assert float(_column_angles_deg(new, _textbook(h, a, 64)).max()) < 1.0


# -- a single projected mode takes the whole ratio ----------------------------------------------
@pytest.mark.parametrize("ratio", [4, 16])
def test_1x1_conv_takes_the_whole_rank_ratio(ratio):
    proj, reason = build_projector((256, 1024, 1, 1), rank_ratio_conv=ratio)
    assert (proj.rank_out, proj.rank_in) == (256 // ratio, None)
    assert math.prod(proj.moment_shape) * ratio == 256 * 1024  # moments are 1/ratio of the full size
    assert "output mode only" in reason
    # both modes projected: sqrt(ratio) each, the same 1/ratio overall
    proj, _ = build_projector((256, 256, 3, 3), rank_ratio_conv=ratio)
    assert (proj.rank_out, proj.rank_in) == (256 // int(math.sqrt(ratio)),) * 2


def test_1x1_conv_that_saves_nothing_stays_full_rank():
    # 128 x 64 1x1 at ratio 1.5: r_O = 85 capped at I = 64; P_O (128 x 64) + two 64 x 64 moments
    # hold as many floats as two full 128 x 64 moments
    proj, reason = build_projector((128, 64, 1, 1), rank_ratio_conv=1.5, min_conv_numel=0)
    assert proj is None and "would hold" in reason


def test_projectors_state_their_ranks():
    assert MatrixProjector((64, 32), 8).ranks == {"rank": 8}
    assert Tucker2Projector((64, 64, 3, 3), 16, 8).ranks == {"rank_out": 16, "rank_in": 8}
    assert Tucker2Projector((64, 32, 1, 1), 16, None).ranks == {"rank_out": 16, "rank_in": None}
    # the ranks are the projector's rank attributes, nothing else
    for proj in (MatrixProjector((64, 32), 8), Tucker2Projector((64, 64, 3, 3), 16, 8)):
        assert proj.ranks == {k: v for k, v in vars(proj).items() if "rank" in k}


def test_routing_lives_in_its_own_module_and_the_package_reexports_it():
    import coap_plugins
    import coap_plugins.projection as projection
    from coap_plugins.projection import routing

    assert projection.build_projector is routing.build_projector is coap_plugins.build_projector
    assert projection.DEFAULT_MIN_CONV_NUMEL == routing.DEFAULT_MIN_CONV_NUMEL == 32 * 32 * 3 * 3


def test_explicit_tucker2_takes_the_size_floor_only_when_asked():
    proj, _ = build_projector((64, 16, 3, 3), "tucker2", rank_ratio_conv=4)
    assert proj is not None
    proj, reason = build_projector((64, 16, 3, 3), "tucker2", rank_ratio_conv=4, floor_tucker2=True)
    assert proj is None and reason == "conv with 9216 <= min_conv_numel=9216 elements"
