"""The projected update's size (``update_scale``) and the gradient outside the subspace (``residual``)."""

import math

import pytest
import torch
from torch import nn

from coap_plugins import CoapAdafactor, CoapAdamW
from coap_plugins.projection import MatrixProjector, Tucker2Projector
from coap_plugins.settings import CoapSettings

SHAPES = {"tall": (40, 24), "wide": (12, 30), "conv": (32, 16, 3, 3), "conv1x1": (32, 8, 1, 1), "bias": (16,)}


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: nn.Parameter(torch.randn(s, generator=g)) for k, s in SHAPES.items()}


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params.values():
        p.grad = (p.detach() - 1) + 0.5 * torch.randn(p.shape, generator=g)


def _back(proj, core, state):
    """The projector's back-projection of ``core`` in the weight's shape."""
    out = torch.zeros(proj.shape, dtype=core.dtype)
    proj.apply_update(out, core, state, 1.0)
    return out


def _opt(cls, params, **kw):
    if cls is CoapAdafactor:
        kw = {"lr": 1e-2, "scale_parameter": False, "relative_step": False, **kw}
    else:
        kw = {"lr": 1e-2, **kw}
    return cls(list(params.values()), weight_decay=0.0, min_conv_numel=0, update_interval=3, reproject_factor=2, **kw)


def _deltas(cls, steps, **kw):
    """The weights' change on the last of ``steps`` steps (every earlier step identical)."""
    params = _params()
    opt = _opt(cls, params, **kw)
    for step in range(steps - 1):
        _grads(params, step)
        opt.step()
    before = {k: p.detach().clone() for k, p in params.items()}
    _grads(params, steps - 1)
    opt.step()
    return {k: p.detach() - before[k] for k, p in params.items()}, opt, params


def test_size_ratio_is_how_many_times_the_projected_modes_shrink():
    assert MatrixProjector((40, 24), 6).size_ratio == pytest.approx(4.0)
    assert MatrixProjector((12, 30), 3).size_ratio == pytest.approx(4.0)
    assert MatrixProjector((64, 64), 10).size_ratio == pytest.approx(6.4)
    assert Tucker2Projector((32, 16, 3, 3), 16, 8).size_ratio == pytest.approx(4.0)
    assert Tucker2Projector((32, 16, 3, 3), 8, 8).size_ratio == pytest.approx(8.0)
    assert Tucker2Projector((32, 8, 1, 1), 8, None).size_ratio == pytest.approx(4.0)


@pytest.mark.parametrize("cls", [CoapAdamW, CoapAdafactor])
@pytest.mark.parametrize("scale", [0.5, 3.0, "auto"])
def test_update_scale_multiplies_projected_updates_only(cls, scale):
    """On the set-up step every update is the first one, so the scaled run's change of each
    projected weight is the unscaled one times the scale; full-rank tensors are untouched."""
    ref, opt, _ = _deltas(cls, 1, update_scale=1.0, residual="none")
    got, _, _ = _deltas(cls, 1, update_scale=scale, residual="none")
    for row in opt.routing():
        name = list(SHAPES)[row["index"]]
        factor = 1.0 if row["projector"] is None else (row["projector"].size_ratio if scale == "auto" else scale)
        torch.testing.assert_close(got[name], ref[name] * factor, rtol=1e-4, atol=1e-6)  # fp32 weights ~1


