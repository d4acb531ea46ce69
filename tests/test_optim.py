import math

import pytest
import torch
from torch import nn

from coap_plugins import CoapAdafactor, CoapAdamW, CoapPolicy

OPTIMIZERS = [CoapAdamW, CoapAdafactor]

# Shapes covering every route: a tall and a wide matrix, a Tucker-2 conv, a 1x1 conv whose
# output rank (32 // 2 = 16) exceeds its 8 input channels (capped at 8), and full-rank tensors.
SHAPES = {
    "tall": (40, 24),
    "wide": (12, 30),
    "conv": (32, 16, 3, 3),
    "conv1x1": (32, 8, 1, 1),
    "bias": (16,),
    "small_conv": (4, 2, 3, 3),
}


def make_params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {k: nn.Parameter(torch.randn(s, generator=g).to(dtype)) for k, s in SHAPES.items()}


def set_grads(params, step, seed=100):
    """Deterministic gradients that change every step: a pull towards a target plus noise."""
    g = torch.Generator().manual_seed(seed + step)
    for k, p in params.items():
        target = torch.ones_like(p, dtype=torch.float32)
        noise = torch.randn(p.shape, generator=g)
        p.grad = ((p.detach().float() - target) + 0.5 * noise).to(p.dtype)


def make_opt(cls, params, **kw):
    kw.setdefault("min_conv_numel", 0)
    if cls is CoapAdamW:
        kw.setdefault("lr", 1e-2)
    groups = [
        {"params": [params[k] for k in SHAPES if k != "small_conv"]},
        {"params": [params["small_conv"]], "projection": "none"},
    ]
    return cls(groups, update_interval=2, reproject_factor=2, **kw)


def run(opt, params, start, stop):
    for step in range(start, stop):
        set_grads(params, step)
        opt.step()


def test_routing_of_the_test_shapes():
    params = make_params()
    opt = make_opt(CoapAdamW, params)
    kinds = {tuple(r["shape"]): (r["projector"].kind if r["projector"] else "none") for r in opt.routing()}
    assert kinds[(40, 24)] == "matrix" and kinds[(12, 30)] == "matrix"
    assert kinds[(32, 16, 3, 3)] == "tucker2" and kinds[(32, 8, 1, 1)] == "tucker2"
    assert kinds[(16,)] == "none" and kinds[(4, 2, 3, 3)] == "none"
    one_by_one = [r["projector"] for r in opt.routing() if r["shape"] == (32, 8, 1, 1)][0]
    assert (one_by_one.rank_out, one_by_one.rank_in) == (8, None)


