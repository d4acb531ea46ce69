"""Refreshes as supplementary Algorithms 1-2 order them, basis alignment, the relative correlation loss."""

import pytest
import torch
from torch import nn

from coap_plugins import CoapAdafactor, CoapAdamW
from coap_plugins.projection.linalg import align_basis, correlation_grad, correlation_loss, correlation_step
from coap_plugins.settings import CoapSettings

BETA1 = 0.9


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _grad(shape, step, seed=7):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    # a dominant low-rank part plus noise, so the subspace moves between steps
    if len(shape) == 2:
        u, v = torch.randn(shape[0], 3, generator=g), torch.randn(3, shape[1], generator=g)
        return u @ v + 0.1 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g)


def _tall_update(delta: torch.Tensor, transposed: bool) -> torch.Tensor:
    return delta.T if transposed else delta


@pytest.mark.parametrize("shape", [(48, 20), (16, 40)])
@pytest.mark.parametrize("kind", ["svd", "correlation"])
def test_refresh_step_projects_its_gradient_with_the_new_projector(shape, kind):
    """Algorithm 1: on a refresh step the moment takes ``G_t P_t`` and the update lies in P_t's span
    (the paper's update: without the residual outside the subspace)."""
    w = nn.Parameter(torch.randn(shape))
    opt = CoapAdamW([w], lr=1e-2, betas=(BETA1, 0.999), weight_decay=0.0, rank=4, update_interval=1000, residual="none")
    w.grad = _grad(shape, 0)
    opt.step()
    state = opt.state[w]
    m1, p_old = state["exp_avg"].clone(), state["proj"].clone()
    transposed = shape[0] < shape[1]
    g2 = _grad(shape, 1)
    w.grad = g2
    before = w.detach().clone()
    opt.request_refresh(kind)
    opt.step()
    p_new = state["proj"]
    assert _rel(p_new, p_old) > 1e-3  # the refresh did move the projector
    h2 = _tall_update(g2, transposed)
    expected = BETA1 * m1 + (1 - BETA1) * (h2 @ p_new)
    torch.testing.assert_close(state["exp_avg"], expected, rtol=1e-5, atol=1e-7)
    # the applied update is (something) @ P_t^T: nothing of it outside span(P_t)
    delta = _tall_update(w.detach() - before, transposed)
    q, _ = torch.linalg.qr(p_new)
    outside = delta - (delta @ q) @ q.T
    assert float(outside.norm() / delta.norm()) < 1e-5
    # with the old projector it would have had a large part outside
    q_old, _ = torch.linalg.qr(p_old)
    assert float((delta - (delta @ q_old) @ q_old.T).norm() / delta.norm()) > 1e-2


def test_conv_refresh_step_updates_in_both_new_subspaces():
    shape = (16, 12, 3, 3)
    w = nn.Parameter(torch.randn(shape))
    opt = CoapAdamW(
        [w], lr=1e-2, weight_decay=0.0, rank_ratio_conv=4, min_conv_numel=0, update_interval=1000, residual="none"
    )
    w.grad = _grad(shape, 0)
    opt.step()
    w.grad = _grad(shape, 1)
    before = w.detach().clone()
    opt.request_refresh("svd")
    opt.step()
    state = opt.state[w]
    delta = (w.detach() - before).reshape(16, -1)
    p_out = state["proj_out"]
    assert float((delta - p_out @ (p_out.T @ delta)).norm() / delta.norm()) < 1e-5
    d_in = (w.detach() - before).transpose(0, 1).reshape(12, -1)  # input-mode unfolding
    p_in = state["proj_in"]
    assert float((d_in - p_in @ (p_in.T @ d_in)).norm() / d_in.norm()) < 1e-5


def test_telemetry_reports_the_error_of_the_new_subspace():
    """The reconstruction error after a refresh is that of the subspace the step used (P_t),
    not of the one it replaced."""
    shape = (40, 24)
    w = nn.Parameter(torch.randn(shape))
    opt = CoapAdamW([w], rank=6, update_interval=1000)
    w.grad = _grad(shape, 0)
    opt.step()
    p_old = opt.state[w]["proj"].clone()
    g = _grad(shape, 1)
    w.grad = g
    opt.request_refresh("svd")
    opt.step()
    recon = opt.coap_report()["layers"][0]["recon_error"]

    def error(p):
        return float((1 - (g @ p).square().sum() / g.square().sum()).sqrt())

    assert recon == pytest.approx(error(opt.state[w]["proj"]), rel=1e-4)
    assert recon < 0.8 * error(p_old)


def _two_refreshes(alignment, restore_state=False, shape=(48, 20)):
    w = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    opt = CoapAdamW(
        [w], rank=5, update_interval=1000, basis_alignment=alignment, restore_state=restore_state, weight_decay=0.0
    )
    w.grad = _grad(shape, 0)
    opt.step()
    old = opt.state[w]["proj"].clone()
    w.grad = _grad(shape, 1, seed=9)  # an unrelated gradient: a new subspace
    opt.request_refresh("svd")
    opt.step()
    return old, opt.state[w]["proj"].clone(), opt, w


def test_sign_alignment_points_every_new_column_along_its_predecessor():
    old, none, *_ = _two_refreshes("none")
    old_s, sign, *_ = _two_refreshes("sign")
    torch.testing.assert_close(old_s, old)
    dots_none, dots_sign = (old * none).sum(0), (old * sign).sum(0)
    assert (dots_sign >= 0).all()
    # the same columns, only signs differ
    torch.testing.assert_close(sign, none * torch.where(dots_none < 0, -1.0, 1.0))


