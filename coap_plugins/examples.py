"""Small, self-contained training pieces for demos and quality tests.

Everything here runs on a CPU in seconds to minutes and downloads nothing: the data set is
scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), upsampled to a size
where 3x3 convs have something to look at.  scikit-learn is imported only by
:func:`load_digits_tensors` (it is part of the ``vision`` extra).

Example:
    >>> import torch
    >>> from coap_plugins import CoapAdamW, CoapPolicy
    >>> from coap_plugins.examples import SmallResNet, load_digits_tensors, train_classifier
    >>> data = load_digits_tensors(size=16)
    >>> torch.manual_seed(0)  # doctest: +SKIP
    >>> model = SmallResNet()
    >>> policy = CoapPolicy(rank_ratio_conv=4, rank_ratio_matrix=4, exclude=["fc"])
    >>> opt = CoapAdamW(policy.param_groups(model), lr=2e-3)
    >>> result = train_classifier(model, opt, data, epochs=10, batch_size=64, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .optim import CoapOptimizer

__all__ = [
    "BasicBlock",
    "DigitsData",
    "SmallCNN",
    "SmallResNet",
    "evaluate",
    "load_digits_tensors",
    "optimizer_state_bytes",
    "train_classifier",
]


class DigitsData(NamedTuple):
    """Train and test tensors of the digits task.

    Attributes:
        x_train: float32 images, ``(n_train, 1, size, size)``, normalized with train statistics.
        y_train: int64 labels in ``[0, 10)``, ``(n_train,)``.
        x_test: float32 images, ``(n_test, 1, size, size)``, normalized like ``x_train``.
        y_test: int64 labels, ``(n_test,)``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_tensors(size: int = 16, seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """scikit-learn's bundled 8x8 digits as normalized image tensors, split train/test.

    The split is stratified by class and fixed by ``seed``.  Images (pixel values 0..16) are
    upsampled to ``size x size`` with bilinear interpolation, then shifted and scaled to zero
    mean and unit standard deviation using the training images' statistics only.

    Args:
        size: side of the returned images, >= 8 (default 16; 8 keeps the original pixels).
        seed: seed of the stratified split (default 0).
        test_fraction: share of the images held out for testing, in (0, 1) (default 0.25).

    Returns:
        A :class:`DigitsData` with ``x_train, y_train, x_test, y_test``.

    Raises:
        ImportError: scikit-learn is not installed.
        ValueError: ``size`` or ``test_fraction`` is out of range.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"Invalid size: {size!r} (must be an integer >= 8)")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid test_fraction: {test_fraction!r} (must be in (0, 1))")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits_tensors needs scikit-learn; install it with `pip install coap-plugins[vision]`"
        ) from exc

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    index = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    train_idx = torch.as_tensor(train_idx)
    test_idx = torch.as_tensor(test_idx)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    x_train, x_test = images[train_idx], images[test_idx]
    mean, std = x_train.mean(), x_train.std()
    x_train = ((x_train - mean) / std).contiguous()
    x_test = ((x_test - mean) / std).contiguous()
    return DigitsData(x_train, labels[train_idx].contiguous(), x_test, labels[test_idx].contiguous())


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU.

    The shortcut is the identity when shape is kept, else a strided 1x1 conv with BN.

    Args:
        in_chans: input channels.
        out_chans: output channels.
        stride: stride of the first conv and of the shortcut (default 1).
    """

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.shortcut: nn.Module
        if stride != 1 or in_chans != out_chans:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chans),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A compact ResNet for small images: a 3x3 stem, one stage per width, a linear head.

    The first stage keeps the resolution, every later stage halves it (stride 2).  With the
    default widths the 3x3 convs of the later stages (64x32x3x3 and up) are above COAP's default
    ``min_conv_numel`` of 9216 elements, so they get Tucker-2 projectors; the stem, the first
    stage (32x32x3x3 = 9216), the 1x1 shortcuts and the head ``fc`` stay full rank by default.

    Args:
        in_chans: input channels (default 1).
        num_classes: outputs of the head (default 10).
        widths: channels of each stage (default (32, 64, 128)).
        blocks_per_stage: basic blocks per stage (default 1).
    """

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 128),
        blocks_per_stage: int = 1,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths:
            raise ValueError("Invalid widths: empty (give at least one stage width)")
        if blocks_per_stage < 1:
            raise ValueError(f"Invalid blocks_per_stage: {blocks_per_stage!r} (must be >= 1)")
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        prev = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(prev, width, stride))
                prev = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallCNN(nn.Module):
    """A fast three-conv network for tests: convs 1->32->64->64, a hidden linear, a linear head.

    Layout: conv3x3(in, 32)-BN-ReLU-maxpool, conv3x3(32, 64)-BN-ReLU-maxpool,
    conv3x3(64, 64)-BN-ReLU, adaptive average pool to 2x2, ``fc1`` (256 -> hidden) with ReLU,
    and the head ``fc``.  Only the 64x32x3x3 and 64x64x3x3 convs pass COAP's default
    ``min_conv_numel``; pass a smaller one to project the first conv too.

    Args:
        in_chans: input channels (default 1).
        num_classes: outputs of the head (default 10).
        hidden: width of the hidden linear layer (default 128).
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
        )
        self.fc1 = nn.Linear(64 * 2 * 2, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc(F.relu(self.fc1(x)))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """Accuracy (%) and mean cross-entropy of ``model`` on ``(x, y)``, in eval mode.

    The model's training mode is restored afterwards.

    Args:
        model: the classifier.
        x: inputs.
        y: integer labels.
        batch_size: evaluation batch size (default 512).

    Returns:
        ``(accuracy_percent, mean_loss)``.
    """
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            logits = model(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    n = max(len(y), 1)
    return 100.0 * correct / n, loss_sum / n


def train_classifier(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DigitsData,
    epochs: int,
    batch_size: int = 64,
    seed: int = 0,
    *,
    lr_schedule: Literal["constant", "cosine"] = "constant",
) -> dict[str, Any]:
    """Train ``model`` with ``optimizer`` in a plain PyTorch loop, then test it.

    Each epoch visits the training set once in an order drawn from a ``torch.Generator``
    seeded with ``seed`` (so two runs with the same seed see the same batches in the same
    order, whatever the optimizer); the last, smaller batch is kept.  The global RNG is not
    touched, so the model's initialization is the caller's business.

    With ``lr_schedule="cosine"`` every group's learning rate follows a per-step cosine decay
    from its initial value to zero (``torch.optim.lr_scheduler.CosineAnnealingLR``); the
    optimizer's groups need float learning rates then.

    Args:
        model: the classifier (outputs logits).
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        data: the train/test tensors (:class:`DigitsData` or a 4-tuple in that order).
        epochs: passes over the training set, >= 1.
        batch_size: training batch size, >= 1 (default 64).
        seed: seed of the shuffling generator (default 0).
        lr_schedule: ``"constant"`` (default) or ``"cosine"``.

    Returns:
        A dict with ``test_accuracy`` (percent), ``test_loss`` (mean cross-entropy),
        ``wall_seconds`` (training loop only, evaluation excluded), ``train_loss`` (mean
        training loss of each epoch, a list), ``steps`` (optimizer steps taken) and
        ``nonfinite_steps`` (batches whose loss was not finite).

    Raises:
        ValueError: ``epochs`` or ``batch_size`` is below 1, or ``lr_schedule`` is unknown.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Invalid epochs: {epochs!r} (must be an integer >= 1)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size!r} (must be an integer >= 1)")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"Invalid lr_schedule: {lr_schedule!r} (expected 'constant' or 'cosine')")
    x_train, y_train, x_test, y_test = data
    gen = torch.Generator().manual_seed(seed)
    n = len(y_train)
    scheduler = None
    if lr_schedule == "cosine":
        total_steps = epochs * math.ceil(n / batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    epoch_losses: list[float] = []
    steps = 0
    nonfinite = 0
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            xb, yb = x_train[idx], y_train[idx]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            steps += 1
            value = float(loss.detach())
            if math.isfinite(value):
                total += value * len(idx)
                seen += len(idx)
            else:
                nonfinite += 1
        epoch_losses.append(total / seen if seen else math.nan)
    wall = time.perf_counter() - start
    accuracy, test_loss = evaluate(model, x_test, y_test)
    return {
        "test_accuracy": accuracy,
        "test_loss": test_loss,
        "wall_seconds": wall,
        "train_loss": epoch_losses,
        "steps": steps,
        "nonfinite_steps": nonfinite,
    }


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state actually held by ``opt``.

    COAP optimizers report their own (:meth:`~coap_plugins.CoapOptimizer.state_bytes`:
    projectors and moments); for any other optimizer this is the sum of ``nbytes`` of every
    tensor in ``opt.state`` (for torch AdamW: both moments and the step counters).

    Args:
        opt: an optimizer that has taken at least one step (before that its state is empty).

    Returns:
        The number of bytes.
    """
    if isinstance(opt, CoapOptimizer):
        return opt.state_bytes()
    return sum(
        v.nbytes
        for per_param in opt.state.values()
        for v in per_param.values()
        if isinstance(v, torch.Tensor)
    )
