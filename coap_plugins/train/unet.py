"""A compact UNet and a DDPM helper for denoising-diffusion training on small images.

The UNet predicts the noise added to an image at a diffusion timestep: a sinusoidal timestep
embedding goes through an MLP and is added inside every residual block (GroupNorm, SiLU,
3x3 conv); one level per entry of ``widths``, halving the resolution between levels, with
self-attention at the lowest resolution.  Its 3x3 convs and the attention's 1x1 projections
are ``nn.Conv2d``, so :class:`~coap_plugins.CoapPolicy` routes the large ones to Tucker-2.

:class:`DDPM` holds a linear beta schedule and the three things a training run needs: the
training loss, a held-out loss on fixed (timestep, noise) pairs that is the same for every
optimizer, and ancestral sampling.  :func:`save_grid` writes samples as a PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DDPM", "UNet", "save_grid", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``t`` (shape ``(B,)``) -> ``(B, dim)``."""
    if dim < 2 or dim % 2:
        raise ValueError(f"Invalid embedding dim: {dim!r} (must be an even integer >= 2)")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _groups(channels: int, max_groups: int = 8) -> int:
    """The largest group count <= max_groups that divides ``channels``."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3, add the projected time embedding, GroupNorm-SiLU-conv3x3, plus skip."""

    def __init__(self, in_chans: int, out_chans: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_chans), in_chans)
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, padding=1)
        self.time = nn.Linear(time_dim, out_chans)
        self.norm2 = nn.GroupNorm(_groups(out_chans), out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, padding=1)
        self.skip: nn.Module = nn.Conv2d(in_chans, out_chans, 1) if in_chans != out_chans else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, num_heads: int = 4) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"Invalid num_heads: {num_heads!r} (must divide the {channels} channels)")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        # (b, heads, pixels, head_dim) for scaled_dot_product_attention
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """A small noise-prediction UNet: ``model(x, t) -> eps_hat`` with the shape of ``x``.

    Each level has ``blocks_per_level`` residual blocks; between levels a strided 3x3 conv halves
    the resolution on the way down and nearest upsampling plus a 3x3 conv doubles it on the way
    up, with skip connections concatenated.  The middle (lowest resolution) is
    residual block, self-attention, residual block.  Images need sides divisible by
    ``2 ** (len(widths) - 1)``.

    Args:
        in_chans: image channels (default 1).
        widths: channels per level, from full resolution down (default ``(32, 64)``).
        blocks_per_level: residual blocks per level on the way down (default 1; the way up has
            one more, as in DDPM).
        time_dim: width of the timestep embedding MLP (default 4 * widths[0]).
        num_heads: attention heads at the lowest resolution (default 4).
    """

    def __init__(
        self,
        in_chans: int = 1,
        widths: Sequence[int] = (32, 64),
        *,
        blocks_per_level: int = 1,
        time_dim: int | None = None,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        widths = tuple(widths)
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"Invalid widths: {widths!r} (must be a non-empty sequence of positive integers)")
        for name, value in (("in_chans", in_chans), ("blocks_per_level", blocks_per_level)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= 1)")
        time_dim = time_dim if time_dim is not None else 4 * widths[0]
        self.in_chans, self.widths = in_chans, widths
        self.base_dim = widths[0]
        self.time_mlp = nn.Sequential(nn.Linear(widths[0], time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.stem = nn.Conv2d(in_chans, widths[0], 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_chans = [widths[0]]
        chans = widths[0]
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(blocks_per_level):
                blocks.append(ResBlock(chans, width, time_dim))
                chans = width
                skip_chans.append(chans)
            self.down.append(blocks)
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(chans, chans, 3, stride=2, padding=1))
                skip_chans.append(chans)

        self.mid1 = ResBlock(chans, chans, time_dim)
        self.mid_attn = SelfAttention(chans, num_heads)
        self.mid2 = ResBlock(chans, chans, time_dim)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for _ in range(blocks_per_level + 1):
                blocks.append(ResBlock(chans + skip_chans.pop(), widths[level], time_dim))
                chans = widths[level]
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(nn.Conv2d(chans, chans, 3, padding=1))

        self.out_norm = nn.GroupNorm(_groups(chans), chans)
        self.out_conv = nn.Conv2d(chans, in_chans, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (len(self.widths) - 1)
        if x.ndim != 4 or x.shape[1] != self.in_chans or x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"Invalid input shape: {tuple(x.shape)} (expected (B, {self.in_chans}, H, W) with H and W "
                f"divisible by {factor})"
            )
        temb = self.time_mlp(timestep_embedding(t, self.base_dim))
        h = self.stem(x)
        skips = [h]
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, temb)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), temb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out_conv(F.silu(self.out_norm(h)))


