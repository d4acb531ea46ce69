"""What every COAP optimizer shares: routing, projector set-up and refreshes, state checks, telemetry.

A subclass (Adam or Adafactor form) only says how moments are allocated and updated; the flow of
one step for a projected parameter is here, in the order of supplementary Algorithms 1 and 2:

1. ``G`` in fp32; the first usable gradient (finite, not all zero) sets the projector up, and
   until then the layer only takes weight decay;
2. ``core = project(G)`` with the projector in use (``G P_{t-1}``);
3. when a refresh is due (own schedule, or requested by a framework adapter) and ``core`` is
   finite, the new projector ``P_t`` is computed from ``G``, that ``core`` (reused: the refresh
   needs ``G P_{t-1}`` anyway) and the moment before this step (``M_{t-1}``): a
   correlation-aware step or the low-cost SVD.  A recalibrated basis is laid onto the old one
   (``basis_alignment``), ``restore_state`` carries the moments into it, and ``G`` is projected
   again with ``P_t``: this step's update already uses the new basis, as Algorithm 1 does (one
   more projection on refresh steps only);
4. moments updated with ``core``; the update is projected back with the projector ``core`` and
   the moments live in, and applied.
"""

from __future__ import annotations

import math
import time
import zlib
from typing import Any, Callable, Literal

import torch
from torch.optim import Optimizer

from .._checks import (
    check_bool,
    check_choice,
    check_int,
    check_min_numel,
    check_positive_int,
    check_projection,
    check_projection_reasons,
    check_rank,
    check_ratio,
    check_update_scale,
)
from ..projection import PROJECTION_KINDS, Projector
from ..projection.linalg import (
    BASIS_ALIGNMENTS,
    CORRELATION_LOSSES,
    DEFAULT_BASIS_ALIGNMENT,
    DEFAULT_CORRELATION_LOSS,
    Split,
    SvdFallbacks,
)
from ..projection.routing import PROJECTION_REASONS, policy_reason, route_in_group
from ..schedule import ProjectionSchedule
from ._quant import BLOCKSIZE
from ._sharded import check_placement, is_dtensor, local_part, local_view, param_split, write_back
from ._storage import MomentStorage

__all__ = ["CoapOptimizer", "COAP_GROUP_KEYS", "RESIDUALS", "coap_defaults"]

# Settings that decide the shapes of the state: a checkpoint must agree on them to be loaded.
COAP_GROUP_KEYS = ("projection", "rank", "rank_ratio_matrix", "rank_ratio_conv", "min_conv_numel")
_PROJECTOR_KEYS = ("proj", "proj_out", "proj_in")
# Settings added after the first release, with the behaviour an optimizer pickled before them had:
# a whole optimizer pickled then (``torch.save(opt)``, ``deepcopy``) lacks them in ``defaults`` too.
_LATER_SETTINGS = {
    "basis_alignment": DEFAULT_BASIS_ALIGNMENT,
    "correlation_loss": DEFAULT_CORRELATION_LOSS,
    "residual": "none",
    "update_scale": 1.0,
}
DEFAULT_UPDATE_SCALE: float | str = "auto"
DEFAULT_RESIDUAL = "scaled"
# what becomes of the gradient outside the subspace: dropped (the paper), or applied at the
# projected update's relative step size (see CoapOptimizer._apply_batches)
RESIDUALS = ("none", "scaled")
_RESIDUAL_FLOOR = 0.1


def param_seed(base: int, shape: tuple[int, ...], name: str | None, index: int) -> int:
    """Seed of a parameter's random start, from what belongs to the parameter itself.

    Its name when known (``(name, tensor)`` params), else its index within its own param group,
    together with its shape and the base seed: so the same parameter follows the same
    trajectory alone in an optimizer or after other groups, and every process computes the same
    seed (a CRC, not Python's per-process salted ``hash``).
    """
    who = f"name={name}" if name else f"index={index}"
    key = f"{base}|{who}|{'x'.join(map(str, shape))}"
    return zlib.crc32(key.encode()) % (2**31 - 1)


# A projection holding at most this fraction of the gradient's energy holds only rounding (fp32
# products leave ~1e-14 of it in a subspace the gradient is orthogonal to).
_EMPTY_PROJECTION = 1e-10


class _Member:
    """One projected parameter in a step: the tensor, its fp32 gradient, state, projector,
    index in its group and the refresh due.  For a sharded parameter (FSDP2) ``param``,
    ``grad``, ``state`` and ``proj`` are this rank's local ones, ``key`` the DTensor parameter
    itself and ``split`` how its rows are split; for any other ``key`` is ``param``."""

    __slots__ = ("param", "grad", "state", "proj", "index", "refresh", "key", "split", "partial")

    def __init__(self, param, grad, state, proj, index, refresh, key=None, split=None, partial=None) -> None:
        self.param, self.grad, self.state = param, grad, state
        self.proj, self.index, self.refresh = proj, index, refresh
        self.key = param if key is None else key
        self.split = split
        # the projected gradient of earlier micro-batches (step in backward, see _backward), to
        # which this one's projection is added; ``grad`` is then ``None`` when there is none
        self.partial = partial

    @property
    def core_split(self):
        """The split of this member's core rows (``None`` when every rank holds its whole core)."""
        return self.proj.core_split if self.split is not None else None


class _ShardPlan:
    """How a sharded parameter's step and state are laid out on this rank (cached per parameter,
    for the projector it was routed to): its split, local projector, the split of each state key
    kept as a DTensor (the others are replicated) and every key's global shape."""

    __slots__ = ("route", "split", "proj", "splits", "shapes")

    def __init__(self, route, split, proj, splits, shapes) -> None:
        self.route, self.split, self.proj, self.splits, self.shapes = route, split, proj, splits, shapes


def _sum_sharded(values: list[torch.Tensor], splits: list) -> list[torch.Tensor]:
    """``values`` (0-d tensors) with those of split members summed over their shard groups
    (one collective per group); the others as they are."""
    out = list(values)
    groups: dict[Any, list[int]] = {}
    for i, s in enumerate(splits):
        if s is not None:
            groups.setdefault(s.group, []).append(i)
    for idx in groups.values():
        (summed,) = splits[idx[0]].sum(torch.stack([values[i] for i in idx]))
        for i, v in zip(idx, summed.unbind(0)):
            out[i] = v
    return out