@pytest.mark.parametrize("cls", [CoapAdamW, CoapAdafactor])
def test_update_scale_with_a_tensor_lr_matches_a_float_lr(cls):
    floats, _, _ = _deltas(cls, 4, update_scale=3.0, residual="scaled")
    params = _params()
    opt = _opt(cls, params, update_scale=3.0, residual="scaled")
    for group in opt.param_groups:
        group["lr"] = torch.tensor(group["lr"])
    for step in range(3):
        _grads(params, step)
        opt.step()
    before = {k: p.detach().clone() for k, p in params.items()}
    _grads(params, 3)
    opt.step()
    for k, p in params.items():
        torch.testing.assert_close(p.detach() - before[k], floats[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [CoapAdamW, CoapAdafactor])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_scaled_residual_adds_the_gradient_outside_the_subspace_at_the_projected_step_size(cls, scale):
    """Residual = delta(scaled) - delta(none) on the same step from the same state (the set-up
    step): it lies outside the subspace, along -(G - back(G P)), with the norm
    ``step size * |update| / |core| * |G - back(G P)|``; the move inside the subspace is the one
    without it."""
    none, opt, params = _deltas(cls, 1, update_scale=scale, residual="none")
    with_res, _, _ = _deltas(cls, 1, update_scale=scale, residual="scaled")
    first = _params()
    _grads(first, 0)  # the gradients that step saw
    step_size = 1e-2 / (1 - 0.9) if cls is CoapAdamW else 1e-2  # AdamW divides by bias_correction1
    for row in opt.routing():
        name = list(SHAPES)[row["index"]]
        proj = row["projector"]
        if proj is None:
            torch.testing.assert_close(with_res[name], none[name], rtol=0, atol=0)
            continue
        state = opt.state[params[name]]
        g = first[name].grad
        core, _ = proj.project(state, g)
        rest = g - _back(proj, core, state)
        extra = with_res[name] - none[name]
        if float(rest.norm()) < 1e-5 * float(g.norm()):  # conv1x1: rank_out = I, nothing outside
            assert float(extra.abs().max()) < 1e-6, name
            continue
        cos = float((extra * -rest).sum() / (extra.norm() * rest.norm()))
        assert cos > 1 - 1e-4, (name, cos)
        assert float(proj.project(state, extra)[0].norm() / extra.norm()) < 1e-3
        back = _back(proj, proj.project(state, with_res[name])[0], state)
        torch.testing.assert_close(back, none[name], rtol=1e-3, atol=1e-6)
        # phi = |update| / |core|; the move inside the subspace is step size * scale * update
        update_norm = float(proj.project(state, none[name])[0].norm()) / (step_size * scale)
        phi = update_norm / float(core.norm())
        assert float(extra.norm()) == pytest.approx(step_size * phi * float(rest.norm()), rel=1e-3)


def test_residual_of_a_gradient_inside_the_subspace_is_nothing():
    g = torch.Generator().manual_seed(3)
    w = nn.Parameter(torch.randn(40, 24, generator=g))
    twin = nn.Parameter(w.detach().clone())
    opts = [CoapAdamW([p], lr=1e-2, rank=6, residual=r) for p, r in ((w, "none"), (twin, "scaled"))]
    # a rank-6 first gradient: the projector set up from it spans its rows
    w.grad = torch.randn(40, 6, generator=g) @ torch.randn(6, 24, generator=g)
    twin.grad = w.grad.clone()
    for opt in opts:
        opt.step()
    proj = opts[0].state[w]["proj"]
    w.grad = torch.randn(40, 6, generator=g) @ proj.T  # in the span of P
    twin.grad = w.grad.clone()
    for opt in opts:
        opt.step()
    assert float((twin - w).abs().max()) < 1e-5
    assert float((w.detach() - twin.detach()).abs().max()) < 1e-5


@pytest.mark.parametrize("cls", [CoapAdamW, CoapAdafactor])
def test_neither_option_adds_state(cls):
    _, plain, _ = _deltas(cls, 4)
    _, both, _ = _deltas(cls, 4, update_scale="auto", residual="scaled")

    def shapes(opt):
        return [{k: tuple(v.shape) for k, v in s.items() if isinstance(v, torch.Tensor)} for s in opt.state.values()]

    assert shapes(both) == shapes(plain)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(update_scale=0), r"Invalid update_scale: 0 \(must be 'auto' or a finite number > 0\)"),
        (dict(update_scale=float("inf")), r"Invalid update_scale: inf"),
        (dict(update_scale="big"), r"Invalid update_scale: 'big'"),
        (dict(update_scale=True), r"Invalid update_scale: True"),
        (dict(residual="full"), r"Invalid residual: 'full' \(expected 'none' or 'scaled'\)"),
    ],
)
def test_bad_values_are_refused_before_any_step(kwargs, message):
    for cls in (CoapAdamW, CoapAdafactor):
        with pytest.raises(ValueError, match=message):
            cls([nn.Parameter(torch.randn(8, 8))], **kwargs)
    with pytest.raises(ValueError, match=message):
        CoapSettings(**kwargs)


