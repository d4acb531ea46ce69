"""Count what a piece of code asks of the device: dispatched aten ops and host synchronisations.

On an accelerator an optimizer step is bound by kernel launches and by the points where the host
waits for the device long before it is bound by arithmetic; both can be counted on any device,
CPU included, from the ops torch dispatches.  ``benchmarks/optimizer_step.py`` prints these counts
per step kind, and the tests hold the step to them.

    >>> with DispatchCounter() as count:  # doctest: +SKIP
    ...     opt.step()
    >>> count.ops, count.syncs  # doctest: +SKIP
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DispatchCounter"]

_aten = torch.ops.aten
# ops whose result the host must wait for: reading a value (``item``, ``bool``, ``int``), or an
# output whose size depends on the data
_SYNC_OPS = frozenset({_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default})
_COPY_OPS = frozenset({_aten._to_copy.default, _aten.copy_.default})


def _device_of(x: Any) -> torch.device | None:
    return x.device if isinstance(x, torch.Tensor) else None


class DispatchCounter(TorchDispatchMode):
    """A context that counts every aten op dispatched inside it (views included: on a device each
    is a host-side call, the others are kernel launches) and the host syncs among them.

    Syncs are the value reads and data-dependent shapes (``aten._local_scalar_dense``, which
    ``.item()``, ``bool()`` and ``int()`` dispatch; ``nonzero``; ``masked_select``) and copies
    from a non-CPU device to the CPU.  A copy of a CPU tensor to the CPU is no sync, so on a CPU
    run the second kind never shows: the count is then what an accelerator run would make less
    those copies.

    Attributes:
        ops: ops dispatched.
        syncs: host syncs among them.
        by_op: ``Counter`` of op name -> count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        self.by_op[str(func.overloadpacket.__name__)] += 1
        if func in _SYNC_OPS:
            self.syncs += 1
        elif func in _COPY_OPS:
            src = _device_of(args[1] if func is _aten.copy_.default else args[0])
            dst = _device_of(args[0]) if func is _aten.copy_.default else kwargs.get("device")
            if src is not None and src.type != "cpu" and dst is not None and torch.device(dst).type == "cpu":
                self.syncs += 1
        return func(*args, **kwargs)
