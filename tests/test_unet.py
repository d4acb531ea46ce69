"""coap_plugins.train.unet: the UNet, the DDPM helper and the PNG grid."""

import pytest
import torch
from torch import nn

from coap_plugins import CoapPolicy
from coap_plugins.train.unet import DDPM, UNet, save_grid, timestep_embedding


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "in_chans, widths, size", [(1, (32, 64), 16), (3, (16, 32, 64), 8), (1, (8,), 6), (3, (8, 16), 12)]
)
def test_unet_output_shape(in_chans, widths, size):
    torch.manual_seed(0)
    model = UNet(in_chans, widths)
    x = torch.randn(3, in_chans, size, size)
    out = model(x, torch.tensor([0, 5, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert isinstance(model.mid_attn.qkv, nn.Conv2d)  # attention at the lowest resolution


def test_unet_time_embedding_changes_output():
    torch.manual_seed(0)
    model = UNet(1, (8, 16))
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(model(x, torch.tensor([1, 1])), model(x, torch.tensor([500, 500])))
    emb = timestep_embedding(torch.tensor([0, 10]), 8)
    assert emb.shape == (2, 8) and torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_unet_and_ddpm_argument_errors():
    with pytest.raises(ValueError, match=r"Invalid widths: \(\)"):
        UNet(1, ())
    with pytest.raises(ValueError, match="Invalid in_chans: 0"):
        UNet(0)
    with pytest.raises(ValueError, match="Invalid num_heads: 3 .*64 channels"):
        UNet(1, (32, 64), num_heads=3)
    with pytest.raises(ValueError, match=r"Invalid input shape: \(1, 1, 9, 9\) .*divisible by 2"):
        UNet(1, (8, 16))(torch.randn(1, 1, 9, 9), torch.tensor([0]))
    with pytest.raises(ValueError, match="Invalid timesteps: 0"):
        DDPM(timesteps=0)
    with pytest.raises(ValueError, match="beta_start=0.1, beta_end=0.01"):
        DDPM(beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match=r"Invalid timesteps_list: \[10\] .*\[0, 9\]"):
        DDPM(timesteps=10).heldout_loss(UNet(1, (8,)), torch.zeros(1, 1, 4, 4), [10])


def test_ddpm_schedule():
    ddpm = DDPM(timesteps=50, beta_start=1e-4, beta_end=0.02)
    assert ddpm.betas[0].item() == pytest.approx(1e-4) and ddpm.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(ddpm.alpha_bars, torch.cumprod(1 - ddpm.betas, 0))
    x0, noise = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    xt = ddpm.q_sample(x0, torch.tensor([0, 49]), noise)
    assert xt[0].mean().item() == pytest.approx(ddpm.alpha_bars[0].sqrt().item())
    assert xt[1].mean().item() == pytest.approx(ddpm.alpha_bars[49].sqrt().item())


def test_adamw_steps_lower_ddpm_loss():
    from coap_plugins.examples import load_digits_tensors

    pytest.importorskip("sklearn")
    data = load_digits_tensors(size=8)
    torch.manual_seed(0)
    model = UNet(1, (16, 32))
    ddpm = DDPM(timesteps=100)
    heldout = data.x_test[:128]
    steps = [5, 25, 50, 75, 95]
    before = ddpm.heldout_loss(model, heldout, steps, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    train_losses = []
    for i in range(40):
        batch = data.x_train[(i * 64) % 1280 : (i * 64) % 1280 + 64]
        loss = ddpm.loss(model, batch, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_losses.append(loss.item())
    after = ddpm.heldout_loss(model, heldout, steps, seed=0)
    assert after < 0.6 * before, (before, after)
    assert sum(train_losses[-5:]) < sum(train_losses[:5])


def test_heldout_loss_is_deterministic_and_restores_mode():
    torch.manual_seed(0)
    model = UNet(1, (8, 16))
    ddpm = DDPM(timesteps=20)
    x0 = torch.randn(6, 1, 8, 8)
    torch.manual_seed(123)  # the global RNG must not matter
    a = ddpm.heldout_loss(model, x0, [0, 7, 19], seed=4)
    torch.randn(100)
    b = ddpm.heldout_loss(model, x0, [0, 7, 19], seed=4)
    assert a == b and model.training
    assert ddpm.heldout_loss(model, x0, [0, 7, 19], seed=5) != a
    # exactly the mean of per-timestep MSEs on noise drawn from the seed alone
    noises = torch.randn((3, *x0.shape), generator=torch.Generator().manual_seed(4))
    expected = 0.0
    with torch.no_grad():
        model.eval()
        for step, noise in zip([0, 7, 19], noises):
            t = torch.full((6,), step)
            expected += torch.nn.functional.mse_loss(model(ddpm.q_sample(x0, t, noise), t), noise).item() / 3
    assert a == pytest.approx(expected, rel=1e-6)


def test_sample_and_save_grid(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    model = UNet(1, (8, 16))
    ddpm = DDPM(timesteps=10)
    samples = ddpm.sample(model, 5, (1, 8, 8), generator=torch.Generator().manual_seed(0))
    again = ddpm.sample(model, 5, (1, 8, 8), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (5, 1, 8, 8) and torch.isfinite(samples).all() and torch.equal(samples, again)
    save_grid(samples, tmp_path / "grid.png")  # 3 per row, 2 rows, padding 2
    with Image.open(tmp_path / "grid.png") as img:
        assert img.size == (3 * 10 + 2, 2 * 10 + 2) and img.mode == "L"
        pixels = torch.tensor(list(img.getdata()), dtype=torch.uint8).reshape(22, 32)
    assert pixels[0].max() == 0 and pixels[2:10, 2:10].max() == 255 and pixels[2:10, 2:10].min() == 0
    save_grid(torch.rand(4, 3, 6, 6), tmp_path / "rgb.png", nrow=4, padding=1)
    with Image.open(tmp_path / "rgb.png") as img:
        assert img.size == (4 * 7 + 1, 1 * 7 + 1) and img.mode == "RGB"
    with pytest.raises(ValueError, match=r"Invalid images shape: \(2, 2, 4, 4\)"):
        save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")


def test_default_unet_convs_route_to_tucker2():
    policy = CoapPolicy()
    model = UNet()
    routes = {r.name: r for r in policy.route(model)}
    convs = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    big = [n for n in convs if torch.Size(routes[n].shape).numel() > policy.min_conv_numel]
    assert len(big) >= 12
    assert all(routes[n].kind == "tucker2" for n in big), {n: routes[n].reason for n in big}
    assert routes["mid_attn.qkv.weight"].kind == "tucker2"
    assert all(routes[n].kind == "none" for n in convs if n not in big)  # small convs stay full rank
    tucker_numel = sum(torch.Size(routes[n].shape).numel() for n in big)
    conv_numel = sum(torch.Size(routes[n].shape).numel() for n in convs)
    assert tucker_numel > 0.8 * conv_numel
