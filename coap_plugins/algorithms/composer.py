"""Composer adapter: :class:`CoapAlgorithm` and its functional form :func:`apply_coap`.

The only module of the package that imports Composer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..driver import DrivenAdapter, RefreshDriver
from ..optim import CoapOptimizer, StepInBackward
from ..settings import CoapSettings, takes_settings
from ..telemetry import refresh_metrics, routing_summary, routing_table
from ..translate import (
    build_optimizer,
    find_coap_optimizers,
    rebind_lr_scheduler,
    remember_routing,
    reroute_groups,
    translate_optimizer,
)

try:
    from composer.core import Algorithm, Event, State
    from composer.loggers import Logger
    from composer.optim import DecoupledSGDW
except ImportError as e:  # pragma: no cover - exercised only without composer
    raise ImportError(
        "coap_plugins.algorithms.composer needs MosaicML Composer: pip install 'coap-plugins[composer]'"
    ) from e

__all__ = ["CoapAlgorithm", "apply_coap"]

log = logging.getLogger(__name__)

_FRESH_CHOICES = ("error", "fresh")


def _is_composer_default_sgd(optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
    """Composer's stand-in for ``optimizers=None``: ``DecoupledSGDW(model.parameters(), lr=0.1)``."""
    if not isinstance(optimizer, DecoupledSGDW) or len(optimizer.param_groups) != 1:
        return False
    g = optimizer.param_groups[0]
    defaults = dict(lr=0.1, momentum=0, dampening=0, weight_decay=0, nesterov=False)
    if any(g.get(k) != v for k, v in defaults.items()):
        return False
    return [id(p) for p in g["params"]] == [id(p) for p in model.parameters()]


def apply_coap(
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
    schedulers: Any = None,
    **settings: Any,
) -> Any:
    """Replace ``optimizers`` by their COAP counterparts (the functional form of :class:`CoapAlgorithm`).

    Param groups are kept one-to-one; torch ``LRScheduler`` objects in ``schedulers`` that were
    bound to a replaced optimizer are re-bound to its replacement.  With ``optimizers=None`` a
    COAP optimizer is built from the settings (``lr``, ``betas``, ``eps``, ``weight_decay``).
    The returned optimizers run their own refresh schedule (``update_interval``,
    ``reproject_factor``) as plain torch optimizers do.

    Args:
        model: the model whose parameters the optimizers hold.
        optimizers: an optimizer, a sequence of them, or None.
        schedulers: torch LR schedulers to re-bind (default None).
        **settings: any :class:`~coap_plugins.algorithms.CoapSettings` field.

    Returns:
        The new optimizer(s), in the shape ``optimizers`` was given (one, list or tuple).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> opt = apply_coap(model, opt, rank_ratio_matrix=4, update_interval=32)
        >>> type(opt).__name__
        'CoapAdamW'
    """
    cfg = CoapSettings.from_arguments("apply_coap", **settings)
    if optimizers is None:
        return build_optimizer(model, cfg)
    single = isinstance(optimizers, torch.optim.Optimizer)
    olds = [optimizers] if single else list(optimizers)
    news = [translate_optimizer(o, model, cfg, adapter="apply_coap") for o in olds]
    for sched in (
        [schedulers] if schedulers is not None and not isinstance(schedulers, (list, tuple)) else (schedulers or [])
    ):
        for old, new in zip(olds, news):
            rebind_lr_scheduler(sched, old, new)
    if single:
        return news[0]
    return type(optimizers)(news) if isinstance(optimizers, (list, tuple)) else news


def _num_samples(batch: Any) -> int | None:
    """Samples in a (micro-)batch as Composer's default data spec counts them (the first
    dimension of its tensors); ``None`` when it cannot tell."""
    from composer.core import DataSpec

    try:
        return int(DataSpec._default_get_num_samples_in_batch(None, batch))  # type: ignore[arg-type]
    except Exception:
        return None


