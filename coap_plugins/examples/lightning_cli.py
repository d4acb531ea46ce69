"""COAP in Lightning from YAML with LightningCLI: :class:`DigitsClassifier` and :func:`cli_main`.

``python -m coap_plugins.examples.lightning_cli fit --config lightningcli/small_cnn_digits``
runs the packaged recipe (``--config`` takes a file, or a packaged recipe's name: see
:mod:`coap_plugins.recipes`).  Needs ``pip install 'coap-plugins[lightning,vision]'``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .._extras import missing_extra
from ..recipes import recipe_path
from ..train.digits import DigitsData, load_digits_tensors
from .nets import SmallCNN, SmallResNet

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise missing_extra("coap_plugins.examples.lightning_cli", "PyTorch Lightning", "lightning") from e

__all__ = ["DigitsClassifier", "cli_main"]


class DigitsClassifier(pl.LightningModule):
    """The model of the ``lightningcli/`` recipe: an example network on scikit-learn's bundled
    digits (nothing is downloaded), with its own data loaders.

    It defines no ``configure_optimizers``: LightningCLI builds one from the YAML's ``optimizer``
    and ``lr_scheduler`` sections, and :class:`~coap_plugins.algorithms.CoapCallback` swaps the
    optimizer it returns.

    Args:
        arch: ``"small_cnn"`` or ``"small_resnet"`` (default ``"small_cnn"``).
        size: image side the 8x8 digits are upsampled to (default 16).
        batch_size: training batch size (default 64).
        train_samples: how many training images to use, None for all (default None).
    """

    def __init__(
        self, arch: str = "small_cnn", size: int = 16, batch_size: int = 64, train_samples: int | None = None
    ) -> None:
        super().__init__()
        nets = {"small_cnn": SmallCNN, "small_resnet": SmallResNet}
        if arch not in nets:
            raise MisconfigurationException(f"Invalid arch: {arch!r} (expected one of {', '.join(nets)})")
        self.save_hyperparameters()
        self.net = nets[arch]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/accuracy", (self(x).argmax(1) == y).float().mean())

    def _data(self) -> DigitsData:
        return load_digits_tensors(size=self.hparams.size)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        d = self._data()
        n = self.hparams.train_samples or len(d.y_train)
        ds = torch.utils.data.TensorDataset(d.x_train[:n], d.y_train[:n])
        return torch.utils.data.DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        d = self._data()
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(d.x_test, d.y_test), batch_size=256)


def _resolve_config_args(args: Sequence[str]) -> list[str]:
    """``--config NAME`` / ``--config=NAME``: a packaged recipe's path when NAME is no file."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out) and not os.path.isfile(out[i + 1]):
            out[i + 1] = str(recipe_path(out[i + 1]))
        elif arg.startswith("--config=") and not os.path.isfile(arg.split("=", 1)[1]):
            out[i] = "--config=" + str(recipe_path(arg.split("=", 1)[1]))
    return out


def cli_main(args: Sequence[str] | None = None) -> Any:
    """LightningCLI over any LightningModule (``model.class_path``); returns the ``LightningCLI``.

    Args:
        args: the command line without the program name (default ``sys.argv[1:]``); a
            ``--config`` that names no file is looked up among the packaged recipes.
    """
    try:
        from lightning.pytorch.cli import LightningCLI
    except ImportError as e:  # pragma: no cover - exercised only without jsonargparse
        raise missing_extra("the Lightning CLI", "jsonargparse", "lightning") from e
    argv = _resolve_config_args(sys.argv[1:] if args is None else args)
    return LightningCLI(pl.LightningModule, subclass_mode_model=True, args=argv, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":  # pragma: no cover
    cli_main()
