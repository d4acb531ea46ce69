"""The embedded default data set: scikit-learn's bundled 8x8 handwritten digits as tensors.

1797 images, 10 classes, nothing downloaded; upsampled to a size where 3x3 convs have something
to look at.  scikit-learn (the ``vision`` extra) is imported only when the data are loaded.
:func:`coap_plugins.train.data.write_digits_shards` writes exactly these tensors as shards.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._extras import missing_extra

__all__ = ["DigitsData", "load_digits_tensors"]


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
        raise missing_extra("load_digits_tensors", "scikit-learn", "vision") from exc

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    index = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=digits.target)
    train_idx = torch.as_tensor(train_idx)
    test_idx = torch.as_tensor(test_idx)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    x_train, x_test = images[train_idx], images[test_idx]
    mean, std = x_train.mean(), x_train.std()
    x_train = ((x_train - mean) / std).contiguous()
    x_test = ((x_test - mean) / std).contiguous()
    return DigitsData(x_train, labels[train_idx].contiguous(), x_test, labels[test_idx].contiguous())
