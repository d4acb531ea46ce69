"""Models and objectives for ``coap-train``, shared by the Composer and Lightning runners.

:class:`TaskModule` wraps the network with its objective (classification or DDPM denoising)
and owns every random draw of training (augmentation, diffusion timesteps and noise): each draw
comes from a generator seeded by ``(seed, rank, micro-batch counter)``, the counter being a
buffer saved with the model, so a resumed run draws exactly what the uninterrupted one drew,
in either framework.  Evaluation metrics are torchmetrics objects (summed across ranks).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._extras import require
from ._dist import rank_world
from .config import TrainConfig
from .unet import DDPM, UNet

__all__ = ["TaskModule", "build_model", "build_param_groups", "eval_metrics"]


def _small_input_stem(model: nn.Module, in_chans: int) -> None:
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(
            f"model.small_input needs a ResNet-style model with conv1 and maxpool; {type(model).__name__} has none"
        )
    model.conv1 = nn.Conv2d(in_chans, conv.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _timm_model(name: str, pretrained: bool, in_chans: int, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    timm = require("timm", "vision", what="timm models")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        raise ValueError(
            f"Unknown model.name: {name!r} (not a timm model{'; similar: ' + ', '.join(close) if close else ''})"
        )
    try:
        return timm.create_model(name, pretrained=pretrained, in_chans=in_chans, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as exc:
        if pretrained:
            raise RuntimeError(
                f"Pretrained weights for {name!r} could not be fetched ({exc}); this machine may be offline: "
                "set model.pretrained=false"
            ) from None
        raise


def _torchvision_model(
    name: str, pretrained: bool, in_chans: int, num_classes: int, kwargs: dict[str, Any]
) -> nn.Module:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"Unknown model.name: 'torchvision/{name}' (not a torchvision classification model)")
    if pretrained:
        raise ValueError(
            "model.pretrained with a torchvision model is not supported (weights are downloaded); use a timm name"
        )
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    conv = getattr(model, "conv1", None)
    if in_chans != 3:
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"torchvision/{name} has no conv1 to adapt to {in_chans} input channels")
        model.conv1 = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    return model


def build_model(cfg: TrainConfig, in_chans: int, num_classes: int) -> nn.Module:
    """The network of ``cfg.model`` with ``in_chans`` / ``num_classes`` from the data."""
    m = cfg.model
    if m.name.lower() == "unet":
        return UNet(in_chans, tuple(m.widths), blocks_per_level=m.blocks_per_level, num_heads=m.num_heads)
    if m.name.startswith("torchvision/"):
        model = _torchvision_model(m.name.split("/", 1)[1], m.pretrained, in_chans, num_classes, dict(m.kwargs))
    else:
        model = _timm_model(m.name, m.pretrained, in_chans, num_classes, dict(m.kwargs))
    if m.small_input:
        _small_input_stem(model, in_chans)
    return model


def build_param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict[str, Any]]:
    """One group with weight decay and, when asked, one without for biases and 1-D weights."""
    if not no_decay_norm_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def eval_metrics(task: str) -> dict[str, Any]:
    """The torchmetrics objects of a task's evaluation: name -> a mean of per-sample values.

    Each carries its name as ``metric.key`` (frameworks hand copies of the metric objects back).
    """
    import torchmetrics

    names = ("accuracy", "loss") if task == "classification" else ("heldout_loss",)
    metrics = {}
    for name in names:
        metric = torchmetrics.MeanMetric()
        metric.key = name
        metrics[name] = metric
    return metrics


class TaskModule(nn.Module):
    """The network plus its objective; ``forward(batch)`` returns what the loss needs.

    Args:
        cfg: the recipe.
        net: the network (:func:`build_model`).
        meta: the shards' ``meta.json`` (normalization of the inputs).
    """

    def __init__(self, cfg: TrainConfig, net: nn.Module, meta: dict[str, Any]) -> None:
        super().__init__()
        self.net = net
        self.task = cfg.task.name
        self.seed = cfg.seed
        self.augment = cfg.data.augment
        self.crop_padding = cfg.data.crop_padding
        self.label_smoothing = cfg.task.label_smoothing
        self.eval_timesteps = list(cfg.task.eval_timesteps)
        self.eval_seed = cfg.task.eval_seed
        self.register_buffer("micro_batches", torch.zeros((), dtype=torch.int64))
        mean = torch.tensor(meta["mean"], dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(meta["std"], dtype=torch.float32).view(-1, 1, 1)
        # what the shard reader yields -> [0, 1] pixels
        if meta.get("normalized"):
            self._to_unit = (std, mean)  # x * std + mean
        else:
            self._to_unit = (torch.ones_like(std), torch.zeros_like(mean))
        self._norm = (mean, std)
        self.ddpm = DDPM(cfg.task.timesteps, cfg.task.beta_start, cfg.task.beta_end) if self.task == "ddpm" else None
        self.image_shape = (int(meta["channels"]), *(int(v) for v in meta["size"]))

    # inputs -----------------------------------------------------------------------------------
    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = (t.to(x.device) for t in self._to_unit)
        unit = x * scale + shift
        if self.task == "ddpm":
            return unit * 2.0 - 1.0
        mean, std = (t.to(x.device) for t in self._norm)
        return (unit - mean) / std

    @torch.compiler.disable  # a host-side generator: run eagerly under `compile: true`
    def _generator(self, device: torch.device) -> torch.Generator:
        # one stream per (seed, rank, micro-batch): independent of the framework and of restarts
        count = int(self.micro_batches)
        gen = torch.Generator(device=device)
        gen.manual_seed((self.seed * 1_000_003 + rank_world()[0] * 7_919 + count * 104_729) % (2**63 - 1))
        return gen

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.augment == "none":
            return x
        n, _, h, w = x.shape
        pad = self.crop_padding
        if pad > 0:
            padded = F.pad(x, (pad, pad, pad, pad))
            offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen, device=x.device).tolist()
            x = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
        if self.augment == "crop_flip":
            flip = torch.rand(n, generator=gen, device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    # training ---------------------------------------------------------------------------------
    def forward(self, batch: Any) -> torch.Tensor:
        """Training: logits (classification) or the noise-prediction loss (ddpm)."""
        x = batch[0]
        gen = self._generator(x.device)
        self.micro_batches += 1
        x = self._inputs(x)
        if self.task == "ddpm":
            assert self.ddpm is not None
            return self.ddpm.loss(self.net, x, generator=gen)
        return self.net(self._augment(x, gen))

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        if self.task == "ddpm":
            return outputs
        return F.cross_entropy(outputs, batch[1], label_smoothing=self.label_smoothing)

    # evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_values(self, batch: Any) -> dict[str, torch.Tensor]:
        """Per-sample values of each eval metric for one batch."""
        x, y, index = batch[0], batch[1], batch[2]
        x = self._inputs(x)
        if self.task == "classification":
            logits = self.net(x)
            return {
                "accuracy": (logits.argmax(dim=1) == y).float(),
                "loss": F.cross_entropy(logits.float(), y, reduction="none"),
            }
        assert self.ddpm is not None
        return {"heldout_loss": self.ddpm.heldout_losses(self.net, x, index, self.eval_timesteps, self.eval_seed)}

    @torch.no_grad()
    def sample_grid(self, path: str, n: int, seed: int) -> None:
        """Sample ``n`` images with the DDPM sampler and write them as a PNG grid."""
        from .unet import save_grid

        assert self.ddpm is not None
        device = next(self.net.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
        images = self.ddpm.sample(self.net, n, self.image_shape, generator=gen, device=device)
        save_grid(images.clamp(-1, 1).float().cpu(), path, nrow=int(math.ceil(math.sqrt(n))))
