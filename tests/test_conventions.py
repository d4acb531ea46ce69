"""Conventions of torch optimizers that users and frameworks rely on, and the numerical guards of
the refreshes: each test names the behaviour it pins down."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

from coap_plugins import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit
from coap_plugins.optim._base import param_seed

ALL = [CoapAdamW, CoapAdamW8bit, CoapAdafactor, CoapAdafactor8bit]


def _step(model, opt, x, steps=1):
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


# -- load_state_dict leaves the state as it was saved ----------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_load_state_dict_adds_no_torch_keys_to_the_groups(cls):
    model = nn.Linear(32, 16)
    opt = cls(model.parameters(), update_interval=2)
    _step(model, opt, torch.randn(4, 32), 3)
    saved = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(saved)
    assert "differentiable" not in opt.param_groups[0]
    assert opt.state_dict()["param_groups"] == saved["param_groups"]


@pytest.mark.parametrize("cls", ALL)
def test_load_state_dict_fills_in_keys_an_older_state_lacks(cls):
    model = nn.Linear(32, 16)
    opt = cls(model.parameters(), update_interval=2, seed=3)
    _step(model, opt, torch.randn(4, 32), 2)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        del group["seed"], group["restore_state"]
    fresh = cls(nn.Linear(32, 16).parameters(), update_interval=2, seed=3)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["seed"] == 3 and fresh.param_groups[0]["restore_state"] is False


# -- copies of the whole optimizer keep their storage (8-bit at a real layer size) -----------------
@pytest.mark.parametrize("cls", [CoapAdamW8bit, CoapAdafactor8bit])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_8bit_optimizers_keep_stepping(cls, how):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Linear(256, 512)  # 512 x 256: moments far above the 8-bit threshold
    opt = cls(model.parameters(), lr=1e-3, update_interval=2)
    x = torch.randn(8, 256)
    _step(model, opt, x, 3)
    assert any(v.dtype == torch.uint8 for st in opt.state.values() for v in st.values())
    pair = (model, opt)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy(pair)
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps(pair))
    else:
        buf = io.BytesIO()
        torch.save(pair, buf)
        buf.seek(0)
        model2, opt2 = torch.load(buf, weights_only=False)
    assert type(opt2._storage) is type(opt._storage)
    _step(model, opt, x, 4)
    _step(model2, opt2, x, 4)
    assert torch.equal(model.weight, model2.weight)


def test_8bit_classes_show_their_arguments_to_inspect():
    import inspect

    for cls, base in ((CoapAdamW8bit, CoapAdamW), (CoapAdafactor8bit, CoapAdafactor)):
        params = inspect.signature(cls).parameters
        assert list(params) == list(inspect.signature(base).parameters)
        assert "lr" in params and "rank_ratio_conv" in params and "args" not in params


# -- every floating dtype steps ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cls", [CoapAdafactor, CoapAdamW])
def test_every_floating_dtype_steps_with_defaults(cls, dtype):
    model = nn.Linear(32, 16).to(dtype)
    opt = cls(model.parameters())  # Adafactor: scale_parameter=True, relative step
    before = model.weight.detach().clone()
    _step(model, opt, torch.randn(4, 32, dtype=dtype), 2)
    assert model.weight.dtype == dtype and not torch.equal(model.weight, before)
    assert bool(torch.isfinite(model.weight).all())


# -- a parameter's random start belongs to the parameter ---------------------------------------
def test_projector_start_does_not_depend_on_other_groups():
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    copy_ = copy.deepcopy(layer)
    unrelated = nn.Linear(40, 40)
    x = torch.randn(8, 64)
    alone = CoapAdamW(layer.parameters())
    behind = CoapAdamW([{"params": unrelated.parameters()}, {"params": copy_.parameters()}])
    _step(layer, alone, x)
    copy_(x).square().mean().backward()
    behind.step()
    assert torch.equal(alone.state[layer.weight]["proj"], behind.state[copy_.weight]["proj"])


def test_named_parameters_seed_from_their_names():
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(64, 48))
    # same shapes, same index in their groups: the names keep them apart
    a = param_seed(0, (48, 64), "0.weight", 0)
    b = param_seed(0, (48, 64), "1.weight", 0)
    assert a != b
    assert param_seed(0, (48, 64), None, 0) != param_seed(0, (48, 64), None, 1)
    assert param_seed(0, (48, 64), None, 0) != param_seed(1, (48, 64), None, 0)
    opt = CoapAdamW([{"params": [("0.weight", model[0].weight)]}, {"params": [("1.weight", model[1].weight)]}])
    x = torch.randn(4, 64)
    model[0](x).sum().backward()
    model[1](x).sum().backward()
    opt.step()
    assert not torch.equal(opt.state[model[0].weight]["proj"], opt.state[model[1].weight]["proj"])


def test_seed_is_the_same_in_every_process():
    code = (
        "from coap_plugins.optim._base import param_seed;"
        "print(param_seed(7, (48, 64), 'layer.weight', 2), param_seed(7, (3, 3), None, 5))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(h), "PATH": ""},
        ).stdout
        for h in (1, 2, 3)
    }
    assert outs == {f"{param_seed(7, (48, 64), 'layer.weight', 2)} {param_seed(7, (3, 3), None, 5)}\n"}


# -- the reference code's argument names --------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_rank_ratio_cnn_is_an_alias_of_rank_ratio_conv(cls):
    conv = nn.Conv2d(64, 64, 3)
    routes = [
        cls(conv.parameters(), **kw).routing()[0]["projector"]
        for kw in ({"rank_ratio_cnn": 16}, {"rank_ratio_conv": 16})
    ]
    assert (routes[0].rank_out, routes[0].rank_in) == (routes[1].rank_out, routes[1].rank_in) == (16, 16)
    assert cls(conv.parameters(), rank_ratio_cnn=16, rank_ratio_conv=16).param_groups[0]["rank_ratio_conv"] == 16
    with pytest.raises(ValueError, match=r"rank_ratio_conv=4 and its alias rank_ratio_cnn=16"):
        cls(conv.parameters(), rank_ratio_conv=4, rank_ratio_cnn=16)


# -- refreshes never destroy a projector --------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("kind", ["zero gradient", "gradient outside the subspace"])
def test_svd_refresh_on_a_gradient_with_nothing_in_the_subspace_keeps_the_projector(cls, kind):
    torch.manual_seed(0)
    layer = nn.Linear(64, 128, bias=False)  # 128 x 64: P is 64 x 8
    opt = cls(layer.parameters(), lr=1e-3, rank=8, update_interval=2, reproject_factor=1)
    x = torch.randn(16, 64)
    for _ in range(3):  # set-up, an SVD refresh at step 2, an ordinary step
        _step(layer, opt, x)
    proj = opt.state[layer.weight]["proj"].clone()
    if kind == "zero gradient":
        layer.weight.grad = torch.zeros_like(layer.weight)
    else:  # rows orthogonal to every column of P: G P == 0 although G is not zero
        q, _ = torch.linalg.qr(torch.cat([proj, torch.randn(64, 8)], dim=1))
        layer.weight.grad = torch.randn(128, 1) @ q[:, 8:9].T
        assert float((layer.weight.grad @ proj).abs().max()) < 1e-5
        layer.weight.grad = layer.weight.grad - layer.weight.grad @ proj @ proj.T
    opt.step()  # step 4: an SVD refresh is due
    assert torch.equal(opt.state[layer.weight]["proj"], proj)
    report = opt.coap_report()["layers"][0]
    assert report["last_refresh"] == "skipped (zero projected gradient)" and report["last_refresh_step"] == 4
    _step(layer, opt, x)  # a usable gradient at the next refresh is taken as usual
    _step(layer, opt, x)
    assert opt.coap_report()["layers"][0]["last_refresh"] == "svd"
