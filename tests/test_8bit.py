import math
import subprocess
import sys

import pytest
import torch
from torch import nn

bnbf = pytest.importorskip("bitsandbytes.functional")

from coap_plugins import (  # noqa: E402
    CoapAdafactor,
    CoapAdafactor8bit,
    CoapAdamW,
    CoapAdamW8bit,
    build_projector,
    create_optimizer,
    get_optimizer_class,
)
from coap_plugins.optim._quant import BLOCKSIZE, MIN_8BIT_NUMEL, codec, n_blocks  # noqa: E402

EIGHT_BIT = [CoapAdamW8bit, CoapAdafactor8bit]

# Every route, each big enough for its moments to be quantized: a tall and a wide matrix, a
# Tucker-2 conv, a 1x1 conv (output mode only), a full-rank 3-D tensor; and a bias kept fp32.
SHAPES = {
    "tall": (256, 128),
    "wide": (96, 512),
    "conv": (64, 64, 3, 3),
    "conv1x1": (512, 128, 1, 1),
    "dense3d": (16, 16, 32),
    "bias": (64,),
}


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: nn.Parameter(0.1 * torch.randn(s, generator=g)) for k, s in SHAPES.items()}


def set_grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params.values():
        p.grad = ((p.detach().float() - 0.05) + 0.3 * torch.randn(p.shape, generator=g)).to(p.dtype)


def make_opt(cls, params, **kw):
    if cls in (CoapAdamW8bit, CoapAdamW):
        kw.setdefault("lr", 1e-2)
    kw.setdefault("update_interval", 2)
    kw.setdefault("reproject_factor", 2)
    return cls(params.values(), **kw)


def run(opt, params, start, stop):
    for step in range(start, stop):
        set_grads(params, step)
        opt.step()


# -- the format ---------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
def test_codes_decode_with_bitsandbytes_and_round_to_nearest(signed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5 * BLOCKSIZE + 37, generator=g)
    x = x if signed else x.square()
    c = codec(signed)
    codes = torch.empty(x.shape, dtype=torch.uint8)
    absmax = torch.empty(n_blocks(x.numel()))
    c.encode(x, codes, absmax)
    ours = c.decode(codes, absmax)
    theirs = bnbf.dequantize_blockwise(codes, absmax=absmax, code=c.code, blocksize=BLOCKSIZE)
    assert torch.equal(ours, theirs)
    _, state = bnbf.quantize_blockwise(x, code=c.code, blocksize=BLOCKSIZE)
    assert torch.equal(absmax, state.absmax)
    scale = torch.repeat_interleave(absmax, BLOCKSIZE)[: x.numel()]
    err = (c.code[codes.long()] - x / scale).abs()
    best = (c.code[None, :] - (x / scale)[:, None]).abs().min(dim=1).values
    assert float((err <= best + 1e-7).float().mean()) > 0.99  # nearest code, but for near-ties
    assert float((ours - x).abs().div(scale).max()) < 0.0075  # never worse than one code step


# -- bytes --------------------------------------------------------------------------------------
def _moment_bytes(numel: int) -> int:
    return 4 * numel if numel < MIN_8BIT_NUMEL else numel + 4 * math.ceil(numel / 256)


def test_state_bytes_of_a_resnet18_match_the_formula():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    opt = CoapAdamW8bit(model.parameters(), rank_ratio_matrix=4, rank_ratio_conv=4)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    expected = 0
    for p in model.parameters():
        proj, _ = build_projector(p.shape, rank_ratio_matrix=4, rank_ratio_conv=4)
        if proj is None:
            expected += 2 * _moment_bytes(p.numel())
        else:
            expected += 4 * proj.projector_numel() + 2 * _moment_bytes(math.prod(proj.moment_shape))
    assert opt.state_bytes() == expected
    # what the dtype says: every quantized moment is uint8 with one fp32 absmax per 256 elements
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            t = state[key]
            if t.numel() >= MIN_8BIT_NUMEL:
                assert t.dtype == torch.uint8 and state[key + "_absmax"].shape == (math.ceil(t.numel() / 256),)
            else:
                assert t.dtype == torch.float32 and key + "_absmax" not in state
    full_adamw = sum(2 * 4 * p.numel() for p in model.parameters())
    assert opt.state_bytes() / full_adamw < 0.13