RESUME_SETTINGS = [
    {"restore_state": False},
    {"restore_state": True},
    {"restore_state": True, "basis_alignment": "rotation", "correlation_loss": "relative"},
    {"basis_alignment": "sign", "correlation_loss": "relative"},
    {"update_scale": 1.0, "residual": "none"},
    {"update_scale": "auto", "residual": "scaled", "restore_state": True},
]


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("settings", RESUME_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_exact_resume_across_refreshes(cls, settings, tmp_path):
    ref = make_params()
    opt = make_opt(cls, ref, **settings)
    run(opt, ref, 0, 9)  # set-up at 1, correlation at 3, 7 and SVD at 5, 9 (per-layer steps 2, 4, 6, 8)

    resumed = make_params()
    opt1 = make_opt(cls, resumed, **settings)
    run(opt1, resumed, 0, 4)
    path = tmp_path / "opt.pt"
    torch.save({"opt": opt1.state_dict(), "params": {k: v.detach().clone() for k, v in resumed.items()}}, path)

    ckpt = torch.load(path, weights_only=True)
    fresh = {k: nn.Parameter(v) for k, v in ckpt["params"].items()}
    opt2 = make_opt(cls, fresh, **settings)
    opt2.load_state_dict(ckpt["opt"])
    run(opt2, fresh, 4, 9)
    for k in SHAPES:
        assert torch.equal(fresh[k], ref[k]), k
    # the projectors are really in the checkpoint and moved after the save
    conv_state = opt2.state[fresh["conv"]]
    assert not torch.equal(conv_state["proj_out"], ckpt["opt"]["state"][2]["proj_out"])


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_two_runs_are_identical(cls):
    a, b = make_params(), make_params()
    run(make_opt(cls, a), a, 0, 7)
    run(make_opt(cls, b), b, 0, 7)
    for k in SHAPES:
        assert torch.equal(a[k], b[k]), k


def test_layers_get_distinct_reproducible_random_starts(monkeypatch):
    """Each layer's sketch has its own seed, fixed by its position (same on every rank and rerun)."""
    import coap_plugins.projection.matrix as matrix_mod

    seen = []
    original = matrix_mod.random_orthonormal

    def recording(n, r, seed, **kw):
        seen.append(seed)
        return original(n, r, seed, **kw)

    monkeypatch.setattr(matrix_mod, "random_orthonormal", recording)
    for _ in range(2):
        params = make_params()
        run(make_opt(CoapAdamW, params), params, 0, 1)
    first, second = seen[: len(seen) // 2], seen[len(seen) // 2 :]
    assert first == second  # reruns draw the same starts
    assert len(set(first)) == len(first) == 5  # tall, wide, conv (two modes), 1x1: all distinct


@pytest.mark.parametrize("dims", [(64, 48), (48, 64)])
def test_state_bytes_matrix_formula(dims):
    p = nn.Parameter(torch.randn(dims))
    opt = CoapAdamW([p], rank=8)
    p.grad = torch.randn(dims)
    opt.step()
    m, n = dims
    assert opt.state_bytes(p) == 4 * (2 * max(m, n) * 8 + min(m, n) * 8)
    assert opt.full_rank_state_bytes() == 2 * m * n * 4


@pytest.mark.parametrize(
    "shape,ranks",
    [((64, 32, 3, 3), (32, 16)), ((128, 32, 1, 1), (32, None)), ((64, 64, 3, 3), (32, 32))],
)
def test_state_bytes_tucker_formula(shape, ranks):
    p = nn.Parameter(torch.randn(shape))
    opt = CoapAdamW([p], rank_ratio_conv=4, min_conv_numel=0)
    p.grad = torch.randn(shape)
    opt.step()
    o, i, k1, k2 = shape
    r_o, r_i = ranks
    k = k1 * k2
    core = r_o * k * (r_i if r_i is not None else i)
    factors = o * r_o + (i * r_i if r_i is not None else 0)
    assert opt.state_bytes(p) == 4 * (2 * core + factors)


def test_adafactor_state_bytes_formula():
    p = nn.Parameter(torch.randn(96, 40))
    opt = CoapAdafactor([p], rank=10)
    p.grad = torch.randn(96, 40)
    opt.step()
    # P (40 x 10), first moment (96 x 10), factored second moment (96 + 10)
    assert opt.state_bytes(p) == 4 * (40 * 10 + 96 * 10 + 96 + 10)


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 5))