class _Batch:
    """Projected parameters of one group with the same projector shape and ranks, dtype, device
    and refresh kind: projected and back-projected together.

    On an accelerator (``batched``) their gradients are stacked and every product is one batched
    ``bmm`` for the whole batch: a step's launches then grow with the number of distinct shapes,
    not of layers.  On the CPU, where a launch costs nothing and torch's batched products run
    below its single ones (up to 4x on transposed operands, measured on ResNet-50's shapes), each
    layer takes its own products, in place into its weight.  ``cores`` (and :meth:`ctx`, what a
    Tucker-2 refresh reuses) are the members' projections either way.  Moments stay per
    parameter in ``optimizer.state``; only the step's temporaries are stacked.
    """

    def __init__(self, members: list[_Member], batched: bool) -> None:
        self.members = members
        self.proj = members[0].proj
        self.refresh = members[0].refresh
        self.batched = batched
        grads = [m.grad for m in members]
        self.stacked = None
        if batched:
            self.stacked = torch.stack(grads) if len(grads) > 1 else grads[0].unsqueeze(0)
        self.pending: list = []
        self.projs: dict[str, torch.Tensor] = {}
        self.cores: list[torch.Tensor] = []
        self._ctx: torch.Tensor | list | None = None

    def ctx(self, j: int) -> torch.Tensor | None:
        """What member ``j``'s refresh reuses from its projection (``None`` for matrices)."""
        return None if self._ctx is None else self._ctx[j]

    def project(self, stacks: dict) -> None:
        """Project the batch with its projectors as they are in the state.

        The stacked projectors of a batched batch are kept in ``stacks`` between steps: for
        several layers the stack *is* their storage (each layer's ``state`` entry becomes a
        view of its row, so nothing is held twice and ``state_dict`` stays per parameter), for a
        single layer it is a view.  A refresh or ``load_state_dict`` puts other tensors in the
        state, which the identity check below notices: the batch is then stacked again.
        """
        if not self.batched:
            if self.members[0].partial is not None:  # an ordinary step: no refresh reuses a context
                self.cores = [
                    m.partial if m.grad is None else m.partial + m.proj.project(m.state, m.grad)[0]
                    for m in self.members
                ]
                self._ctx = None
                return
            out = [self.proj.project(m.state, m.grad) for m in self.members]
            self.cores = [core for core, _ in out]
            self._ctx = None if out[0][1] is None else [ctx for _, ctx in out]
            return
        keys = tuple(self.proj.state_shapes())
        current = tuple(m.state[k] for m in self.members for k in keys)
        ident = tuple(id(m.param) for m in self.members)
        hit = stacks.get(ident)
        if hit is None or len(hit[0]) != len(current) or any(a is not b for a, b in zip(hit[0], current)):
            # a stack of other members (the batch changed) would keep an old copy alive
            for other in [k for k in stacks if set(k) & set(ident)]:
                del stacks[other]
            projs: dict[str, torch.Tensor] = {}
            for k in keys:
                if len(self.members) == 1:
                    projs[k] = self.members[0].state[k].unsqueeze(0)
                else:
                    projs[k] = torch.stack([m.state[k] for m in self.members])
                    for j, m in enumerate(self.members):
                        m.state[k] = projs[k][j]
                projs[k + "_t"] = projs[k].transpose(1, 2)
            hit = (tuple(m.state[k] for m in self.members for k in keys), projs)
            stacks[ident] = hit
        self.projs = hit[1]
        core, self._ctx = self.proj.project_batch(self.projs, self.stacked)
        self.cores = list(core.unbind(0))

    def back_project(self, updates: list[torch.Tensor]) -> None:
        """``p += back(u)`` for every member of a batched batch (``updates`` in member order)."""
        params = [m.param for m in self.members]
        p = params[0]
        u = torch.stack(updates)
        if len(params) == 1 and p.dtype == torch.float32 and p.is_contiguous():
            self.proj.back_project_batch(self.projs, u, into=p.unsqueeze(0))  # in place: no temporary
            return
        delta = self.proj.back_project_batch(self.projs, u)
        if p.dtype != torch.float32:
            delta = delta.to(p.dtype)
        torch._foreach_add_(params, delta.unbind(0))


def _batches(members: list[_Member], batched: bool | None) -> list[_Batch]:
    """Members grouped by what lets them share batched products (in order of first appearance);
    ``batched=None``: batched products on every device but the CPU."""
    keyed: dict[tuple, list[_Member]] = {}
    for m in members:
        key = (
            m.proj.kind,
            m.proj.shape,
            tuple(m.proj.ranks.values()),
            m.param.dtype,
            m.param.device,
            m.refresh,
            m.split is not None,
            m.partial is not None,
        )
        keyed.setdefault(key, []).append(m)
    out = []
    for ms in keyed.values():
        on = ms[0].param.device.type != "cpu" if batched is None else batched
        # a sharded layer's products carry collectives; an accumulated core is the member's own
        out.append(_Batch(ms, on and ms[0].split is None and ms[0].partial is None))
    return out


class _Plan:
    """A param group's work in one step."""

    def __init__(self) -> None:
        self.full: list[tuple[torch.Tensor, torch.Tensor, dict, Any]] = []
        self.projected: list[_Member] = []
        self.waiting: list[_Member] = []
        self.batches: list[_Batch] = []


def coap_defaults(**settings: Any) -> dict[str, Any]:
    """The COAP part of an optimizer's ``defaults`` (the per-group settings every form shares):
    ``settings`` plus the automatic projection kind and the optimizer's own refresh schedule."""
    return dict(projection="auto", **settings, schedule="optimizer")


