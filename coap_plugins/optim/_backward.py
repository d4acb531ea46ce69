"""The step inside backward: each parameter's COAP update runs as soon as its gradient is there,
and the gradient is freed.

Once COAP has made the optimizer state small, the full-size gradients are the largest thing a
training step keeps.  :class:`StepInBackward` registers a post-accumulate-grad hook on every
parameter of a COAP optimizer: on the last micro-batch of a step the hook runs that parameter's
update (the arithmetic of :meth:`CoapOptimizer.step`, one parameter at a time) and sets its
``.grad`` to ``None``.  On the micro-batches before it (``no_step()``, or DDP's ``no_sync()``):

* a layer whose next step needs only ``G P`` (projected, set up, no refresh due, no residual)
  adds its micro-batch's projection to a core it accumulates (m x r instead of m x n; projection
  is linear) and frees ``.grad``;
* every other parameter (full rank, a refresh due, ``residual="scaled"``, waiting for its first
  gradient) accumulates its full gradient in ``.grad`` as without the option.

``optimizer.step()`` is still called once per step: it steps whatever the backward pass did not
(a step whose last micro-batch was not marked, e.g. the shorter last window of an epoch) and ends
the step (the requested refresh is consumed; learning-rate schedulers see a normal step).  The
optimizer object, its ``param_groups`` and ``state_dict`` are those of the normal mode, so a run
saved in one mode resumes in the other.

Under DDP (``ddp=`` the ``DistributedDataParallel`` module) the update must wait for the
averaged gradient: a communication hook reduces each bucket and then steps its parameters.  With
``reduce="projected"`` (the default) a layer that needs only ``G P`` sends its core instead of
its gradient (``r (m + n)``-ish instead of ``m n`` elements: see the README); ``reduce="full"``
averages the bucket as DDP does.  Every rank steps from the same reduced values, so the ranks stay
bit-identical.  DDP's buckets keep a gradient-sized buffer for the whole run: under DDP this mode
saves the reduction's bytes and overlaps the step with it, not the gradient's memory.

Refused: FSDP2-sharded parameters (their gradients arrive sharded after the backward pass, not
through the parameters' hooks), an optimizer already in this mode.  What needs every gradient
before any step (global-norm clipping, fp16 loss scaling) cannot work: the adapters refuse it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ._base import CoapOptimizer
from ._sharded import is_dtensor

__all__ = ["ACCUMULATIONS", "REDUCTIONS", "StepInBackward", "step_in_backward"]

REDUCTIONS = ("projected", "full")
ACCUMULATIONS = ("projected", "full")


class StepInBackward:
    """Run ``optimizer``'s step inside the backward pass (see the module's text).

    Args:
        optimizer: a COAP optimizer (:class:`~coap_plugins.optim.CoapOptimizer`).
        ddp: the ``DistributedDataParallel`` module that trains the optimizer's parameters, if
            any: its gradients are reduced (and the parameters stepped) in a communication hook.
        reduce: under DDP, ``"projected"`` (send ``G P`` for the layers that need only it) or
            ``"full"`` (average every gradient, as DDP does).
        accumulate: ``"projected"`` (micro-batches before the last accumulate ``G P`` where a
            layer's step needs only that: less memory, one projection per micro-batch) or
            ``"full"`` (they accumulate ``.grad`` as in the normal mode: no extra products, the
            gradients' memory until the last micro-batch).

    Attributes:
        stepping: whether the next backward pass is the last micro-batch of a step (default
            ``True``; :meth:`no_step` clears it for the micro-batches before it).

    Example:
        .. code-block:: python

            opt = CoapAdamW(model.parameters(), lr=1e-3)
            hooks = StepInBackward(opt)
            for batches in loader:  # each a list of micro-batches
                for k, micro in enumerate(batches):
                    with hooks.no_step() if k < len(batches) - 1 else contextlib.nullcontext():
                        loss_fn(model(micro)).backward()
                opt.step()  # ends the step (the layers were stepped by the backward pass)
                scheduler.step()
                opt.zero_grad()
    """

    def __init__(
        self, optimizer: CoapOptimizer, ddp: Any = None, *, reduce: str = "projected", accumulate: str = "projected"
    ) -> None:
        if not isinstance(optimizer, CoapOptimizer):
            raise TypeError(
                f"StepInBackward needs a COAP optimizer (coap_plugins.optim), got {type(optimizer).__name__}"
            )
        if reduce not in REDUCTIONS:
            raise ValueError(f"Invalid reduce: {reduce!r} (expected one of {', '.join(map(repr, REDUCTIONS))})")
        if accumulate not in ACCUMULATIONS:
            raise ValueError(
                f"Invalid accumulate: {accumulate!r} (expected one of {', '.join(map(repr, ACCUMULATIONS))})"
            )
        if optimizer._in_backward is not None:
            raise RuntimeError(f"{type(optimizer).__name__} already steps inside backward: remove() the other hooks")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if any(is_dtensor(p) for p in params):
            raise ValueError(
                "StepInBackward does not support FSDP2-sharded parameters (their gradients are reduce-scattered "
                "after the backward pass, not through the parameters' hooks): step after backward, or use DDP"
            )
        if ddp is not None:
            from torch.nn.parallel import DistributedDataParallel

            if not isinstance(ddp, DistributedDataParallel):
                raise TypeError(f"ddp must be a DistributedDataParallel module, got {type(ddp).__name__}")
            trained = {id(p) for p in ddp.parameters() if p.requires_grad}
            if not all(id(p) in trained for p in params if p.requires_grad):
                raise ValueError("ddp does not train every parameter of the optimizer: pass the module that does")
        import torch.distributed as dist

        if ddp is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            warnings.warn(
                f"StepInBackward without ddp= in a group of {dist.get_world_size()} processes: each rank steps from "
                "its own, unreduced gradient. Pass the DistributedDataParallel module (ddp=...) so the step waits "
                "for the reduction",
                stacklevel=2,
            )
        self.optimizer = optimizer
        self.ddp = ddp
        self.reduce = reduce
        self.accumulate = accumulate
        self.stepping = True
        self._lock = threading.Lock()  # a bucket's reduction completes on the process group's thread
        self._where: dict[torch.Tensor, tuple[int, int]] = {}
        self._index()
        self._removed = False
        if ddp is not None:  # first: DDP refuses a second communication hook, and nothing is left hooked
            ddp.register_comm_hook(None, self._comm_hook)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params if p.requires_grad]
        optimizer._in_backward = self

    def _index(self) -> None:
        groups = self.optimizer.param_groups
        self._where = {p: (gi, i) for gi, g in enumerate(groups) for i, p in enumerate(g["params"])}

    def _locate(self, p: torch.Tensor) -> tuple[dict, int]:
        """``p``'s param group and index in it (the group dict itself is looked up each time:
        ``load_state_dict`` replaces the groups)."""
        groups = self.optimizer.param_groups
        where = self._where.get(p)
        if where is None or where[0] >= len(groups) or groups[where[0]]["params"][where[1]] is not p:
            self._index()  # groups edited since (add_param_group)
            where = self._where[p]
        return groups[where[0]], where[1]

    @contextlib.contextmanager
    def no_step(self) -> Iterator[None]:
        """Backward passes inside accumulate (the micro-batches before a step's last one)."""
        before, self.stepping = self.stepping, False
        try:
            yield
        finally:
            self.stepping = before

    def remove(self) -> None:
        """Back to the normal mode: the hooks are removed (a DDP communication hook cannot be:
        it then averages every bucket as DDP does, stepping nothing).  Call it between steps."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._removed = True
        if self.optimizer._in_backward is self:
            self.optimizer._in_backward = None

    # -- the hooks ---------------------------------------------------------------------------
    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        opt = self.optimizer
        group, index = self._locate(p)
        syncing = self.ddp is not None and self.ddp.require_backward_grad_sync
        if syncing:
            return  # DDP reduces this gradient; the communication hook steps the layer after it
        self._check_not_stepped(p)
        if self.stepping and self.ddp is None:
            with self._lock:
                opt._step_one(p, group, index, p.grad, opt._accumulated.pop(p, None))
            p.grad = None
        elif (
            self.accumulate == "projected"
            and (self.ddp is None or self.reduce == "projected")
            and opt._accumulates_projected(p, group, index)
        ):
            opt._accumulate(p, group, index, p.grad)
            p.grad = None
        # else: the whole gradient accumulates in .grad, as in the normal mode

    def _comm_hook(self, _state, bucket):  # noqa: ANN001 - DDP checks the annotations it finds
        import torch.distributed as dist

        pg = self.ddp.process_group
        world = dist.get_world_size(pg)
        buffer = bucket.buffer()
        if self._removed or not self.stepping:  # a micro-batch that syncs but does not step
            buffer.div_(world)
            return dist.all_reduce(buffer, group=pg, async_op=True).get_future().then(lambda f: f.value()[0])
        opt = self.optimizer
        entries = []
        for p, g in zip(bucket.parameters(), bucket.gradients()):
            self._check_not_stepped(p)
            group, index = self._locate(p)
            if self.reduce == "projected" and opt._accumulates_projected(p, group, index):
                opt._accumulate(p, group, index, g)
                entries.append((p, group, index, opt._accumulated.pop(p)))
            else:
                entries.append((p, group, index, None))
        if all(core is None for *_, core in entries):
            flat = buffer.div_(world)  # in place: the gradients are views of it
            views = list(bucket.gradients())
        else:
            pieces = [g if core is None else core for (*_, core), g in zip(entries, bucket.gradients())]
            flat = torch.cat([t.reshape(-1) for t in pieces]).div_(world)
            views, offset = [], 0
            for t in pieces:
                views.append(flat[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()

        # the callback runs on another stream (CUDA): the step goes on this one, after the reduction,
        # so the caching allocator's reuse of what the step frees stays ordered with the backward pass
        stream = torch.cuda.current_stream(buffer.device) if buffer.is_cuda else None

        def step(fut: torch.futures.Future) -> torch.Tensor:
            fut.wait()
            ctx = contextlib.nullcontext()
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(buffer.device))
                ctx = torch.cuda.stream(stream)
            with self._lock, ctx:
                for (p, group, index, core), t in zip(entries, views):
                    if core is None:
                        opt._step_one(p, group, index, t, None)
                    else:
                        opt._step_one(p, group, index, None, t)
            return buffer

        return dist.all_reduce(flat, group=pg, async_op=True).get_future().then(step)

    def _check_not_stepped(self, p: torch.Tensor) -> None:
        if p in self.optimizer._stepped:
            raise RuntimeError(
                "StepInBackward: a parameter was stepped by an earlier backward pass of this step; call "
                "optimizer.step() after each step's last backward pass (and run the passes before it under "
                "no_step() or DDP's no_sync())"
            )

    def before_step(self) -> None:
        """Called by ``optimizer.step()``: under DDP, cores accumulated in micro-batches whose
        last pass did not step (a batch an adapter could not count, gradients DDP never synced)
        are averaged here, so every rank steps the same values."""
        held = self.optimizer._accumulated
        if self.ddp is None or not held:
            return
        import torch.distributed as dist

        pg = self.ddp.process_group
        world = dist.get_world_size(pg)
        for core in held.values():
            core.div_(world)
            dist.all_reduce(core, group=pg)

    def reduced_elements(self) -> tuple[int, int]:
        """``(elements a step with ``reduce="projected"`` all-reduces, elements of the whole
        gradients)`` for the parameters as they are now (an ordinary step: no refresh due)."""
        opt, sent, whole = self.optimizer, 0, 0
        for p in list(self._where):
            group, index = self._locate(p)
            if not p.requires_grad:
                continue
            whole += p.numel()
            proj, _ = opt._route(p, group, index)
            sent += math.prod(proj.moment_shape) if opt._accumulates_projected(p, group, index) else p.numel()
        return sent, whole


def step_in_backward(
    optimizer: CoapOptimizer, ddp: Any = None, *, reduce: str = "projected", accumulate: str = "projected"
) -> StepInBackward:
    """Run ``optimizer``'s step inside backward (see :class:`StepInBackward`); returns the hooks."""
    return StepInBackward(optimizer, ddp, reduce=reduce, accumulate=accumulate)