# -- exact resume -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", EIGHT_BIT)
@pytest.mark.parametrize("restore_state", [False, True])
def test_exact_resume_across_refreshes(cls, restore_state, tmp_path):
    ref = make_params()
    run(make_opt(cls, ref, restore_state=restore_state), ref, 0, 9)

    resumed = make_params()
    opt1 = make_opt(cls, resumed, restore_state=restore_state)
    run(opt1, resumed, 0, 4)
    path = tmp_path / "opt8.pt"
    torch.save({"opt": opt1.state_dict(), "params": {k: v.detach().clone() for k, v in resumed.items()}}, path)
    ckpt = torch.load(path, weights_only=True)
    fresh = {k: nn.Parameter(v) for k, v in ckpt["params"].items()}
    opt2 = make_opt(cls, fresh, restore_state=restore_state)
    opt2.load_state_dict(ckpt["opt"])
    for p in fresh.values():  # the codes and scales came back as they were saved
        for k, v in opt2.state[p].items():
            if isinstance(v, torch.Tensor) and k.endswith("_absmax"):
                assert v.dtype == torch.float32
    run(opt2, fresh, 4, 9)
    for k in SHAPES:
        assert torch.equal(fresh[k], ref[k]), k
    quantized = [
        k for st in opt2.state.values() for k, v in st.items() if isinstance(v, torch.Tensor) and v.dtype == torch.uint8
    ]
    assert len(quantized) >= 5


def test_bf16_parameters_keep_fp32_scales_through_load(tmp_path):
    params = {k: nn.Parameter(v.detach().to(torch.bfloat16)) for k, v in make_params().items()}
    opt = make_opt(CoapAdamW8bit, params)
    run(opt, params, 0, 3)
    torch.save(opt.state_dict(), tmp_path / "s.pt")
    opt2 = make_opt(CoapAdamW8bit, params)
    opt2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for p in params.values():
        for k, v in opt2.state[p].items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == opt.state[p][k].dtype and torch.equal(v, opt.state[p][k])


# -- behaviour ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls8,cls32", [(CoapAdamW8bit, CoapAdamW), (CoapAdafactor8bit, CoapAdafactor)])
def test_eight_bit_tracks_its_32bit_form(cls8, cls32):
    # Without refreshes, so that only the storage differs (a refresh on these random gradients,
    # whose spectra are flat, amplifies any difference into another subspace).
    a, b = make_params(), make_params()
    opt8, opt32 = make_opt(cls8, a, update_interval=1000), make_opt(cls32, b, update_interval=1000)
    start = {k: v.detach().clone() for k, v in a.items()}
    for step in range(8):
        for params, opt in ((a, opt8), (b, opt32)):
            set_grads(params, step)
            opt.step()
    for k in SHAPES:
        moved8, moved32 = a[k] - start[k], b[k] - start[k]
        assert float((moved8 - moved32).norm() / moved32.norm()) < 0.03, k