def test_rotation_alignment_keeps_the_subspace_and_is_nearest_to_the_old_basis():
    old, none, *_ = _two_refreshes("none")
    _, rot, *_ = _two_refreshes("rotation")
    torch.testing.assert_close(rot @ rot.T, none @ none.T, atol=1e-5, rtol=0)  # same subspace
    torch.testing.assert_close(rot.T @ rot, torch.eye(5), atol=1e-5, rtol=0)  # orthonormal
    cross = rot.T @ old  # symmetric positive semi-definite at the Procrustes optimum
    torch.testing.assert_close(cross, cross.T, atol=1e-5, rtol=0)
    assert float(torch.linalg.eigvalsh((cross + cross.T) / 2).min()) > -1e-5
    assert (rot - old).norm() <= (align_basis(old, none, "sign") - old).norm() + 1e-6
    assert (rot - old).norm() <= (none - old).norm() + 1e-6


def test_alignment_is_free_when_moments_are_carried():
    """With restore_state the moments rotate with the basis: a sign flip of a column flips its
    first-moment column too, so the restored update is the same for every alignment."""
    _, _, opt_none, w_none = _two_refreshes("none", restore_state=True)
    _, _, opt_sign, w_sign = _two_refreshes("sign", restore_state=True)
    torch.testing.assert_close(w_sign.detach(), w_none.detach(), rtol=1e-5, atol=1e-6)
    # a rotation within the subspace is not: the second moment is carried by the squared rotation
    _, _, _, w_rot = _two_refreshes("rotation", restore_state=True)
    assert _rel(w_rot.detach(), w_none.detach()) > 1e-4


def test_relative_correlation_loss_takes_the_same_step_at_every_gradient_scale():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(60, 24, generator=g)
    p, _ = torch.linalg.qr(torch.randn(24, 6, generator=g))
    m = torch.randn(60, 6, generator=g)
    steps = {}
    for loss in ("paper", "relative"):
        for scale in (1.0, 1e-3):
            hs, ms = h * scale, m * scale
            new, _ = correlation_step(hs, p, hs @ p, ms, loss=loss)
            steps[loss, scale] = (new - p).norm()
    torch.testing.assert_close(steps["relative", 1e-3], steps["relative", 1.0], rtol=1e-4, atol=0)
    assert steps["relative", 1.0] > 1e-3
    # the paper's loss: the step shrinks with the square of the scale (1e-6), far below fp32's
    # resolution of P's entries at 1e-3
    assert steps["paper", 1e-3] < 1e-5 * steps["paper", 1.0]


def test_relative_correlation_gradient_matches_autograd():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(30, 12, generator=g, dtype=torch.float64) * 1e-2
    p0, _ = torch.linalg.qr(torch.randn(12, 4, generator=g, dtype=torch.float64))
    m = torch.randn(30, 4, generator=g, dtype=torch.float64) * 1e-2
    p = p0.clone().requires_grad_(True)
    loss = correlation_loss(h, p, m) * h.numel() / h.square().sum()
    (auto,) = torch.autograd.grad(loss, p)
    closed = correlation_grad(h, p0, h @ p0, m, "relative").grad
    assert _rel(closed, auto) < 1e-8


@pytest.mark.parametrize("cls", [CoapAdamW, CoapAdafactor])
def test_relative_loss_moves_the_projector_at_small_gradient_scales(cls):
    """At gradient RMS 1e-3 the paper's correlation update leaves P where it was (below fp32
    resolution); the relative one moves it as it would at RMS 1."""
    shape = (48, 20)
    moved = {}
    for loss in ("paper", "relative"):
        w = nn.Parameter(torch.zeros(shape))
        opt = cls([w], rank=4, update_interval=1000, correlation_loss=loss, lr=1e-3)
        w.grad = _grad(shape, 0) * 1e-3
        opt.step()
        for step in (1, 2):  # the first moment needs a step to point somewhere
            before = opt.state[w]["proj"].clone()
            w.grad = _grad(shape, step) * 1e-3
            if step == 2:
                opt.request_refresh("correlation")
            opt.step()
        moved[loss] = float((opt.state[w]["proj"] - before).norm())
    assert moved["relative"] > 1e-3
    assert moved["paper"] < 1e-6


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"basis_alignment": "flip"}, r"Invalid basis_alignment: 'flip' \(expected 'none', 'sign' or 'rotation'\)"),
        ({"correlation_loss": "mse"}, r"Invalid correlation_loss: 'mse' \(expected 'paper' or 'relative'\)"),
    ],
)
def test_bad_refresh_settings_are_refused_by_name(kwargs, message):
    for cls in (CoapAdamW, CoapAdafactor):
        with pytest.raises(ValueError, match=message):
            cls([nn.Parameter(torch.randn(8, 8))], **kwargs)
    with pytest.raises(ValueError, match=message):
        CoapSettings(**kwargs)


def test_refresh_settings_ride_in_param_groups_and_older_states_load():
    w = nn.Parameter(torch.randn(24, 12))
    opt = CoapAdamW([w], rank=3, basis_alignment="sign", correlation_loss="relative")
    assert opt.param_groups[0]["basis_alignment"] == "sign"
    assert CoapSettings(basis_alignment="rotation", correlation_loss="relative").coap_kwargs()["basis_alignment"] == (
        "rotation"
    )
    w.grad = _grad((24, 12), 0)
    opt.step()
    sd = opt.state_dict()
    for group in sd["param_groups"]:  # as saved before these settings existed
        del group["basis_alignment"], group["correlation_loss"]
    fresh = CoapAdamW([w], rank=3)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["basis_alignment"] == fresh.defaults["basis_alignment"]
    assert fresh.param_groups[0]["correlation_loss"] == fresh.defaults["correlation_loss"]
    w.grad = _grad((24, 12), 1)
    fresh.request_refresh("correlation")
    fresh.step()
