"""Test helpers: a plain PyTorch training loop on the digits, its evaluation, state bytes."""

from __future__ import annotations

import math
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from coap_plugins.optim import CoapOptimizer
from coap_plugins.train.digits import DigitsData

__all__ = ["evaluate", "launch_env", "optimizer_state_bytes", "train_classifier"]

# what a launcher sets: in-process tests earlier in a session may leave these behind, which would
# make a launched run think it is one rank of a group (or collide on a port)
_RANK_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def launch_env(**extra: str) -> dict[str, str]:
    """A clean environment for a launched (multi-process) run: this one without the rank
    variables, with one thread per process and ``extra``."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARIABLES}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


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
    return sum(v.nbytes for per_param in opt.state.values() for v in per_param.values() if isinstance(v, torch.Tensor))