def test_restore_state_carries_quantized_moments_into_the_new_basis():
    params = make_params()
    opt = make_opt(CoapAdamW8bit, params, restore_state=True, update_interval=1000)
    run(opt, params, 0, 3)
    storage = opt._storage
    for key in ("tall", "conv"):
        p = params[key]
        state = opt.state[p]
        proj = opt._route(p, opt.param_groups[0], list(SHAPES).index(key))[0]
        g = torch.Generator().manual_seed(7)
        new = {k: torch.linalg.qr(torch.randn(state[k].shape, generator=g))[0] for k in proj.state_shapes()}
        before = {k: storage.load(state, k).clone() for k in ("exp_avg", "exp_avg_sq")}
        opt._rotate_moments(state, proj, new, torch.tensor(True))
        assert state["exp_avg"].dtype == torch.uint8  # still stored in 8 bits
        for k, squared in (("exp_avg", False), ("exp_avg_sq", True)):
            expected = proj.rotate(before[k], state, new, squared=squared)
            got = storage.load(state, k)
            assert float((got - expected).norm() / expected.norm()) < 0.02, (key, k)
            assert float((before[k] - expected).norm() / expected.norm()) > 0.5  # the basis really changed

    # and in a run: with restore_state the moments move with the projector at a recalibration
    a, b = make_params(), make_params()
    runs = {}
    for restore, params in ((True, a), (False, b)):
        opt = make_opt(CoapAdamW8bit, params, restore_state=restore, update_interval=1, reproject_factor=1)
        run(opt, params, 0, 2)
        runs[restore] = opt.state[params["tall"]]
    assert not torch.equal(runs[True]["exp_avg"], runs[False]["exp_avg"])


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    codec.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    try:
        with pytest.raises(ImportError, match=r"pip install 'coap-plugins\[8bit\]'"):
            CoapAdamW8bit([nn.Parameter(torch.randn(8, 8))])
        with pytest.raises(ImportError, match=r"coap-plugins\[8bit\]"):
            CoapAdafactor8bit([nn.Parameter(torch.randn(8, 8))])
    finally:
        codec.cache_clear()


def test_import_works_without_bitsandbytes():
    code = (
        "import sys; sys.modules['bitsandbytes'] = None; sys.modules['bitsandbytes.functional'] = None\n"
        "import coap_plugins, torch\n"
        "opt = coap_plugins.CoapAdamW([torch.nn.Parameter(torch.randn(8, 8))])\n"
        "print('ok', 'bitsandbytes' in sys.modules and sys.modules['bitsandbytes'] is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok False"


# -- names --------------------------------------------------------------------------------------
def test_registry_names():
    assert get_optimizer_class("coap_adamw") is CoapAdamW
    assert get_optimizer_class("COAP_AdamW8bit") is CoapAdamW8bit
    assert get_optimizer_class("coap_adafactor") is CoapAdafactor
    assert get_optimizer_class("coap_adafactor8bit") is CoapAdafactor8bit
    opt = create_optimizer("coap_adamw8bit", [nn.Parameter(torch.randn(4, 4))], lr=0.1)
    assert isinstance(opt, CoapAdamW8bit) and opt.param_groups[0]["lr"] == 0.1
    with pytest.raises(ValueError, match=r"Unknown COAP optimizer: 'coap_adam8bit' .*did you mean 'coap_adamw8bit'"):
        get_optimizer_class("coap_adam8bit")


def test_timm_factory_builds_coap_optimizers_by_name():
    pytest.importorskip("timm")
    import timm.optim

    from coap_plugins import register_timm

    register_timm()
    register_timm()  # twice is harmless
    model = timm.create_model("resnet18", num_classes=10)
    for name, cls in [
        ("coap_adamw", CoapAdamW),
        ("coap_adamw8bit", CoapAdamW8bit),
        ("coap_adafactor", CoapAdafactor),
        ("coap_adafactor8bit", CoapAdafactor8bit),
    ]:
        opt = timm.optim.create_optimizer_v2(model, name, lr=1e-3, weight_decay=0.05)
        assert type(opt) is cls, name
        assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]  # timm's decay split kept
    assert type(timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3)) is torch.optim.AdamW


@pytest.mark.parametrize("cls", [CoapAdamW8bit, CoapAdafactor8bit])
def test_each_optimizer_names_its_nonnegative_moments_for_the_unsigned_code_map(cls):
    # the code map follows what the optimizer declares, not the spelling of a key; every second
    # moment it allocates is declared (the state_dict format is what it always was)
    params = make_params()
    opt = make_opt(cls, params)
    run(opt, params, 0, 1)
    storage = opt._storage
    assert storage.nonnegative == cls.nonnegative_moments
    keys = {k for st in opt.state.values() for k in st if k.startswith("exp_avg") and not k.endswith("_absmax")}
    assert {k for k in keys if k.startswith("exp_avg_sq")} <= cls.nonnegative_moments
    for k in keys:
        assert storage._signed(k) == (k not in cls.nonnegative_moments)
    assert "exp_avg" not in cls.nonnegative_moments