class DDPM:
    """Denoising diffusion (Ho et al., 2020) with a linear beta schedule and noise prediction.

    Args:
        timesteps: diffusion steps T (default 1000).
        beta_start: beta at t = 0 (default 1e-4).
        beta_end: beta at t = T - 1 (default 0.02).
    """

    def __init__(self, timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"Invalid timesteps: {timesteps!r} (must be an integer >= 1)")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(
                f"Invalid beta schedule: beta_start={beta_start!r}, beta_end={beta_end!r} "
                "(need 0 < beta_start <= beta_end < 1)"
            )
        self.timesteps = timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)

    def __repr__(self) -> str:
        return f"DDPM(timesteps={self.timesteps}, beta_start={self.beta_start}, beta_end={self.beta_end})"

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        abar = self.alpha_bars.to(x0.device)[t].to(x0.dtype)[:, None, None, None]
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def loss(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise-prediction MSE at uniformly drawn timesteps (the training loss)."""
        t = torch.randint(0, self.timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return F.mse_loss(model(self.q_sample(x0, t, noise), t), noise)

    def _check_timesteps(self, timesteps_list: Sequence[int]) -> list[int]:
        steps = list(timesteps_list)
        bad = [t for t in steps if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.timesteps]
        if not steps or bad:
            raise ValueError(
                f"Invalid timesteps_list: {steps!r} (need integers in [0, {self.timesteps - 1}], at least one)"
            )
        return steps

    def _heldout_errors(
        self, model: nn.Module, x0: torch.Tensor, steps: Sequence[int], noises: Iterable[torch.Tensor]
    ) -> torch.Tensor:
        """Per-image noise-prediction MSE at each timestep (``noises[k]`` for ``steps[k]``),
        computed in float32: a ``(len(steps), len(x0))`` tensor."""
        rows = []
        for step, noise in zip(steps, noises):
            noise = noise.to(device=x0.device, dtype=x0.dtype)
            t = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
            pred = model(self.q_sample(x0, t, noise), t)
            rows.append((pred.float() - noise.float()).pow(2).flatten(1).mean(dim=1))
        return torch.stack(rows)

    @torch.no_grad()
    def heldout_losses(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        index: Sequence[int] | torch.Tensor,
        timesteps_list: Sequence[int],
        seed: int = 0,
    ) -> torch.Tensor:
        """``coap-train``'s held-out loss of each image (its eval metric ``heldout_loss`` is their
        mean over the eval set): the noise-prediction MSE averaged over ``timesteps_list``.

        The noise of (image, k-th timestep) comes from a CPU generator seeded with ``seed``, the
        image's ``index`` in the held-out set and ``k`` alone, so it is the same for every model,
        optimizer, batch size, rank split and restart.
        """
        steps = self._check_timesteps(timesteps_list)
        noises = (
            torch.stack(
                [
                    torch.randn(
                        x0.shape[1:], generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i) * 1_009 + k)
                    )
                    for i in index
                ]
            )
            for k in range(len(steps))
        )
        return self._heldout_errors(model, x0, steps, noises).mean(dim=0)

    @torch.no_grad()
    def heldout_loss(self, model: nn.Module, x0: torch.Tensor, timesteps_list: Sequence[int], seed: int = 0) -> float:
        """Mean noise-prediction MSE over every image at every timestep of ``timesteps_list``
        (the benchmarks' held-out metric).

        The same per-image MSE as :meth:`heldout_losses`, on other noise: the noise of every
        (timestep, image) pair comes from one CPU generator seeded with ``seed`` alone, drawn
        for the whole set at once, so the pairs are identical for every model and optimizer
        being compared, but the number is not ``coap-train``'s ``heldout_loss`` for the same
        images.  The model is put in eval mode for the call and its mode restored after.
        """
        steps = self._check_timesteps(timesteps_list)
        gen = torch.Generator().manual_seed(seed)
        noises = torch.randn((len(steps), *x0.shape), generator=gen, dtype=torch.float32)
        was_training = model.training
        model.eval()
        try:
            return float(self._heldout_errors(model, x0, steps, noises).mean())
        finally:
            model.train(was_training)

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        n: int,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling (DDPM Algorithm 2, sigma_t^2 = beta_t): ``n`` images of ``shape``.

        Args:
            model: the noise-prediction network.
            n: number of images.
            shape: ``(C, H, W)`` of one image.
            generator: source of the noise (on ``device``), for reproducible samples.
            device: where to sample (default: the model's device).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Invalid n: {n!r} (must be an integer >= 1)")
        if len(shape) != 3:
            raise ValueError(f"Invalid shape: {tuple(shape)!r} (expected (C, H, W))")
        if device is None:
            device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            x = torch.randn((n, *shape), generator=generator, device=device)
            for step in reversed(range(self.timesteps)):
                t = torch.full((n,), step, device=device, dtype=torch.long)
                eps = model(x, t)
                alpha, abar, beta = (float(v[step]) for v in (self.alphas, self.alpha_bars, self.betas))
                x = (x - beta / math.sqrt(1.0 - abar) * eps) / math.sqrt(alpha)
                if step > 0:
                    x = x + math.sqrt(beta) * torch.randn(x.shape, generator=generator, device=device)
        finally:
            model.train(was_training)
        return x


def save_grid(images: torch.Tensor, path: str | os.PathLike[str], nrow: int | None = None, padding: int = 2) -> None:
    """Write ``images`` (``(N, C, H, W)``, C of 1 or 3) as one PNG grid.

    Each image is min-max scaled to [0, 255] on its own; the grid has ``nrow`` images per row
    (default ``ceil(sqrt(N))``) and ``padding`` black pixels between and around them, so it is
    ``rows * (H + padding) + padding`` pixels high and ``nrow * (W + padding) + padding`` wide.
    """
    from PIL import Image

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Invalid images shape: {tuple(images.shape)} (expected (N, C, H, W) with C of 1 or 3)")
    n, c, h, w = images.shape
    nrow = nrow if nrow is not None else math.ceil(math.sqrt(n))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"Invalid nrow: {nrow!r} (must be an integer >= 1)")
    rows = math.ceil(n / nrow)
    x = images.detach().float().cpu()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-8) * 255.0).round().to(torch.uint8)
    grid = torch.zeros((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), dtype=torch.uint8)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    array = grid.permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if c == 1 else array).save(path)