class CoapOptimizer(Optimizer):
    """Base class of the COAP optimizers (not used directly)."""

    # how moments are kept: fp32 here, blockwise 8-bit in the 8-bit forms.  A class attribute,
    # not instance state: torch's Optimizer pickles only defaults, state and param_groups, and a
    # copy (deepcopy, pickle, torch.save of the whole optimizer) must keep reading its moments
    # the way they were written.
    storage_class: type[MomentStorage] = MomentStorage
    # the moments (state keys) that are never negative: the 8-bit storage keeps them with the
    # unsigned code map.  Each optimizer names its own.
    nonnegative_moments: frozenset[str] = frozenset()
    # how same-shaped projected layers are multiplied: one batched product per batch (``True``),
    # one product per layer (``False``), or batched on accelerators and per layer on the CPU
    # (``None``, see _Batch).  A class attribute: it changes no result beyond rounding, no state.
    batched_products: bool | None = None
    # settings added after the first release, with the value an older pickle behaves as
    _later_settings: dict[str, Any] = _LATER_SETTINGS
    # moments that never follow the rows of their tensor (Adafactor's column statistics): under
    # FSDP2 they are replicated even where the moment itself is sharded
    replicated_moments: frozenset[str] = frozenset()

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self._init_runtime()
        # the group keys this package owns (torch adds its own, e.g. ``differentiable``)
        self._owned_keys = tuple(defaults)
        super().__init__(params, defaults)

    def _init_runtime(self) -> None:
        """Caches that are not state: rebuilt after a copy or an unpickle."""
        self._storage = self.storage_class(self.nonnegative_moments)
        self._projectors: dict[torch.Tensor, tuple[tuple, Projector | None, str]] = {}
        self._telemetry: dict[torch.Tensor, dict[str, Any]] = {}
        # stacked projectors of each batch of same-shaped layers, kept between steps (_Batch.project)
        self._stacks: dict[tuple[int, ...], tuple] = {}
        # layouts of FSDP2-sharded parameters, and this step's local views of their state
        self._shard_plans: dict[torch.Tensor, _ShardPlan] = {}
        self._local_states: list[tuple[torch.Tensor, dict, dict, _ShardPlan]] = []
        self.last_refresh_seconds = 0.0
        # step in backward (see _backward): the hooks that run it, the cores accumulated over
        # micro-batches and the parameters the backward pass stepped since the last ``step()``
        self._in_backward: Any = None
        self._accumulated: dict[torch.Tensor, torch.Tensor] = {}
        self._stepped: set[torch.Tensor] = set()
        self._refresh_seconds = 0.0  # refreshes the backward pass ran since the last step()

    # -- groups and validation ---------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        """COAP settings; subclasses extend with their own hyperparameters."""
        check_rank(group["rank"])
        check_ratio("rank_ratio_matrix", group["rank_ratio_matrix"])
        check_ratio("rank_ratio_conv", group["rank_ratio_conv"])
        check_positive_int("update_interval", group["update_interval"])
        check_positive_int("reproject_factor", group["reproject_factor"])
        check_min_numel("min_conv_numel", group["min_conv_numel"])
        check_bool("restore_state", group["restore_state"])
        check_int("seed", group["seed"])
        check_projection(group["projection"], len(group["params"]), PROJECTION_KINDS)
        if PROJECTION_REASONS in group:
            check_projection_reasons(group[PROJECTION_REASONS], len(group["params"]))
        check_choice("schedule", group["schedule"], ("optimizer", "external"))
        check_choice("correlation_loss", group["correlation_loss"], CORRELATION_LOSSES)
        check_choice("basis_alignment", group["basis_alignment"], BASIS_ALIGNMENTS)
        check_choice("residual", group["residual"], RESIDUALS)
        check_update_scale(group["update_scale"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("pending_refresh", "none")
        for key in ("projection", PROJECTION_REASONS):
            if isinstance(group.get(key), tuple):
                group[key] = list(group[key])
        try:
            self._validate_group(group)
            for i, p in enumerate(group["params"]):
                check_placement(p, type(self).__name__)
                if is_dtensor(p):
                    self._shard_plan(p, group, i)
        except ValueError:
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_owned_keys"] = self._owned_keys
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_storage" not in self.__dict__:  # a copy or an unpickle, not load_state_dict
            self._init_runtime()
        super().__setstate__(state)
        if "_owned_keys" not in self.__dict__:  # pickled by an older version
            self._owned_keys = tuple(k for k in self.defaults if k != "differentiable")
        for key, value in self._later_settings.items():  # pickled before these settings existed
            if key not in self.defaults:
                self.defaults[key] = value
                self._owned_keys += (key,)
        for group in self.param_groups:  # groups pickled or saved by an older version
            for key in self._owned_keys:
                group.setdefault(key, self.defaults[key])
            group.setdefault("pending_refresh", "none")

    # -- routing -----------------------------------------------------------------------------
    def _route(self, p: torch.Tensor, group: dict[str, Any], index: int) -> tuple[Projector | None, str]:
        # rebuilt only when something that decides it changed (projectors are small, stateless
        # objects: their tensors live in ``self.state``)
        kinds = group["projection"]
        key = (
            kinds if isinstance(kinds, str) else kinds[index],
            tuple(p.shape),
            group["rank"],
            group["rank_ratio_matrix"],
            group["rank_ratio_conv"],
            group["min_conv_numel"],
            policy_reason(group, index),
        )
        cached = self._projectors.get(p)
        if cached is None or cached[0] != key:
            _, proj, reason = route_in_group(p.shape, group, index)
            cached = (key, proj, reason)
            self._projectors[p] = cached
        return cached[1], cached[2]

    def _shard_plan(self, p: torch.Tensor, group: dict[str, Any], index: int) -> _ShardPlan:
        """The layout of a sharded parameter on this rank (see :mod:`._sharded`), rebuilt when
        its routing changes.  An 8-bit moment can only be split where the ranks' shards start at
        block boundaries (the absmax of a block is a value of the whole tensor): any other
        split is refused here, when the optimizer is built."""
        proj, _ = self._route(p, group, index)
        plan = self._shard_plans.get(p)
        if plan is not None and plan.route is proj:  # a parameter's mesh and rank never change
            return plan
        split = param_split(p)
        local = None if proj is None else proj.sharded(split)
        shapes = self._expected_state_shapes(p, group, index)
        # the projectors split with the weight's rows; every moment with the core's rows (the
        # weight's own for a full-rank parameter), but the statistics that never follow rows
        splits = dict.fromkeys(() if local is None else local.sharded_keys, split)
        moment_split = split if local is None else local.core_split
        moment_shape = tuple(p.shape) if proj is None else proj.moment_shape
        for name, shape in self._moment_shapes(moment_shape, group).items():
            if name in self.replicated_moments:
                continue
            keys = self._storage.state_shapes(name, shape)
            splits.update(dict.fromkeys(keys, moment_split))
            if name + "_absmax" in keys:  # one absmax per block: split in blocks, at the rows' boundaries
                self._check_block_split(p, name, shape, moment_split)
                blocks = keys[name + "_absmax"][0]
                splits[name + "_absmax"] = Split(
                    "rows", split.group, split.world, split.rank, blocks, -(-blocks // split.world)
                )
        plan = _ShardPlan(proj, split, local, splits, shapes)
        self._shard_plans[p] = plan
        return plan

    def _check_block_split(self, p: torch.Tensor, name: str, shape: tuple[int, ...], split) -> None:
        row = math.prod(shape[1:])
        blocks = -(-math.prod(shape) // BLOCKSIZE)
        per_rank = -(-blocks // split.world)
        for r in range(split.world):
            first = min(r * split.chunk, split.total) * row
            if first % BLOCKSIZE or first // BLOCKSIZE != min(r * per_rank, blocks):
                raise ValueError(
                    f"{type(self).__name__}: the 8-bit moment {name!r} {shape} of the parameter of shape "
                    f"{tuple(p.shape)} would be split across {split.world} ranks at element {first}, not at a "
                    f"{BLOCKSIZE}-element block boundary of the whole tensor (rows of {row} elements, "
                    f"{split.chunk} rows per rank); shard it over a world size that splits it at blocks, "
                    f"route it full rank, or use the fp32 form"
                )

    def routing(self) -> list[dict[str, Any]]:
        """One row per parameter: group, index, name (when known), shape, projector and reason.

        The reason of a parameter its group routes ``'none'`` is the one the group's
        :class:`~coap_plugins.CoapPolicy` gave (``projection_reasons``), when there is one."""
        rows = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                proj, reason = self._route(p, group, i)
                rows.append(
                    {
                        "group": gi,
                        "index": i,
                        "name": names[i] if names else None,
                        "shape": tuple(p.shape),
                        "projector": proj,
                        "reason": reason,
                    }
                )
        return rows

    # -- external refresh driver -------------------------------------------------------------
    def drive_refreshes_externally(self, enabled: bool = True) -> None:
        """Stop (or resume) the optimizer's own refresh schedule; refreshes then happen only when
        :meth:`request_refresh` asks for them.  Saved in ``param_groups`` (so in checkpoints)."""
        for group in self.param_groups:
            group["schedule"] = "external" if enabled else "optimizer"

    def request_refresh(self, kind: Literal["correlation", "svd"]) -> None:
        """Run a refresh of ``kind`` on every projected parameter at the next :meth:`step`."""
        if kind not in ("correlation", "svd"):
            raise ValueError(f"Invalid refresh kind: {kind!r} (expected 'correlation' or 'svd')")
        for group in self.param_groups:
            group["pending_refresh"] = kind

    # -- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step for every parameter with a gradient.

        The flow, for the whole model at once: gather each group's parameters (full rank,
        projected, waiting for a first usable gradient); set the waiting ones up (one host sync
        for all of them, one more if a fast recalibration needs its fallback); project the
        same-shaped layers together (one batched product per stack on an accelerator, layer by
        layer on the CPU: :class:`_Batch`); run the refreshes that are due (no host sync for a
        correlation update, one for every recalibration of the step together); then the
        subclass's functional update: the full-rank tensors in one call per group, the
        projected moments of every layer in one pass, and the back-projections.  An ordinary
        step reads nothing back from the device.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.batched_products not in (None, True, False):
            raise ValueError(f"Invalid batched_products: {self.batched_products!r} (expected True, False or None)")
        self._local_states = []
        if self._in_backward is not None:
            self._in_backward.before_step()
        # in backward mode (see _backward) the layers stepped by the backward pass are done: the
        # rest (a step whose last micro-batch was not marked, accumulated cores) steps here
        seconds = self._run([(group, self._gather(group)) for group in self.param_groups])
        self.last_refresh_seconds, self._refresh_seconds = self._refresh_seconds + seconds, 0.0
        for p in self._stepped:
            p.grad = None  # DDP writes its bucket back after the hook stepped the layer
        self._stepped.clear()
        for group in self.param_groups:
            group["pending_refresh"] = "none"
        return loss

    def _run(self, work: list[tuple[dict[str, Any], _Plan]]) -> float:
        """Steps 1-4 of the flow for the gathered ``work`` (each group with its plan); returns
        the seconds its refreshes took."""
        self._set_up(work)
        start = time.perf_counter()
        fallbacks = SvdFallbacks()
        refreshing = []
        seconds = 0.0
        for group, plan in work:
            plan.batches = _batches(plan.projected, self.batched_products)
            for batch in plan.batches:
                batch.project(self._stacks)
                if batch.refresh != "none":
                    self._refresh_batch(group, batch, fallbacks)
                    refreshing.append((group, batch))
        if refreshing:
            fallbacks.resolve()  # the step's one host sync, only when it recalibrates
            for group, batch in refreshing:
                self._finish_refresh(group, batch)
            seconds = time.perf_counter() - start
        for group, plan in work:
            if plan.full:
                self._full_rank_update(group, *zip(*plan.full))
            if plan.batches:
                self._projected_update(group, plan.batches)
        for p, state, local, shard in self._local_states:
            write_back(state, local, shard.splits, shard.shapes, p)
        self._local_states = []
        return seconds

    def _gather(self, group: dict[str, Any], only: dict[int, tuple] | None = None) -> _Plan:
        """Sort a group's parameters with a gradient: full rank (state set up and step counted
        here), projected (step counted, refresh kind decided) or waiting for set-up.

        ``only`` (step in backward): the indices to step, each with its gradient and the core
        accumulated from earlier micro-batches (either may be ``None``); otherwise every
        parameter with a ``.grad`` or an accumulated core that the backward pass did not step."""
        plan = _Plan()
        schedule = None
        if group["schedule"] == "optimizer":
            schedule = ProjectionSchedule(group["update_interval"], group["reproject_factor"])
        if only is None:
            work = (
                (i, p, p.grad, self._accumulated.pop(p, None))
                for i, p in enumerate(group["params"])
                if p not in self._stepped
            )
        else:
            work = ((i, group["params"][i], grad, partial) for i, (grad, partial) in only.items())
        for i, p, grad, partial in work:
            if grad is None and partial is None:
                continue
            if grad is not None and grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p) or (grad is not None and torch.is_complex(grad)):
                raise RuntimeError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
            proj, _ = self._route(p, group, i)
            state = self.state[p]
            key, split, whole = p, None, None
            if is_dtensor(p):  # FSDP2: the step works on this rank's shard (see _sharded)
                shard = self._shard_plan(p, group, i)
                local = local_view(state, shard.splits, shard.shapes)
                self._local_states.append((p, state, local, shard))
                p, grad, state, proj = local_part(p), local_part(grad), local, shard.proj
                split, whole = shard.split, tuple(key.shape)
            g32 = grad if grad is None or grad.dtype == torch.float32 else grad.float()
            if proj is None:
                if not state:
                    state["step"] = 0
                    self._init_moments(state, tuple(p.shape), p, group, whole)
                state["step"] += 1
                plan.full.append((p, g32, state, split))
            elif not state or state["step"] == 0:
                plan.waiting.append(_Member(p, g32, state, proj, i, "none", key, split))
            else:
                refresh = group["pending_refresh"]
                if schedule is not None and refresh == "none":
                    refresh = schedule.refresh_at(state["step"] + 1)
                if partial is not None and refresh != "none":
                    raise RuntimeError(
                        f"{type(self).__name__}: a {refresh} refresh is due at step {state['step'] + 1} of a layer "
                        "whose micro-batches were accumulated in the projected space (the refresh needs the whole "
                        "gradient): call request_refresh before the step's first backward"
                    )
                state["step"] += 1
                plan.projected.append(_Member(p, g32, state, proj, i, refresh, key, split, partial))
        return plan

    # -- step in backward (driven by coap_plugins.optim.StepInBackward) -------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As :meth:`torch.optim.Optimizer.zero_grad`; in backward mode the cores accumulated
        over micro-batches (the gradients' projections) are dropped too."""
        self._accumulated.clear()
        super().zero_grad(set_to_none)

    def _accumulates_projected(self, p: torch.Tensor, group: dict[str, Any], index: int) -> bool:
        """Whether ``p``'s next step needs only ``G P`` (so micro-batches can be accumulated in
        the projected space): a projected, set-up layer, no refresh due at its next step, and no
        residual (``residual="scaled"`` applies the gradient outside the subspace)."""
        if group["residual"] != "none" or is_dtensor(p) or group["pending_refresh"] != "none":
            return False
        proj, _ = self._route(p, group, index)
        state = self.state.get(p)
        if proj is None or not state or state["step"] == 0:
            return False
        if group["schedule"] == "optimizer":
            schedule = ProjectionSchedule(group["update_interval"], group["reproject_factor"])
            return schedule.refresh_at(state["step"] + 1) == "none"
        return True

    @torch.no_grad()
    def _accumulate(self, p: torch.Tensor, group: dict[str, Any], index: int, grad: torch.Tensor) -> None:
        """Add ``grad``'s projection (with the projector in use) to ``p``'s accumulated core."""
        proj, _ = self._route(p, group, index)
        core, _ = proj.project(self.state[p], grad if grad.dtype == torch.float32 else grad.float())
        held = self._accumulated.get(p)
        self._accumulated[p] = core if held is None else held.add_(core)

    @torch.no_grad()  # a DDP bucket's step runs on the process group's thread
    def _step_one(
        self, p: torch.Tensor, group: dict[str, Any], index: int, grad: torch.Tensor | None, partial=None
    ) -> None:
        """The step of one parameter (its gradient ``grad`` and accumulated core ``partial``),
        with the arithmetic of :meth:`step`; the group's pending refresh stays for the others."""
        self._local_states = []
        # a backward pass may run under the caller's autocast: the step is fp32 as in step()
        with torch.autocast(p.device.type, enabled=False):
            self._refresh_seconds += self._run([(group, self._gather(group, {index: (grad, partial)}))])
        self._stepped.add(p)

    def _set_up(self, work: list[tuple[dict[str, Any], _Plan]]) -> None:
        """Projectors of the layers seeing their first gradient: one host sync decides which
        gradients are usable (finite, not all zero), one more resolves the recalibrations'
        fallbacks.  A layer whose gradient is unusable only takes weight decay (e.g. a block
        behind a zero-initialised norm) and waits for the next, with zeros in its state (step 0):
        the state has the same keys and shapes at every step, so a distributed checkpoint's
        template (which torch builds from one step on zero gradients) holds every layer.  A
        sharded layer decides on its whole gradient (a sum over its shard group)."""
        waiting = [(group, plan, m) for group, plan in work for m in plan.waiting]
        if not waiting:
            return
        bad = [(~torch.isfinite(m.grad)).any().float() for _, _, m in waiting]
        some = [(m.grad != 0).any().float() for _, _, m in waiting]
        splits = [m.split for _, _, m in waiting]
        summed = _sum_sharded(bad + some, splits + splits)  # one collective for both
        bad, some = summed[: len(bad)], summed[len(bad) :]
        flags = torch.stack([(b == 0) & (s > 0) for b, s in zip(bad, some)])
        usable = [True] * len(waiting) if bool(flags.all()) else flags.cpu().tolist()
        fallbacks = SvdFallbacks()
        for (group, plan, m), ok in zip(waiting, usable):
            whole = None if m.split is None else self._route(m.key, group, m.index)[0].moment_shape
            if not ok:
                self._decay_only(m.param, group, m.split)
                if not m.state:
                    for key, shape in m.proj.state_shapes().items():
                        m.state[key] = torch.zeros(shape, dtype=torch.float32, device=m.param.device)
                    self._init_moments(m.state, m.proj.moment_shape, m.param, group, whole)
                    m.state["step"] = 0
                continue
            names = group.get("param_names")
            seed = param_seed(group["seed"], tuple(m.key.shape), names[m.index] if names else None, m.index)
            m.proj.setup(m.state, m.grad, seed, fallbacks)
            self._init_moments(m.state, m.proj.moment_shape, m.param, group, whole)
            m.state["step"] = 1
            plan.projected.append(m)
        fallbacks.resolve()

    def _refresh_batch(self, group: dict[str, Any], batch: _Batch, fallbacks: SvdFallbacks) -> None:
        """The new projectors of a batch's layers (step 3 of the flow), left pending until the
        step's recalibration fallbacks are resolved.  A non-finite gradient shows in the
        projection, and so does one with nothing in the subspace (all zero, or orthogonal to P up
        to rounding): either keeps the old projector (an SVD of nothing would replace P by
        arbitrary unit vectors), decided on the device."""
        for j, m in enumerate(batch.members):
            core = batch.cores[j]
            energy = core.square().sum()
            total = torch.linalg.vector_norm(m.grad).square()
            if m.split is not None:  # decided on the whole gradient, the same on every rank
                if m.core_split is not None:
                    energy, total = m.split.sum(energy, total)
                else:
                    (total,) = m.split.sum(total)
            finite = torch.isfinite(energy)
            usable = finite & (energy > _EMPTY_PROJECTION * total)
            fallbacks.guard = usable
            new, cos = m.proj.refresh(
                m.state,
                m.grad,
                core,
                batch.ctx(j),
                batch.refresh,
                self._direction_moment(m.state, core),
                group["correlation_loss"],
                group["basis_alignment"],
                fallbacks,
            )
            batch.pending.append((finite, usable, total, new, cos))
        fallbacks.guard = None

    def _finish_refresh(self, group: dict[str, Any], batch: _Batch) -> None:
        """Lay the new projectors in (where they are usable and finite; the old ones stay
        otherwise), carry the moments over (``restore_state``), and project the batch again with
        ``P_t``: this step's update already uses the new basis, as Algorithm 1 does."""
        pending, batch.pending = batch.pending, []
        oks = []
        for m, (_, usable, _, new, _) in zip(batch.members, pending):
            ok = usable
            for key, t in new.items():
                total = t.sum()
                if key in m.proj.sharded_keys:  # finite on every rank, or on none
                    (total,) = m.split.sum(total)
                ok = ok & torch.isfinite(total)
            if group["restore_state"]:
                self._rotate_moments(m.state, m.proj, new, ok)
            for key, t in new.items():
                # contiguous, as a checkpoint loads it (LAPACK leaves column-major results, and the
                # products' rounding follows the layout: a resumed run would drift in the last bit)
                m.state[key] = torch.where(ok, t, m.state[key]).contiguous()
            oks.append(ok)
        batch.project(self._stacks)
        for m, core, ok, (finite, usable, total, _, cos) in zip(batch.members, batch.cores, oks, pending):
            tel = self._telemetry.setdefault(m.key, {})
            tel.update(refresh=batch.refresh, step=m.state["step"], outcome=(finite, usable, ok))
            # energy of G outside the subspace now in use (exact for an orthonormal projector);
            # the cosine term is the correlation loss's, at P_{t-1}
            energy = core.square().sum()
            if m.core_split is not None:
                (energy,) = m.split.sum(energy)
            recon = (1 - energy / total.clamp_min(1e-30)).clamp_min(0).sqrt()
            tel["recon_error"] = recon if "recon_error" not in tel else torch.where(ok, recon, tel["recon_error"])
            if cos is not None:
                tel["cos"] = cos if "cos" not in tel else torch.where(ok, cos, tel["cos"])
            elif "cos" in tel:
                # a recalibration: the last correlation update's cosine no longer describes P
                tel["cos"] = torch.where(ok, torch.full_like(tel["cos"], math.nan), tel["cos"])

    def _apply_batches(
        self,
        group: dict[str, Any],
        batches: list[_Batch],
        updates: list[torch.Tensor],
        cores: list[torch.Tensor],
        decay: float | torch.Tensor | None = None,
    ) -> None:
        """``p += s * back(u) + phi * (grad - back(core))`` for every projected parameter: ``u``
        (one per member, in batch order) is the step's update in the projected space, already
        scaled by its (negative) step size.

        ``s`` is the group's ``update_scale`` (``"auto"``: the projector's ``size_ratio``); the
        second term, with ``residual="scaled"``, is the part of the gradient outside the
        subspace at the step size the projected update has relative to its own gradient,
        ``phi = -|u| / max(|core|, 0.1 |grad|)`` (negative: ``u`` is a descent step; ``u`` may
        carry a tensor lr, and ``phi`` carries it too); ``cores`` are the members' projected
        gradients (the batches' ``core`` unbound).

        ``s U P^T + phi (G - G_p P^T) = (s U - phi G_p) P^T + phi G``: the norms, the scalings and
        ``phi G`` are one ``torch._foreach_*`` call each for all members; the back-projection is
        one batched product per batch, added in place into the weight of a single layer, else a
        ``(B, *shape)`` result (one batch at a time: the step's only weight-sized temporary)
        added with one foreach call.
        """
        phis = None
        scales = [b.proj.size_ratio if group["update_scale"] == "auto" else group["update_scale"] for b in batches]
        member_scales = [s for s, b in zip(scales, batches) for _ in b.members]
        if group["residual"] == "scaled":
            members = [m for b in batches for m in b.members]
            grads = [m.grad for m in members]
            norms = [torch.stack(torch._foreach_norm(t)) for t in (grads, updates, cores)]
            if any(m.split is not None for m in members):  # norms of the whole tensors, where split
                splits = [m.split for m in members] + [m.core_split for m in members] * 2
                squares = _sum_sharded(list(torch.cat(norms).square().unbind(0)), splits)  # one collective
                norms = list(torch.stack(squares).sqrt().split(len(members)))
            # the denominator is at least a tenth of the gradient's norm: a gradient the subspace
            # barely holds (|G P| -> 0) cannot blow the residual up past 10x the projected update
            floor = norms[0].mul_(_RESIDUAL_FLOOR).clamp_min_(1e-30)
            # negative: ``u`` carries the descent sign of its step size, the residual takes it too
            phi = norms[1].div_(torch.maximum(norms[2], floor).neg_())
            phis = phi.unbind(0)
            torch._foreach_mul_(updates, member_scales)
            torch._foreach_addcmul_(updates, cores, phis, value=-1.0)
        elif any(s != 1 for s in scales):
            torch._foreach_mul_(updates, member_scales)
        # batched layers: decay and residual as one foreach call each; layers multiplied one by
        # one (the CPU): decay, back-projection and residual together, while the weight is in cache
        flags = [b.batched for b in batches for _ in b.members]
        params = [m.param for b in batches for m in b.members]
        picked = [p for p, f in zip(params, flags) if f]
        if picked and decay is not None:
            torch._foreach_mul_(picked, decay)
        if picked and phis is not None:
            torch._foreach_addcmul_(
                picked, [g for g, f in zip(grads, flags) if f], [x for x, f in zip(phis, flags) if f]
            )
        offset = 0
        for b in batches:
            n = len(b.members)
            if b.batched:
                b.back_project(updates[offset : offset + n])
            else:
                for j, m in enumerate(b.members, start=offset):
                    if decay is not None:
                        m.param.mul_(decay)
                    b.proj.apply_update(m.param, updates[j], m.state, 1.0)
                    if phis is not None:
                        m.param.addcmul_(m.grad, phis[j])
            offset += n

    def _decay_only(self, p: torch.Tensor, group: dict[str, Any], split=None) -> None:
        if group["weight_decay"] != 0 and group["lr"] is not None:
            p.mul_(1 - group["lr"] * group["weight_decay"])

    def _init_moments(
        self, state: dict, shape: tuple[int, ...], p: torch.Tensor, group: dict, whole: tuple[int, ...] | None = None
    ) -> None:
        """Allocate the moments for a gradient (or core) of ``shape`` on ``p``'s device; ``whole``
        is the shape of the whole tensor when ``shape`` is a shard of it (the storage decides
        by the whole one)."""
        shapes = self._moment_shapes(shape, group)
        wholes = shapes if whole is None else self._moment_shapes(whole, group)
        for key, s in shapes.items():
            self._storage.allocate(state, key, s, p.device, wholes[key])

    # -- subclass hooks ----------------------------------------------------------------------
    def _moment_shapes(self, shape: tuple[int, ...], group: dict) -> dict[str, tuple[int, ...]]:
        """Logical (fp32) shapes of the moments for a (projected or full) gradient of ``shape``."""
        raise NotImplementedError

    def _direction_moment(self, state: dict, core: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _full_rank_update(self, group: dict, params: tuple, grads: tuple, states: tuple, splits: tuple) -> None:
        """The full-rank update of a group's unprojected parameters (steps already counted);
        ``splits``: how each one's rows are split across ranks (FSDP2), ``None`` where not."""
        raise NotImplementedError

    def _projected_update(self, group: dict, batches: list[_Batch]) -> None:
        """Moments of every projected parameter of the group from its batch's ``core``, then
        :meth:`_apply_batches`."""
        raise NotImplementedError

    def _rotate_moments(self, state: dict, proj: Projector, new: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        """Carry the moments into the new basis where ``ok`` (a 0-d bool), keep them otherwise."""
        raise NotImplementedError

    def _full_rank_equivalent_bytes(self, p: torch.Tensor, group: dict) -> int:
        raise NotImplementedError

    # -- checkpoints -------------------------------------------------------------------------
    def _expected_state_shapes(self, p: torch.Tensor, group: dict, index: int) -> dict[str, tuple[int, ...]]:
        proj, _ = self._route(p, group, index)
        moments = self._moment_shapes(tuple(p.shape) if proj is None else proj.moment_shape, group)
        shapes = {} if proj is None else dict(proj.state_shapes())
        for key, shape in moments.items():
            shapes.update(self._storage.state_shapes(key, shape))
        return shapes

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like :class:`torch.optim.Optimizer`, refusing a state that does not fit.

        COAP settings that decide shapes (projection kinds, ranks, ratios, size floor) must
        agree, and every saved tensor must have the shape this optimizer would build; the error
        says what differs.  Projectors and moments stay fp32 (torch would cast them to the
        dtype of bf16/fp16 parameters).
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for key in COAP_GROUP_KEYS:
                if key in saved and saved[key] != group[key]:
                    raise ValueError(
                        f"Cannot load optimizer state: param group {gi} was saved with {key}={saved[key]!r} "
                        f"but this optimizer has {key}={group[key]!r}"
                    )
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"Cannot load optimizer state: param group {gi} was saved with {len(saved['params'])} parameters, "
                    f"this optimizer has {len(group['params'])}"
                )
        saved_state = state_dict["state"]
        id_map = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                id_map[pid] = p
                st = saved_state.get(pid)
                if not st:
                    continue
                expected = self._expected_state_shapes(p, group, i)
                got = {k: tuple(v.shape) for k, v in st.items() if isinstance(v, torch.Tensor)}
                if got != expected:
                    where = f"param group {gi}, parameter {i} (shape {tuple(p.shape)})"
                    missing = sorted(set(expected) - set(got))
                    extra = sorted(set(got) - set(expected))
                    diffs = [
                        f"{k}: saved {got[k]}, expected {expected[k]}"
                        for k in expected
                        if k in got and got[k] != expected[k]
                    ]
                    parts = (
                        diffs + ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
                    )
                    raise ValueError(f"Cannot load optimizer state for {where}: " + "; ".join(parts))
        live_reasons = [g.get(PROJECTION_REASONS) for g in self.param_groups]
        super().load_state_dict(state_dict)  # its __setstate__ fills in keys an older state lacks
        for group, reasons in zip(self.param_groups, live_reasons):
            # a state saved without the policy's reasons (older versions) keeps this optimizer's
            if reasons is not None and PROJECTION_REASONS not in group:
                group[PROJECTION_REASONS] = reasons
        for pid, st in saved_state.items():
            p = id_map.get(pid)
            if p is None:
                continue
            live = self.state[p]
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and live[k].dtype != v.dtype:
                    live[k] = v.to(device=p.device, copy=True)
        self._telemetry.clear()
        self._stacks.clear()

    # -- telemetry ---------------------------------------------------------------------------
    def state_bytes(self, p: torch.Tensor | None = None, *, replicated: bool | None = None) -> int:
        """Bytes of optimizer state (projectors and moments) this process holds for ``p``, or in
        total.  Under FSDP2 a sharded tensor counts its local shard; ``replicated=True`` counts
        only the tensors every rank holds whole, ``False`` only the sharded ones."""
        params = [p] if p is not None else [q for g in self.param_groups for q in g["params"]]
        total = 0
        for q in params:
            for v in self.state.get(q, {}).values():
                if not isinstance(v, torch.Tensor):
                    continue
                if replicated is None or replicated != is_dtensor(v):
                    local = local_part(v)
                    total += local.numel() * local.element_size()
        return total

    def predicted_state_bytes(self, p: torch.Tensor | None = None) -> int:
        """Bytes of optimizer state ``p`` (or every parameter) will hold once it has received its
        first usable gradient: what :meth:`state_bytes` counts from then on, known before any step.

        Nothing is stepped and ``self.state`` is neither read nor written.  The parameter's
        routing (:meth:`routing`) gives its projector, whose ``projector_numel()`` counts the
        tensors its ``setup`` stores, in fp32 (they are computed from the fp32 gradient the step
        makes); the moments are allocated by the optimizer's own ``_init_moments`` (the storage
        decides fp32, or 8-bit codes plus absmax) into a scratch dict on the ``meta`` device, so
        no memory is used and the moment layout is the one the first step creates.  Refreshes
        replace tensors by ones of the same shapes, so the number holds for every later step too.

        Raises:
            ValueError: ``p`` is not a parameter of this optimizer.
        """
        shape_only = torch.empty(0, device="meta")  # _init_moments allocates on its device
        total, found = 0, False
        for group in self.param_groups:
            for i, q in enumerate(group["params"]):
                if p is not None and q is not p:
                    continue
                found = True
                proj, _ = self._route(q, group, i)
                moments: dict[str, torch.Tensor] = {}
                self._init_moments(moments, tuple(q.shape) if proj is None else proj.moment_shape, shape_only, group)
                total += sum(v.numel() * v.element_size() for v in moments.values())
                if proj is not None:
                    total += proj.projector_numel() * torch.float32.itemsize
        if p is not None and not found:
            raise ValueError(
                f"predicted_state_bytes: the tensor of shape {tuple(p.shape)} is not a parameter of this optimizer"
            )
        return total

    def full_rank_state_bytes(self) -> int:
        """Bytes of moments the full-rank counterpart (torch AdamW / Adafactor) would hold (on this
        rank, under FSDP2: its moments would be sharded like the parameters)."""
        return sum(self._full_rank_equivalent_bytes(local_part(p), g) for g in self.param_groups for p in g["params"])

    def _waiting(self, p: torch.Tensor) -> bool:
        state = self.state.get(p)
        return not state or state.get("step") == 0

    def waiting_parameters(self) -> list[str]:
        """Projected parameters still waiting for their first usable gradient (names when known)."""
        out = []
        for row in self.routing():
            p = self.param_groups[row["group"]]["params"][row["index"]]
            if row["projector"] is not None and self._waiting(p):
                out.append(row["name"] or f"group{row['group']}.param{row['index']}")
        return out

    def report_per_parameter_metrics(
        self, param: torch.Tensor, name: str, optimizer_metrics: dict[str, Any]
    ) -> dict[str, Any]:
        """Per-parameter COAP numbers for Composer's ``OptimizerMonitor`` (which calls this hook
        when present): ``coap/state_bytes/<name>`` and, after a refresh,
        ``coap/reconstruction_error/<name>`` and ``coap/cosine/<name>``."""
        if self.state.get(param):
            optimizer_metrics[f"coap/state_bytes/{name}"] = self.state_bytes(param)
            tel = self.last_refresh(param) or {}
            if "recon_error" in tel:
                optimizer_metrics[f"coap/reconstruction_error/{name}"] = tel["recon_error"]
            if "cos" in tel:
                optimizer_metrics[f"coap/cosine/{name}"] = tel["cos"]
        return optimizer_metrics

    def last_refresh(self, param: torch.Tensor) -> dict[str, Any] | None:
        """What the last refresh of ``param`` did, or ``None`` before its first: ``refresh`` (the
        kind, or ``"skipped (non-finite)"`` / ``"skipped (zero projected gradient)"`` when the old
        projector was kept), ``step``, and when known ``recon_error`` (energy of the gradient
        outside the subspace in use, relative) and ``cos`` (the correlation update's direction
        term).  The step keeps these on the device; this reads them back (call it when you log)."""
        tel = self._telemetry.get(param)
        if not tel or "refresh" not in tel:
            return None
        finite, usable, ok = (bool(t) for t in torch.stack(list(tel["outcome"])).tolist())
        label = tel["refresh"]
        if not finite or (usable and not ok):
            label = "skipped (non-finite)"
        elif not usable:
            label = "skipped (zero projected gradient)"
        out: dict[str, Any] = {"refresh": label, "step": tel["step"]}
        for key in ("recon_error", "cos"):
            if key in tel and math.isfinite(value := float(tel[key])):
                out[key] = value
        return out

    def coap_report(self) -> dict[str, Any]:
        """Totals and per-parameter telemetry (reads device scalars: call it when you log).

        Bytes are this process's: under FSDP2 ``state_bytes`` counts the local shards of the
        sharded tensors plus the replicated ones, which ``replicated_state_bytes`` counts alone
        (every rank holds them whole: see :mod:`coap_plugins.optim._sharded` for which they are),
        and ``full_rank_bytes`` what the full-rank optimizer would hold on this rank."""
        layers = []
        for row in self.routing():
            p = self.param_groups[row["group"]]["params"][row["index"]]
            tel = self.last_refresh(p) or {}
            entry = {
                "name": row["name"] or f"group{row['group']}.param{row['index']}",
                "shape": row["shape"],
                "projector": row["projector"].kind if row["projector"] is not None else "none",
                "reason": row["reason"],
                "state_bytes": self.state_bytes(p),
                "full_rank_bytes": self._full_rank_equivalent_bytes(local_part(p), self.param_groups[row["group"]]),
                "replicated_state_bytes": self.state_bytes(p, replicated=True) if is_dtensor(p) else 0,
                "waiting": row["projector"] is not None and self._waiting(p),
            }
            if "refresh" in tel:
                entry["last_refresh"] = tel["refresh"]
                entry["last_refresh_step"] = tel["step"]
                for k in ("recon_error", "cos"):
                    if k in tel:
                        entry[k] = tel[k]
            layers.append(entry)
        total = sum(e["state_bytes"] for e in layers)
        full = sum(e["full_rank_bytes"] for e in layers)
        return {
            "state_bytes": total,
            "replicated_state_bytes": sum(e["replicated_state_bytes"] for e in layers),
            "full_rank_bytes": full,
            "state_ratio": total / full if full else math.nan,
            "waiting": [e["name"] for e in layers if e["waiting"]],
            "last_refresh_seconds": self.last_refresh_seconds,
            "layers": layers,
        }