class CoapAlgorithm(DrivenAdapter, Algorithm):
    """Train with COAP: the Trainer's AdamW/Adafactor becomes its low-rank projected counterpart.

    At ``Event.INIT`` every optimizer in ``state.optimizers`` is replaced (AdamW, Adam and
    Composer's DecoupledAdamW -> CoapAdamW, Adafactor -> CoapAdafactor, 8-bit forms with
    ``eight_bit=True``), keeping the user's param groups one-to-one; torch LR schedulers bound
    to the old optimizer are re-bound at ``Event.BEFORE_LOAD`` (schedulers passed to ``fit`` at
    ``Event.FIT_START``).  With ``optimizers=None`` (Composer's default ``DecoupledSGDW``) a
    COAP optimizer is built from ``lr``, ``betas``, ``eps``, ``weight_decay``.

    Module surgery may run before or after this algorithm (``[BlurPool(), CoapAlgorithm()]`` and
    ``[CoapAlgorithm(), BlurPool()]`` train alike): the per-parameter routing is re-derived from
    the parameters the groups hold at ``Event.BEFORE_LOAD`` (so a checkpoint's routing compares
    equal on load; the routing is logged then) and again at ``Event.FIT_START``.

    The algorithm owns the projection schedule: at ``Event.AFTER_TRAIN_BATCH`` (complete,
    unscaled, all-reduced gradient, before the step) it requests the correlation update or the
    SVD recalibration when due, once per optimizer step whatever the gradient accumulation.
    COAP optimizers are found behind optimizer wrappers (Composer's ``SAM`` wraps the optimizer
    in a ``SAMOptimizer`` at ``Event.AFTER_LOAD``; any wrapper keeping the optimizer in
    ``base_optimizer``, ``optimizer``, ``optim`` or ``_optimizer``); when none can be found the
    batch raises.  ``refreshes`` lists only the refreshes an optimizer step ran (a request that
    no step consumed, e.g. a step skipped by the AMP scaler, is withdrawn with a warning).
    Each refresh logs ``coap/state_bytes``, ``coap/full_rank_state_bytes``, ``coap/state_ratio``,
    ``coap/reconstruction_error``, ``coap/cosine`` (correlation updates) and
    ``coap/refresh_seconds``; the per-layer routing is logged once as hyperparameters.

    Projectors ride in the optimizer state of Composer checkpoints, the schedule position in
    this algorithm's state.  Composer does not re-create this algorithm when loading: pass it
    again when resuming.  Resuming a checkpoint written without it (its AdamW state would be
    skipped by Composer with only a warning) raises, unless ``on_foreign_checkpoint="fresh"``,
    which starts the COAP state from scratch and logs ``coap/fresh_start``; so does resuming a
    checkpoint that holds no state of the COAP optimizer (one written with ``SAM``: Composer
    saves the ``SAMOptimizer`` wrapper, whose state does not include the optimizer it wraps).

    FSDP2 (``parallelism_config={"fsdp": FSDP2Config(...)}``) is supported: Composer shards the
    model after ``Event.INIT`` and re-binds the COAP optimizer to the sharded (DTensor)
    parameters, whose steps then run on each rank's shard (see :mod:`coap_plugins.optim._sharded`);
    both of its checkpoint types (``state_dict_type="sharded"`` and ``"full"``) carry the COAP
    state.  FSDP1 (flat parameters) and tensor parallelism are refused.

    ``step_in_backward=True`` runs each parameter's update inside the backward pass of the
    batch's last micro-batch and frees its gradient (:class:`~coap_plugins.optim.StepInBackward`;
    under DDP after its bucket is reduced, ``backward_reduce`` saying how).  The refresh due is
    then requested at ``Event.BEFORE_TRAIN_BATCH``; the last micro-batch is the one whose samples
    complete the batch (counted as Composer counts them; a batch it cannot count steps in
    ``optimizer.step()``, as the normal mode does).  Refused at ``Event.FIT_START``, as they need
    every gradient before any step or re-run micro-batches: ``GradientClipping``, ``amp_fp16``
    (the GradScaler), automatic micro-batching, an optimizer wrapper (``SAM``) and FSDP2.

    Args:
        optimizer: ``"auto"`` (translate the user's optimizer) or a COAP optimizer name to use
            whatever the user passed, keeping its groups' lr and weight decay (default ``"auto"``).
        **settings: every other :class:`~coap_plugins.settings.CoapSettings` field, declared and
            validated there once (``eight_bit``, ``rank``, ``rank_ratio_matrix``,
            ``rank_ratio_conv`` or its alias ``rank_ratio_cnn``, ``min_conv_numel``, ``exclude``,
            ``policy``, ``update_interval``, ``reproject_factor``, ``restore_state``,
            ``basis_alignment``, ``correlation_loss``, ``update_scale``, ``residual``, ``seed``, and
            ``lr``, ``betas``, ``eps``, ``weight_decay`` for when there is no user optimizer);
            ``inspect.signature`` lists them with their types and defaults.
        on_foreign_checkpoint: ``"error"`` or ``"fresh"`` when resuming a checkpoint written
            without CoapAlgorithm, or one whose optimizer state Composer could not restore into
            the COAP optimizer (written with ``SAM``, which saves its wrapper's state only)
            (default ``"error"``).

    Example:
        .. testcode::

            import torch
            from composer import Trainer
            from composer.models import ComposerClassifier
            from coap_plugins.algorithms import CoapAlgorithm
            from coap_plugins.examples import SmallCNN, load_digits_tensors

            data = load_digits_tensors(size=16)
            loader = torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=64)
            model = ComposerClassifier(SmallCNN(), num_classes=10)
            trainer = Trainer(model=model, train_dataloader=loader, max_duration="20ba",
                              optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
                              algorithms=[CoapAlgorithm(rank_ratio_conv=4, update_interval=8)])
            trainer.fit()
    """

    @takes_settings
    def __init__(self, optimizer: str = "auto", *, on_foreign_checkpoint: str = "error", **settings: Any) -> None:
        self.settings = CoapSettings.from_arguments("CoapAlgorithm", optimizer=optimizer, **settings)
        if on_foreign_checkpoint not in _FRESH_CHOICES:
            raise ValueError(f"Invalid on_foreign_checkpoint: {on_foreign_checkpoint!r} (expected 'error' or 'fresh')")
        self.on_foreign_checkpoint = on_foreign_checkpoint
        self.driver = RefreshDriver(self.settings)
        self._replaced: list[tuple[torch.optim.Optimizer, CoapOptimizer]] = []
        self._remembered_routing: dict[
            int, dict[int, str]
        ] = {}  # id(optimizer) -> kinds, for optimizers the user built
        self._stepped = False  # this batch's position advanced (SAM runs AFTER_TRAIN_BATCH once per closure)
        self._routing_logged = False
        self._hooks: list[StepInBackward] = []  # step_in_backward: one per COAP optimizer
        self._samples: list[int | None] = [None, 0]  # the batch's samples, and those of its micro-batches so far

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"CoapAlgorithm(optimizer={s.optimizer!r}, eight_bit={s.eight_bit}, update_interval={s.interval}, "
            f"reproject_factor={s.reproject_factor}, policy={s.policy!r})"
        )

    @staticmethod
    def required_on_load() -> bool:
        return False

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd.update(self.driver.state_dict())
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.driver.load_state_dict(state)

    # -- events ------------------------------------------------------------------------------
    def match(self, event: Event, state: State) -> bool:
        return event in (
            Event.INIT,
            Event.BEFORE_LOAD,
            Event.AFTER_LOAD,
            Event.FIT_START,
            Event.BEFORE_TRAIN_BATCH,
            Event.BEFORE_BACKWARD,
            Event.AFTER_TRAIN_BATCH,
            Event.BATCH_END,
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._swap(state, logger)
        elif event == Event.BEFORE_LOAD:
            self._reroute(state)
            self._log_routing(logger)
            self._rebind(state)
        elif event == Event.AFTER_LOAD:
            self._after_load(state, logger)
        elif event == Event.FIT_START:
            self._check_parallelism(state)
            self._reroute(state)
            self._log_routing(logger)
            self._rebind(state)
            if self.settings.step_in_backward:
                self._step_in_backward(state)
        elif event == Event.BEFORE_TRAIN_BATCH:
            if self._hooks:  # the refresh is known before the first backward pass
                self._check_reachable(state)
                for i in range(len(self.driver.optimizers)):
                    self.driver.before_step(i)
                self._stepped = True
                self._samples = [_num_samples(state.batch), 0]
                for hooks in self._hooks:
                    hooks.stepping = False
        elif event == Event.BEFORE_BACKWARD:
            if self._hooks and self._samples[0] is not None:
                self._samples[1] += _num_samples(state.batch) or 0
                last = self._samples[1] >= self._samples[0]
                for hooks in self._hooks:
                    hooks.stepping = last
        elif event == Event.AFTER_TRAIN_BATCH:
            if not self._stepped:
                self._check_reachable(state)
                for i in range(len(self.driver.optimizers)):
                    self.driver.before_step(i)
                self._stepped = True
        elif event == Event.BATCH_END:
            self._stepped = False
            ran, withdrawn = self.driver.after_batch()
            if ran:
                logger.log_metrics(refresh_metrics(ran))
            for opt, step, kind in withdrawn:
                log.warning(
                    "CoapAlgorithm: the %s refresh of step %d did not run on %s (its step was skipped); withdrawn",
                    kind,
                    step,
                    type(opt).__name__,
                )

    def _check_parallelism(self, state: State) -> None:
        fsdp = getattr(state, "fsdp_config", None)
        if fsdp is not None and type(fsdp).__name__ != "FSDP2Config":
            raise ValueError(
                f"CoapAlgorithm supports FSDP2, not FSDP1 (got {type(fsdp).__name__}: its flat parameters hide the "
                "weights' shapes the projectors need): pass parallelism_config={'fsdp': FSDP2Config(...)} "
                "(from composer.utils.parallelism), use DDP, or remove CoapAlgorithm"
            )
        if fsdp is not None and len(state.optimizers) > 1:
            raise ValueError(
                f"CoapAlgorithm under FSDP2 needs a single optimizer (got {len(state.optimizers)}): Composer "
                "re-binds only the first one to the sharded parameters"
            )
        if getattr(state, "tp_config", None) is not None:
            raise ValueError("CoapAlgorithm does not support tensor parallelism: remove parallelism_config['tp']")

    def _step_in_backward(self, state: State) -> None:
        """Refuse what cannot step inside backward, then hook every COAP optimizer in."""
        if self._hooks:
            return  # a second fit on the same trainer
        from composer.algorithms import GradientClipping
        from composer.core import Precision

        why = None
        if any(isinstance(a, GradientClipping) for a in state.algorithms):
            why = "GradientClipping clips by the norm of every gradient, which needs them all before any step"
        elif state.precision == Precision.AMP_FP16:
            why = "precision='amp_fp16' unscales every gradient and may skip the step (GradScaler) after backward"
        elif state.auto_microbatching:
            why = "device_train_microbatch_size='auto' re-runs micro-batches after an out-of-memory error"
        elif getattr(state, "fsdp_config", None) is not None:
            why = "FSDP2 reduce-scatters the gradients after the backward pass"
        elif any(not isinstance(o, CoapOptimizer) for o in state.optimizers):
            names = ", ".join(type(o).__name__ for o in state.optimizers)
            why = (
                f"an optimizer is not a COAP optimizer (a wrapper, or another optimizer: {names}): its step "
                "(SAM's two passes) cannot run per parameter"
            )
        if why is not None:
            raise ValueError(f"CoapAlgorithm(step_in_backward=True): {why}; remove it, or set step_in_backward=False")
        from torch.nn.parallel import DistributedDataParallel

        ddp = state.model if isinstance(state.model, DistributedDataParallel) else None
        self._hooks = [
            StepInBackward(o, ddp, reduce=self.settings.backward_reduce, accumulate=self.settings.backward_accumulate)
            for o in self.driver.optimizers
        ]

    def _check_reachable(self, state: State) -> None:
        found = find_coap_optimizers(state.optimizers)
        if not any(o is opt for o in found for opt in self.driver.optimizers):
            names = ", ".join(type(o).__name__ for o in state.optimizers) or "none"
            raise RuntimeError(
                f"CoapAlgorithm found no COAP optimizer in state.optimizers ({names}), not even behind a wrapper's "
                "base_optimizer / optimizer / optim / _optimizer: something replaced the optimizer CoapAlgorithm "
                "built, and no projector would be refreshed. Remove the algorithm that rebuilds the optimizer, or "
                "CoapAlgorithm"
            )

    def _reroute(self, state: State) -> None:
        # module surgery after the swap (BlurPool listed after this algorithm) replaces parameters
        # inside the groups: re-derive the per-parameter routing from what the groups hold now
        assert self.settings.policy is not None
        for old, new in self._replaced:
            reroute_groups(
                new,
                state.model,
                self.settings.policy,
                own_routing=old is new,
                remembered=self._remembered_routing.get(id(new)),
            )

    def _swap(self, state: State, logger: Logger) -> None:
        self._check_parallelism(state)
        model = state.model
        new_opts = []
        for old in state.optimizers:
            if isinstance(old, CoapOptimizer):
                new = old  # the user's own routing: kept; parameters that surgery adds are routed by the policy
                self._remembered_routing[id(new)] = remember_routing(new)
            elif _is_composer_default_sgd(old, model):
                log.info(
                    "CoapAlgorithm: no optimizer was given; building %s(lr=%s)",
                    self.settings.optimizer_class("adamw").__name__,
                    self.settings.lr,
                )
                new = build_optimizer(model, self.settings)
            else:
                new = translate_optimizer(old, model, self.settings, adapter="CoapAlgorithm")
            self._replaced.append((old, new))
            new_opts.append(new)
        if not new_opts:
            raise ValueError("CoapAlgorithm found no optimizer to replace (the model has no trainable parameters?)")
        self.driver.bind(new_opts)
        state.optimizers = new_opts

    def _rebind(self, state: State) -> None:
        for sched in state.schedulers:
            for old, new in self._replaced:
                if old is not new:
                    rebind_lr_scheduler(sched, old, new)

    def _after_load(self, state: State, logger: Logger) -> None:
        resumed = int(state.timestamp.batch) > 0
        mine = [type(new).__name__ for _, new in self._replaced]
        if self.driver.loaded is not None:
            self.driver.check_compatible()
            if self.steps > 0 and not any(new.state for _, new in self._replaced):
                self._lost_state(logger, mine)
        elif resumed:
            if self.on_foreign_checkpoint == "error":
                raise ValueError(
                    f"The checkpoint was written without CoapAlgorithm (at batch {int(state.timestamp.batch)}): "
                    "its optimizer "
                    f"state does not belong to {', '.join(mine)} and Composer would drop it with only a warning. "
                    "Resume "
                    "without CoapAlgorithm, load only the weights (load_weights_only=True), or pass "
                    "CoapAlgorithm(on_foreign_checkpoint='fresh') to start the COAP optimizer state from scratch"
                )
            log.warning(
                "CoapAlgorithm: the checkpoint has no COAP state; starting the optimizer state fresh at batch %d",
                int(state.timestamp.batch),
            )
            logger.log_hyperparameters({"coap/fresh_start": True, "coap/fresh_start_batch": int(state.timestamp.batch)})

    def _lost_state(self, logger: Logger, mine: list[str]) -> None:
        # e.g. SAM: Composer saves the SAMOptimizer wrapper's state_dict, which holds none of the
        # wrapped optimizer's moments and projectors, and skips the missing CoapAdamW with a warning
        msg = (
            f"The checkpoint was written after {self.steps} COAP step(s) but Composer restored no state into "
            f"{', '.join(mine)}: it was saved under another optimizer (such as SAM's SAMOptimizer, whose checkpoints "
            "do not hold the state of the optimizer it wraps), so the moments and projectors would restart from scratch"
        )
        if self.on_foreign_checkpoint == "error":
            raise ValueError(msg + ". Pass CoapAlgorithm(on_foreign_checkpoint='fresh') to accept that")
        log.warning("CoapAlgorithm: %s; starting them fresh at step %d", msg, self.steps)
        logger.log_hyperparameters({"coap/fresh_start": True, "coap/fresh_start_batch": self.steps})

    # -- logging -----------------------------------------------------------------------------
    def _log_routing(self, logger: Logger) -> None:
        if self._routing_logged:
            return
        optimizers = [opt for _, opt in self._replaced]
        log.info(routing_summary(optimizers))
        logger.log_hyperparameters(routing_table(optimizers))
        self._routing_logged = True