def test_settings_pass_both_options_to_the_optimizer():
    kw = CoapSettings(update_scale="auto", residual="scaled").coap_kwargs()
    assert (kw["update_scale"], kw["residual"]) == ("auto", "scaled")
    opt = CoapAdamW([nn.Parameter(torch.randn(8, 8))], **kw)
    assert (opt.param_groups[0]["update_scale"], opt.param_groups[0]["residual"]) == ("auto", "scaled")


@pytest.mark.parametrize("cls", [CoapAdamW, CoapAdafactor])
def test_bf16_weights_take_the_scaled_residual_like_fp32_ones(cls):
    """The residual's elementwise pass runs on the weight in its own dtype: from the same start,
    a bf16 weight moves as the fp32 run's does, up to bf16 rounding of weights and gradients."""
    start = {k: p.detach().to(torch.bfloat16) for k, p in _params().items()}
    low = {k: nn.Parameter(v.clone()) for k, v in start.items()}
    full = {k: nn.Parameter(v.float()) for k, v in start.items()}
    # steps well above bf16's resolution of weights near 1 (2^-8)
    opts = [_opt(cls, low, lr=0.1), _opt(cls, full, lr=0.1)]
    for step in range(3):
        _grads(full, step)
        for k, p in low.items():
            p.grad = full[k].grad.to(torch.bfloat16)
        for opt in opts:
            opt.step()
    projected = [list(SHAPES)[r["index"]] for r in opts[1].routing() if r["projector"] is not None]
    assert len(projected) == 4
    for k in projected:
        p = low[k]
        assert p.dtype == torch.bfloat16
        moved, ref = p.detach().float() - start[k].float(), full[k].detach() - start[k].float()
        cos = float((moved * ref).sum() / (moved.norm() * ref.norm()))
        assert cos > 0.9 and 0.8 < float(moved.norm() / ref.norm()) < 1.25, (k, cos)


def test_a_gradient_outside_the_subspace_cannot_blow_the_residual_up():
    """|G P| near 0 with a momentum-sized update: phi's denominator is floored at 0.1 |G|, so the
    residual step stays within 10x the projected update's norm instead of |U| |G| / |G P|."""
    g = torch.Generator().manual_seed(4)
    w = nn.Parameter(torch.randn(40, 24, generator=g))
    opt = CoapAdamW([w], lr=1e-2, rank=6, weight_decay=0.0, update_scale=1.0)
    w.grad = torch.randn(40, 6, generator=g) @ torch.randn(6, 24, generator=g)
    opt.step()
    proj = opt.state[w]["proj"]
    h = torch.randn(40, 24, generator=g)
    w.grad = h - (h @ proj) @ proj.T  # orthogonal to span(P): |G P| is rounding
    before = w.detach().clone()
    opt.step()
    moved = float((w.detach() - before).norm())
    assert math.isfinite(moved) and 0 < moved
    state = opt.state[w]
    update = state["exp_avg"] / (state["exp_avg_sq"].sqrt() / (1 - 0.999**2) ** 0.5 + 1e-8)
    # step size lr / bias_correction1, times (projected part + at most 10x it for the residual)
    bound = 1e-2 / (1 - 0.9**2) * (1 + 10) * float(update.norm())
    assert moved <= bound * 1.01, (moved, bound)