def test_projection_off_equals_torch_adamw_exactly():
    a, b = _mlp(0), _mlp(0)
    kw = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    ref = torch.optim.AdamW(a.parameters(), **kw)
    opt = CoapAdamW([{"params": list(b.parameters()), "projection": "none"}], **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        for model, o in ((a, ref), (b, opt)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_full_rank_adafactor_matches_transformers():
    transformers = pytest.importorskip("transformers.optimization")
    a, b = _mlp(1), _mlp(1)
    ref = transformers.Adafactor(
        a.parameters(), lr=None, beta1=None, relative_step=True, scale_parameter=True, warmup_init=False
    )
    opt = CoapAdafactor([{"params": list(b.parameters()), "projection": "none"}], beta1=None)
    g = torch.Generator().manual_seed(1)
    for _ in range(15):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
        for model, o in ((a, ref), (b, opt)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


BAD_ARGS = [
    (CoapAdamW, {"lr": -1.0}, r"Invalid learning rate: -1.0"),
    (CoapAdamW, {"betas": (1.0, 0.999)}, r"Invalid beta parameter at index 0: 1.0 \(must be in \[0, 1\)\)"),
    (CoapAdamW, {"betas": (0.9, -0.1)}, r"Invalid beta parameter at index 1: -0.1"),
    (CoapAdamW, {"eps": -1e-8}, r"Invalid epsilon value: -1e-08"),
    (CoapAdamW, {"weight_decay": -0.1}, r"Invalid weight_decay value: -0.1"),
    (CoapAdamW, {"rank": 0}, r"Invalid rank: 0 \(must be an integer >= 1, or None\)"),
    (CoapAdamW, {"rank": 2.5}, r"Invalid rank: 2.5"),
    (
        CoapAdamW,
        {"rank_ratio_matrix": 0.5},
        r"Invalid rank_ratio_matrix: 0.5 \(must be a finite number >= 1, or None\)",
    ),
    (CoapAdamW, {"rank_ratio_conv": 0}, r"Invalid rank_ratio_conv: 0"),
    (CoapAdamW, {"update_interval": 0}, r"Invalid update_interval: 0 \(must be an integer >= 1\)"),
    (CoapAdamW, {"reproject_factor": 0}, r"Invalid reproject_factor: 0 \(must be an integer >= 1\)"),
    (CoapAdamW, {"min_conv_numel": -1}, r"Invalid min_conv_numel: -1"),
    (CoapAdamW, {"restore_state": "yes"}, r"Invalid restore_state: 'yes'"),
    (CoapAdafactor, {"lr": -1.0}, r"Invalid learning rate: -1.0"),
    (CoapAdafactor, {"lr": 1e-3, "relative_step": True}, r"cannot be combined with relative_step=True"),
    (CoapAdafactor, {"beta1": 1.5}, r"Invalid beta1: 1.5 \(must be in \[0, 1\), or None\)"),
    (CoapAdafactor, {"decay_rate": 0.5}, r"Invalid decay_rate: 0.5"),
    (CoapAdafactor, {"clip_threshold": 0.0}, r"Invalid clip_threshold: 0.0"),
    (CoapAdafactor, {"eps": (-1.0, 1e-3)}, r"Invalid epsilon value"),
    (CoapAdafactor, {"update_interval": -3}, r"Invalid update_interval: -3"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD_ARGS)
def test_bad_arguments_name_the_argument(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls([nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_bad_group_projection_and_overrides():
    p, q = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match=r"Invalid projection kind: 'lowrank'"):
        CoapAdamW([{"params": [p], "projection": "lowrank"}])
    with pytest.raises(ValueError, match=r"a list of 1 kinds for a group of 2 parameters"):
        CoapAdamW([{"params": [p, q], "projection": ["matrix"]}])
    opt = CoapAdamW([p])
    with pytest.raises(ValueError, match=r"Invalid rank: -2"):
        opt.add_param_group({"params": [q], "rank": -2})
    assert len(opt.param_groups) == 1


def test_sparse_and_complex_gradients_raise():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = CoapAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    c = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    c.grad = torch.randn(4, 4, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="does not support complex parameters"):
        CoapAdamW([c]).step()


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_bf16_parameters_train_with_fp32_projection(cls, tmp_path):
    params = make_params(dtype=torch.bfloat16)
    opt = make_opt(cls, params)
    start = {k: v.detach().clone() for k, v in params.items()}
    run(opt, params, 0, 6)
    for k, p in params.items():
        assert p.dtype == torch.bfloat16 and not torch.equal(p, start[k]), k
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                assert v.dtype == torch.float32
    # load_state_dict keeps them fp32 (torch would cast to the parameters' bf16)
    path = tmp_path / "bf16.pt"
    torch.save(opt.state_dict(), path)
    opt2 = make_opt(cls, params)
    opt2.load_state_dict(torch.load(path, weights_only=True))
    for p in params.values():
        for key, v in opt2.state[p].items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == torch.float32 and torch.equal(v, opt.state[p][key])


def test_closure_grad_none_frozen_and_add_param_group():
    model = _mlp(2)
    frozen = nn.Parameter(torch.randn(16, 16), requires_grad=False)
    unused = nn.Parameter(torch.randn(16, 16))
    opt = CoapAdamW(list(model.parameters()) + [frozen], lr=1e-2, rank=4)
    opt.add_param_group({"params": [unused], "lr": 0.5})
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    before = nn.functional.cross_entropy(model(x), y).item()
    frozen0, unused0 = frozen.detach().clone(), unused.detach().clone()
    for _ in range(20):
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() < before
    assert torch.equal(frozen, frozen0) and torch.equal(unused, unused0)
    assert frozen not in opt.state and unused not in opt.state
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.5


def test_lr_scheduler_changes_take_effect():
    p = nn.Parameter(torch.randn(16, 16))
    opt = CoapAdamW([p], lr=1.0, weight_decay=0.0, rank=4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    p.grad = torch.randn(16, 16)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    frozen_at = p.detach().clone()
    p.grad = torch.randn(16, 16)
    opt.step()
    assert torch.equal(p, frozen_at)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_non_finite_gradient_never_reaches_the_projectors(cls):
    params = make_params()
    opt = make_opt(cls, params)
    run(opt, params, 0, 1)  # set-up; the next step (the layers' step 2) is a correlation refresh
    projected = [p for p in params.values() if any(k.startswith("proj") for k in opt.state[p])]
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items() if k.startswith("proj")} for p in projected}
    set_grads(params, 2)
    for p in projected:
        p.grad[0].fill_(float("nan"))
        p.grad.view(-1)[-1] = float("inf")
    opt.step()
    for p in projected:
        for k, v in opt.state[p].items():
            if k.startswith("proj"):
                assert torch.isfinite(v).all()
                assert torch.equal(v, before[id(p)][k])  # the refresh was skipped
    report = opt.coap_report()
    assert all(
        layer["last_refresh"] == "skipped (non-finite)" for layer in report["layers"] if layer["projector"] != "none"
    )
    if cls is CoapAdamW:  # the moments carry the NaN on, as torch.optim.AdamW's would
        assert torch.isnan(opt.state[params["tall"]]["exp_avg"]).any()


def test_zero_gradient_waits_for_set_up_and_only_decays():
    p = nn.Parameter(torch.ones(32, 32))
    opt = CoapAdamW([p], lr=0.1, weight_decay=0.5, rank=4)
    p.grad = torch.zeros(32, 32)
    opt.step()
    # no projector built from an all-zero gradient: zeros of the final shapes, step 0 (so that a
    # distributed checkpoint's template, built from one step on zero gradients, holds the layer)
    state = opt.state[p]
    assert state["step"] == 0 and {k: tuple(v.shape) for k, v in state.items() if k != "step"} == {
        "proj": (32, 4),
        "exp_avg": (32, 4),
        "exp_avg_sq": (32, 4),
    }
    assert all(not v.any() for k, v in state.items() if k != "step")
    assert torch.allclose(p, torch.full((32, 32), 1 - 0.1 * 0.5))
    assert opt.waiting_parameters() == ["group0.param0"]
    assert opt.coap_report()["waiting"] == ["group0.param0"]
    p.grad = torch.randn(32, 32)
    opt.step()
    assert opt.state[p]["proj"].shape == (32, 4) and opt.state[p]["step"] == 1
    assert opt.waiting_parameters() == []


def test_schedule_drives_refreshes_and_external_driver_overrides():
    p = nn.Parameter(torch.randn(24, 24))
    opt = CoapAdamW([p], rank=4, update_interval=3, reproject_factor=2)
    seen = []
    for step in range(1, 8):
        p.grad = torch.randn(24, 24)
        before = opt.state[p]["proj"].clone() if opt.state[p] else None
        opt.step()
        if before is not None and not torch.equal(before, opt.state[p]["proj"]):
            seen.append((step, opt._telemetry[p]["refresh"]))
    assert seen == [(3, "correlation"), (6, "svd")]

    opt.drive_refreshes_externally()
    before = opt.state[p]["proj"].clone()
    for _ in range(6):  # steps 8..13 would contain own refreshes at 9 and 12
        p.grad = torch.randn(24, 24)
        opt.step()
    assert torch.equal(before, opt.state[p]["proj"])
    opt.request_refresh("svd")
    p.grad = torch.randn(24, 24)
    opt.step()
    assert not torch.equal(before, opt.state[p]["proj"])
    assert opt.param_groups[0]["pending_refresh"] == "none"
    with pytest.raises(ValueError, match=r"Invalid refresh kind: 'full'"):
        opt.request_refresh("full")


def test_projector_is_orthonormal_after_recalibration():
    p = nn.Parameter(torch.randn(50, 30))
    opt = CoapAdamW([p], rank=6, update_interval=1, reproject_factor=1)
    for _ in range(3):
        p.grad = torch.randn(50, 30)
        opt.step()
        q = opt.state[p]["proj"]
        assert torch.allclose(q.T @ q, torch.eye(6), atol=1e-5)


def test_load_refuses_state_that_does_not_fit():
    params = make_params()
    opt = make_opt(CoapAdamW, params)
    run(opt, params, 0, 2)
    sd = opt.state_dict()
    other = make_opt(CoapAdamW, make_params(), rank_ratio_conv=16)
    with pytest.raises(
        ValueError, match=r"param group 0 was saved with rank_ratio_conv=None but this optimizer has rank_ratio_conv=16"
    ):
        other.load_state_dict(sd)
    # same settings, tampered shape: the error names the tensor and both shapes
    sd["state"][2]["proj_out"] = torch.zeros(32, 4)
    with pytest.raises(
        ValueError, match=r"parameter 2 \(shape \(32, 16, 3, 3\)\): proj_out: saved \(32, 4\), expected \(32, 16\)"
    ):
        make_opt(CoapAdamW, make_params()).load_state_dict(sd)
    # a full-rank state offered to a projected layer
    sd2 = opt.state_dict()
    sd2["state"][0] = {"step": 1, "exp_avg": torch.zeros(40, 24), "exp_avg_sq": torch.zeros(40, 24)}
    with pytest.raises(ValueError, match=r"missing \['proj'\]"):
        make_opt(CoapAdamW, make_params()).load_state_dict(sd2)


def test_state_dict_holds_only_tensors_and_plain_values():
    params = make_params()
    opt = make_opt(CoapAdafactor, params)
    run(opt, params, 0, 3)
    for state in opt.state_dict()["state"].values():
        for v in state.values():
            assert isinstance(v, (torch.Tensor, int, float))


def test_named_parameters_and_telemetry_report():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    opt = CoapAdamW(model.named_parameters(), rank=8, update_interval=1)
    x = torch.randn(32, 64)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    report = opt.coap_report()
    by_name = {layer["name"]: layer for layer in report["layers"]}
    assert by_name["0.weight"]["projector"] == "matrix" and by_name["0.bias"]["projector"] == "none"
    assert by_name["0.weight"]["last_refresh"] == "correlation"
    assert 0.0 <= by_name["0.weight"]["recon_error"] <= 1.0 and -1.0 <= by_name["0.weight"]["cos"] <= 1.0
    assert report["state_bytes"] == sum(layer["state_bytes"] for layer in report["layers"])
    assert report["full_rank_bytes"] == sum(2 * 4 * p.numel() for p in model.parameters())
    assert report["state_ratio"] < 1.0


def test_policy_groups_drive_the_optimizer():
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.LazyLinear(10))
    model(torch.randn(1, 3, 12, 12))
    policy = CoapPolicy(exclude=["4"])
    opt = CoapAdamW(policy.param_groups(model), lr=1e-3)
    kinds = {r["name"]: (r["projector"].kind if r["projector"] else "none") for r in opt.routing()}
    assert kinds == {
        "0.weight": "none",
        "0.bias": "none",
        "2.weight": "tucker2",
        "2.bias": "none",
        "4.weight": "none",
        "4.bias": "none",
    }
    model(torch.randn(2, 3, 12, 12)).sum().backward()
    opt.step()
    assert set(opt.state[model[2].weight]) == {"step", "proj_out", "proj_in", "exp_avg", "exp_avg_sq"}
    assert math.isclose(opt.coap_report()["state_ratio"], opt.state_bytes() / opt.full_rank_state_bytes())


def test_adafactor_without_first_moment_refreshes_with_the_projected_gradient():
    params = make_params()
    opt = make_opt(CoapAdafactor, params, beta1=None)
    start = {k: v.detach().clone() for k, v in params.items()}
    run(opt, params, 0, 6)  # set-up, correlation and SVD refreshes
    for k, p in params.items():
        assert torch.isfinite(p).all() and not torch.equal(p, start[k]), k
    conv = opt.state[params["conv"]]
    assert "exp_avg" not in conv and set(conv) == {"step", "proj_out", "proj_in", "exp_avg_sq_row", "exp_avg_sq_col"}
    refreshed = {layer["name"]: layer for layer in opt.coap_report()["layers"]}
    assert refreshed["group0.param2"]["last_refresh"] in ("correlation", "svd")
    assert 0.0 < refreshed["group0.param2"]["cos"] <= 1.0  # direction term of G P against G


def test_state_saved_without_newer_group_keys_still_loads():
    params = make_params()
    opt = make_opt(CoapAdamW, params)
    run(opt, params, 0, 2)
    sd = opt.state_dict()
    for group in sd["param_groups"]:
        del group["schedule"], group["pending_refresh"], group["seed"]
    opt2 = make_opt(CoapAdamW, params)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["schedule"] == "optimizer" and opt2.param_groups[0]["pending_refresh"] == "none"
    run(opt2, params, 2, 4)  # and it steps


def test_optimizer_pickled_before_the_refresh_settings_keeps_stepping():
    """A whole optimizer pickled by a version without the refresh and update settings (neither
    in its ``defaults`` nor in its groups) unpickles with the behaviour it had."""
    import pickle

    later = ("basis_alignment", "correlation_loss", "update_scale", "residual")
    behaviour_then = dict(basis_alignment="none", correlation_loss="paper", update_scale=1.0, residual="none")
    params = make_params()
    opt = make_opt(CoapAdamW, params, **behaviour_then)
    run(opt, params, 0, 2)
    state = opt.__getstate__()
    for key in later:
        del state["defaults"][key]
        for group in state["param_groups"]:
            del group[key]
    state["_owned_keys"] = tuple(k for k in state["_owned_keys"] if k not in later)
    old = CoapAdamW.__new__(CoapAdamW)
    old.__setstate__(state)
    copy = pickle.loads(pickle.dumps(old))
    assert {k: copy.defaults[k] for k in later} == behaviour_then
    assert all({k: g[k] for k in later} == behaviour_then for g in copy.param_groups)
    twin = make_params()
    twin_opt = make_opt(CoapAdamW, twin, **behaviour_then)
    run(twin_opt, twin, 0, 2)
    names = [k for k in SHAPES if k != "small_conv"] + ["small_conv"]  # make_opt's order
    copied = dict(zip(names, [q for g in copy.param_groups for q in g["params"]]))  # the copy's own tensors
    run(copy, copied, 2, 6)  # through a correlation update and an SVD refresh
    run(twin_opt, twin, 2, 6)  # an optimizer of today given the settings of then
    for k in SHAPES:
        assert torch.equal(copied[k], twin[k]), k


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_zero_gradient_step_with_lr_zero_changes_nothing(cls):
    """torch's distributed-checkpoint loader steps a fresh optimizer once with all-zero gradients
    and lr 0 before loading: no weight moves and no projector is built from that, but every
    projected layer holds zeros of its final shapes with step 0 (the loader's template)."""
    params = make_params()
    start = {k: v.detach().clone() for k, v in params.items()}
    opt = make_opt(cls, params, lr=0.0) if cls is CoapAdamW else make_opt(cls, params, lr=0.0, relative_step=False)
    for p in params.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    for k, p in params.items():
        assert torch.equal(p, start[k]), k
        projectors = [v for key, v in opt.state[p].items() if key.startswith("proj")]
        assert all(not v.any() for v in projectors), k
    assert len(opt.waiting_parameters()) == 4  # tall, wide, conv, 1x1 conv wait for a usable gradient
