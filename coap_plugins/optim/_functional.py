"""The math of the COAP optimizers' steps, as functions over lists of tensors (torch.optim's shape).

The optimizer classes gather, per param group, the tensors a step touches (parameters, fp32
gradients, moments, step counts) and call these functions; nothing here reads ``param_groups`` or
``optimizer.state``.  ``steps`` are the parameters' step counts after this step's increment, as
plain ints (a step count is host bookkeeping: it never costs a device op or a sync).

* :func:`adamw_full_rank` is torch.optim.AdamW's update: with ``foreach=True`` the same
  ``torch._foreach_*`` calls in the same order as torch's multi-tensor AdamW, with
  ``foreach=False`` torch's single-tensor loop, so both match torch bit for bit (fp32 params,
  float lr; a tensor lr is applied on the device without being read back).
* :func:`adam_projected_updates` is Adam's moment math on every projected core of a group at once
  (one ``torch._foreach_*`` call per operation, whatever the number of layers and shapes) and
  returns the updates in the projected space, scaled by their negative step sizes: what the
  optimizer back-projects (:meth:`CoapOptimizer._apply_batches`).
"""

from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["adam_moments", "adam_projected_updates", "adam_update_scale", "adamw_full_rank"]


def adam_moments(
    exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float
) -> None:
    """Adam's moment updates, in place, in the order torch.optim.AdamW applies them."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def adam_update_scale(
    lr: float | torch.Tensor, beta1: float, beta2: float, step: int
) -> tuple[float | torch.Tensor, float]:
    """``(step_size, sqrt(bias_correction2))`` as torch.optim.AdamW computes them (``step_size``
    is a 0-d tensor when ``lr`` is one)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return lr / bias_correction1, bias_correction2**0.5


def _single_adamw(p, g, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay) -> None:
    """torch.optim.AdamW's single-tensor update (bit-identical for fp32 parameters)."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    adam_moments(exp_avg, exp_avg_sq, g, beta1, beta2)
    step_size, bc2_sqrt = adam_update_scale(lr, beta1, beta2, step)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    if isinstance(step_size, torch.Tensor):  # a tensor lr: scale on the device, never read it
        p.add_((exp_avg / denom).mul_(-step_size).to(p.dtype))
    elif p.dtype == torch.float32:
        p.addcdiv_(exp_avg, denom, value=-step_size)
    else:
        p.add_((exp_avg / denom).to(p.dtype), alpha=-step_size)


def adamw_full_rank(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    foreach: bool,
) -> None:
    """AdamW on full-rank tensors (fp32 gradients and moments), in place.

    ``foreach=True`` runs torch's multi-tensor sequence on each (device, fp32) bucket; parameters
    of another dtype (bf16/fp16, with fp32 moments) take the single-tensor update, as does every
    parameter with ``foreach=False``.
    """
    if not params:
        return
    buckets: dict[torch.device, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        if foreach and p.dtype == torch.float32:
            buckets[p.device].append(i)
        else:
            _single_adamw(
                params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i], lr, beta1, beta2, eps, weight_decay
            )
    for idx in buckets.values():
        ps = [params[i] for i in idx]
        ms, vs, gs = [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx], [grads[i] for i in idx]
        bc1 = [1 - beta1 ** steps[i] for i in idx]
        bc2_sqrt = [(1 - beta2 ** steps[i]) ** 0.5 for i in idx]
        if weight_decay != 0:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        if isinstance(lr, torch.Tensor):
            # p += -(lr / bc1) m / denom, with lr on the device: denom * (-bc1) / lr
            torch._foreach_mul_(denom, [-b for b in bc1])
            torch._foreach_div_(denom, lr)
            torch._foreach_addcdiv_(ps, ms, denom)
        else:
            torch._foreach_addcdiv_(ps, ms, denom, [(lr / b) * -1 for b in bc1])


def adam_projected_updates(
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    cores: list[torch.Tensor],
    steps: list[int] | torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> list[torch.Tensor]:
    """Adam's moments of projected gradients (``cores``, any shapes) updated in place; returns
    ``-step_size * M / (sqrt(V / bc2) + eps)`` per core, ``step_size = lr / bc1``.

    ``steps`` are ints, or a 1-D tensor of the step counts on the cores' device: then the bias
    corrections are computed there too, and with a tensor ``lr`` nothing in the function depends
    on a Python number that changes from step to step, so ``torch.compile(...,
    fullgraph=True)`` traces it once and never recompiles (``tests/test_accelerated_step.py``).
    """
    torch._foreach_lerp_(exp_avgs, cores, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, cores, cores, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    lr_after = None  # a tensor lr applied after the per-core scalars, when those are floats
    if isinstance(steps, torch.Tensor):
        steps = steps.to(torch.float32)
        bc2_sqrt = list((1 - torch.pow(beta2, steps)).sqrt().unbind(0))
        step_sizes = list((-lr / (1 - torch.pow(beta1, steps))).unbind(0))
    else:
        bc2_sqrt = [(1 - beta2**s) ** 0.5 for s in steps]
        if isinstance(lr, torch.Tensor):
            step_sizes, lr_after = [-1 / (1 - beta1**s) for s in steps], lr
        else:
            step_sizes = [-lr / (1 - beta1**s) for s in steps]
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(updates, step_sizes)
    if lr_after is not None:
        torch._foreach_mul_(updates, lr_after)
    return updates
    torch._foreach_div_(denom, [(1 - beta2**s) ** 0.5 for s in steps])
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, denom)
    if isinstance(lr, torch.Tensor):
        torch._foreach_mul_(updates, [-1 / (1 - beta1**s) for s in steps])
        torch._foreach_mul_(updates, lr)
    else:
        torch._foreach_mul_(updates, [-lr / (1 - beta1**s) for s in steps])
    return updates
