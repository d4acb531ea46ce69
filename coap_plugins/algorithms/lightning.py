"""Lightning adapter: :class:`CoapCallback`.

The only module of the package that imports Lightning.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..driver import DrivenAdapter, RefreshDriver
from ..optim import CoapOptimizer, StepInBackward
from ..settings import CoapSettings, takes_settings
from ..telemetry import refresh_metrics, routing_summary, routing_table
from ..translate import build_optimizer, find_coap_optimizers, rebind_lr_scheduler, translate_optimizer

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.rank_zero import rank_zero_info
    from typing_extensions import override
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        "coap_plugins.algorithms.lightning needs PyTorch Lightning: pip install 'coap-plugins[lightning]'"
    ) from e

__all__ = ["CoapCallback"]

log = logging.getLogger(__name__)

# strategies that shard parameters or gradients in their own formats (FSDP1's flat parameters,
# DeepSpeed's partitions): the projectors need the weights' shapes.  ModelParallelStrategy with
# FSDP2's ``fully_shard`` (DTensor parameters) is the supported sharded path.
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")
_MISSING = object()


class CoapCallback(DrivenAdapter, Callback):
    """Train with COAP: the AdamW/Adafactor that ``configure_optimizers`` returns becomes its
    low-rank projected counterpart.

    At ``setup`` (stage ``"fit"``) the callback wraps the LightningModule's
    ``configure_optimizers``: every optimizer it returns is replaced (AdamW, Adam -> CoapAdamW,
    Adafactor -> CoapAdafactor, 8-bit forms with ``eight_bit=True``) keeping the param groups
    one-to-one, and every LR scheduler bound to a replaced optimizer (``StepLR``, ``OneCycleLR``,
    ``LambdaLR``, ... in any form Lightning accepts: list, tuple, dict, ``lr_scheduler`` config
    dict) is re-bound to the replacement, so Lightning steps it as before.  Wrapping at ``setup``
    rather than swapping ``trainer.strategy.optimizers`` at ``on_fit_start``: the strategy calls
    ``configure_optimizers`` after DDP has wrapped the model, so every strategy and precision
    plugin is handed the COAP optimizer from the start (nothing holds a stale reference), and
    Lightning restores the checkpoint's optimizer state into it; it also composes with
    LightningCLI, which patches ``configure_optimizers`` from its YAML first.  When
    ``configure_optimizers`` returns ``None`` a COAP optimizer is built from ``lr``, ``betas``,
    ``eps``, ``weight_decay``.  The original method is put back at ``teardown`` (or when fit
    raises).

    The callback owns the projection schedule: at ``on_before_optimizer_step`` (complete,
    unscaled, all-reduced gradient, once per optimizer step whatever ``accumulate_grad_batches``)
    it requests the correlation update or the SVD recalibration when due.  An optimizer wrapper
    that ``configure_optimizers`` returns around a COAP optimizer the user built (a SAM-like
    ``torch.optim.Optimizer`` keeping it in ``base_optimizer``, ``optimizer``, ``optim`` or
    ``_optimizer``) is kept, and the COAP optimizer inside it driven.  ``refreshes`` lists only
    the refreshes an optimizer step ran: a request no step consumed (a step skipped by the AMP
    scaler or by a wrapper) is withdrawn at the end of the batch with a warning.  After each
    batch with a refresh it logs ``coap/state_bytes``, ``coap/full_rank_state_bytes``,
    ``coap/state_ratio``, ``coap/reconstruction_error``, ``coap/cosine`` (correlation updates) and
    ``coap/refresh_seconds`` to every logger of the Trainer; the per-layer routing is logged once
    as hyperparameters.

    Projectors ride in the optimizer state of Lightning checkpoints, the schedule position in
    this callback's state, under a ``state_key`` made of ``optimizer``, ``eight_bit``,
    ``update_interval`` and ``reproject_factor``: resuming with ``ckpt_path`` continues bit for
    bit.  Resuming needs the callback again with those four settings unchanged (a checkpoint
    written with other ones, or without CoapCallback, is refused with what differs).  One
    CoapCallback per Trainer (Lightning itself refuses two with equal settings, as their state
    keys collide).

    Sharded training: ``ModelParallelStrategy`` with FSDP2's ``fully_shard`` applied in
    ``configure_model`` (over ``self.device_mesh["data_parallel"]``, a 1-D mesh): the optimizer is
    built over the sharded (DTensor) parameters, each rank steps its shard, and distributed
    checkpoints carry the COAP state.  ``FSDPStrategy`` (FSDP1) and ``DeepSpeedStrategy`` are
    refused.

    ``step_in_backward=True`` runs each parameter's update inside the backward pass of the last
    batch of an accumulation window and frees its gradient
    (:class:`~coap_plugins.optim.StepInBackward`; under DDP after its bucket is reduced,
    ``backward_reduce`` saying how); the window's earlier batches accumulate, in the projected
    space where a layer's step needs only ``G P``.  The refresh due is then requested at the
    window's first ``on_train_batch_start``.  Refused at ``setup``, as they need every gradient
    before any step: ``gradient_clip_val``, ``precision="16-mixed"`` (the GradScaler), manual
    optimization, an optimizer wrapper, and sharded strategies (FSDP2 included).

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

    Raises:
        MisconfigurationException: a setting is invalid (at construction), the optimizer cannot
            be translated, the strategy shards parameters, or the checkpoint does not fit.

    Example:
        .. code-block:: python

            import lightning.pytorch as pl
            from coap_plugins.algorithms import CoapCallback

            trainer = pl.Trainer(max_epochs=3, callbacks=[CoapCallback(rank_ratio_conv=4, update_interval=8)])
            trainer.fit(model, train_loader)  # model.configure_optimizers returns AdamW (+ a scheduler)
    """

    @takes_settings
    def __init__(self, optimizer: str = "auto", **settings: Any) -> None:
        try:
            self.settings = CoapSettings.from_arguments("CoapCallback", optimizer=optimizer, **settings)
        except ValueError as e:
            raise MisconfigurationException(str(e)) from e
        self.driver = RefreshDriver(self.settings, adapter="CoapCallback")
        self._replaced: list[tuple[torch.optim.Optimizer | None, CoapOptimizer]] = []
        self._module: pl.LightningModule | None = None
        self._original: Any = _MISSING
        self._routing_logged = False
        self._hooks: list[StepInBackward] = []  # step_in_backward: one per COAP optimizer
        self._window = False  # step_in_backward: an accumulation window has requested its refresh
        self._step_ran = False

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"CoapCallback(optimizer={s.optimizer!r}, eight_bit={s.eight_bit}, update_interval={s.interval}, "
            f"reproject_factor={s.reproject_factor}, policy={s.policy!r})"
        )

    # -- state -------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        # the settings a checkpoint must agree with, so two differently configured instances do not
        # collide in Lightning's callback states (and one is told apart from the other on resume)
        return self._generate_state_key(**self._identity())

    def _identity(self) -> dict[str, Any]:
        s = self.settings
        return dict(
            optimizer=s.optimizer,
            eight_bit=s.eight_bit,
            update_interval=s.interval,
            reproject_factor=s.reproject_factor,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.driver.state_dict(), **self._identity()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.driver.load_state_dict(state_dict)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # load_state_dict follows
        coap = {k: v for k, v in states.items() if str(k).startswith(type(self).__qualname__)}
        if not coap:
            raise MisconfigurationException(
                f"The checkpoint {trainer.ckpt_path} was written without CoapCallback: its optimizer state does not "
                "belong to a COAP optimizer. Resume without CoapCallback, or load only the weights "
                "(LightningModule.load_from_checkpoint) and start a new fit"
            )
        saved = next(iter(coap.values()))
        diff = [f"{k}={saved[k]!r} (here {v!r})" for k, v in self._identity().items() if k in saved and saved[k] != v]
        raise MisconfigurationException(
            f"The checkpoint was written by a CoapCallback with {', '.join(diff) or next(iter(coap))}: "
            "resume with the same optimizer, eight_bit, update_interval and reproject_factor"
        )

    # -- setup: wrap configure_optimizers ----------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        others = [c for c in trainer.callbacks if isinstance(c, CoapCallback) and c is not self]
        if others:
            raise MisconfigurationException(
                f"The Trainer has {len(others) + 1} CoapCallbacks; one replaces every optimizer that "
                "configure_optimizers returns: keep one"
            )
        strategy = type(trainer.strategy)
        sharded = [c.__name__ for c in strategy.__mro__ if c.__name__ in _SHARDED_STRATEGIES]
        if sharded:
            raise MisconfigurationException(
                f"CoapCallback does not support {sharded[0]} (strategy {strategy.__name__}): its sharded parameters "
                "hide the weights' shapes the projectors need. Shard with FSDP2 instead: "
                "strategy=ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) and fully_shard in "
                "configure_model; or use strategy='ddp' (or a single device), or remove CoapCallback"
            )
        if self.settings.step_in_backward:
            self._check_step_in_backward(trainer, pl_module)
        current = pl_module.configure_optimizers
        owner = getattr(current, "_coap_callback", None)
        if owner is self:
            return  # already wrapped (setup called again on the same module)
        if owner is not None:
            raise MisconfigurationException(
                "configure_optimizers is already wrapped by another CoapCallback: use one CoapCallback per "
                "LightningModule"
            )
        self._module = pl_module
        self._original = pl_module.__dict__.get("configure_optimizers", _MISSING)
        self._replaced = []

        def configure_optimizers() -> Any:
            return self._swap(current(), pl_module)

        configure_optimizers._coap_callback = self  # type: ignore[attr-defined]
        pl_module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]

    def _check_step_in_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        why = None
        if trainer.gradient_clip_val:
            why = (
                f"gradient_clip_val={trainer.gradient_clip_val} clips by the norm of every gradient, which needs them "
                "all before any step"
            )
        elif getattr(trainer.precision_plugin, "scaler", None) is not None:
            why = (
                f"precision={trainer.precision!r} scales the loss with a GradScaler, which unscales every gradient "
                "and may skip the step after backward"
            )
        elif not pl_module.automatic_optimization:
            why = "manual optimization calls backward and step itself (use coap_plugins.optim.StepInBackward there)"
        elif type(trainer.strategy).__name__ == "ModelParallelStrategy":
            why = "FSDP2 reduce-scatters the gradients after the backward pass"
        if why is not None:
            raise MisconfigurationException(
                f"CoapCallback(step_in_backward=True): {why}; remove it, or set step_in_backward=False"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._unwrap()
            for hooks in self._hooks:
                hooks.remove()
            self._hooks = []

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips the teardown hooks when fit raises: put the user's method back here
        self._unwrap()

    def _unwrap(self) -> None:
        if self._module is None:
            return
        if getattr(self._module.__dict__.get("configure_optimizers"), "_coap_callback", None) is self:
            if self._original is _MISSING:
                del self._module.configure_optimizers
            else:
                self._module.configure_optimizers = self._original  # type: ignore[method-assign]
        self._module = None
        self._original = _MISSING

    def _swap(self, conf: Any, pl_module: pl.LightningModule) -> Any:
        if conf is None:
            log.info(
                "CoapCallback: configure_optimizers returned None; building %s(lr=%s)",
                self.settings.optimizer_class("adamw").__name__,
                self.settings.lr,
            )
            new = build_optimizer(pl_module, self.settings)
            self._replaced = [(None, new)]
            self.driver.bind([new])
            return new
        replaced: dict[int, tuple[torch.optim.Optimizer, CoapOptimizer]] = {}
        returned: dict[int, torch.optim.Optimizer] = {}  # what Lightning gets in place of each optimizer
        schedulers: list[Any] = []

        def walk(obj: Any) -> Any:
            if isinstance(obj, torch.optim.Optimizer):
                if id(obj) not in replaced:
                    inner = [] if isinstance(obj, CoapOptimizer) else find_coap_optimizers([obj])
                    if isinstance(obj, CoapOptimizer):
                        new = obj
                    elif inner:
                        new = inner[0]  # a wrapper (SAM-like) of a COAP optimizer: kept, the COAP one driven
                    else:
                        try:
                            new = translate_optimizer(obj, pl_module, self.settings, adapter="CoapCallback")
                        except ValueError as e:
                            raise MisconfigurationException(str(e)) from e
                    replaced[id(obj)] = (obj, new)
                    returned[id(obj)] = obj if inner else new
                return returned[id(obj)]
            if isinstance(obj, dict):
                return {k: walk(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(walk(v) for v in obj)
            if hasattr(obj, "optimizer"):
                schedulers.append(obj)
            return obj

        out = walk(conf)
        if not replaced:
            raise MisconfigurationException(
                f"CoapCallback found no optimizer in what configure_optimizers returned ({type(conf).__name__})"
            )
        for sched in schedulers:
            for old, new in replaced.values():
                if returned[id(old)] is new and old is not new:
                    rebind_lr_scheduler(sched, old, new)
        self._replaced = list(replaced.values())
        self.driver.bind([new for _, new in self._replaced])
        return out

    # -- checks once everything is built ------------------------------------------------------
    def _settle_checkpoint(self, trainer: pl.Trainer, final: bool) -> None:
        """Check a loaded callback state and take its schedule position; ``final``: the
        checkpoint (if any) has been restored by now, so a resumed fit without one is refused."""
        mine = [type(new).__name__ for _, new in self._replaced]
        if self.driver.loaded is not None:
            try:
                self.driver.check_compatible()
            except ValueError as e:
                raise MisconfigurationException(str(e)) from e
            self._resumed = True
        elif final and trainer.ckpt_path is not None and not self._resumed:  # no callback states at all
            raise MisconfigurationException(
                f"The checkpoint {trainer.ckpt_path} has no CoapCallback state (written without CoapCallback, or "
                f"weights only): its optimizer state does not belong to {', '.join(mine)}. Resume without "
                "CoapCallback, or load only the weights (LightningModule.load_from_checkpoint) and start a new fit"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # strategies that restore after setup (ModelParallelStrategy) do it after this hook
        self._resumed = False
        self._settle_checkpoint(trainer, final=not trainer.strategy.restore_checkpoint_after_setup)
        self._log_routing(trainer)
        if self.settings.step_in_backward and not self._hooks:
            wrapped = [type(o).__name__ for o in trainer.optimizers if not isinstance(o, CoapOptimizer)]
            if wrapped:
                raise MisconfigurationException(
                    "CoapCallback(step_in_backward=True): an optimizer is not a COAP optimizer (a wrapper, or "
                    f"another optimizer: {', '.join(wrapped)}): its "
                    "step cannot run per parameter; remove it, or set step_in_backward=False"
                )
            from torch.nn.parallel import DistributedDataParallel

            model = trainer.strategy.model
            ddp = model if isinstance(model, DistributedDataParallel) else None
            kw = dict(reduce=self.settings.backward_reduce, accumulate=self.settings.backward_accumulate)
            self._hooks = [StepInBackward(o, ddp, **kw) for o in self.driver.optimizers]
            self._window = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._settle_checkpoint(trainer, final=True)
        # Lightning restores the optimizer state after on_fit_start: check it arrived
        if any(self.driver.positions) and not any(new.state for _, new in self._replaced):
            wrappers = [
                type(old).__name__
                for old, new in self._replaced
                if old is not None and old is not new and any(o is new for o in find_coap_optimizers([old]))
            ]
            raise MisconfigurationException(
                f"The checkpoint was written after {max(self.driver.positions)} COAP step(s) but Lightning "
                "restored no state into "
                f"{', '.join(type(new).__name__ for _, new in self._replaced)}"
                + (
                    f": the optimizer Lightning saves is {', '.join(wrappers)}, whose state_dict does not hold "
                    "the state "
                    "of the COAP optimizer it wraps (make its state_dict/load_state_dict include it)"
                    if wrappers
                    else ""
                )
                + ". The moments and projectors would restart from scratch"
            )

    # -- refreshes ---------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._hooks:  # requested at the window's first batch, before its first backward pass
            self._step_ran = True
            return
        index = self.driver.index_of(optimizer)
        if index is not None:  # else not one of ours (an optimizer configure_optimizers did not return)
            self.driver.before_step(index)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._hooks and not self._window:
            for i in range(len(self.driver.optimizers)):
                self.driver.before_step(i)
            self._window, self._step_ran = True, False

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        last = not trainer.fit_loop._should_accumulate()
        for hooks in self._hooks:
            hooks.stepping = last

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._hooks:
            if not self._step_ran:
                return  # the window goes on: its refresh stays requested
            self._window = False
        ran, withdrawn = self.driver.after_batch()
        for _, step, kind in withdrawn:
            log.warning(
                "CoapCallback: the %s refresh of step %d did not run (the optimizer step was skipped); withdrawn",
                kind,
                step,
            )
        if ran:
            metrics = refresh_metrics([opt for _, opt in self._replaced])
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # -- logging -----------------------------------------------------------------------------
    def _log_routing(self, trainer: pl.Trainer) -> None:
        if self._routing_logged:
            return
        optimizers = [opt for _, opt in self._replaced]
        rank_zero_info(routing_summary(optimizers))
        table = routing_table(optimizers)
        for logger in trainer.loggers:
            logger.log_hyperparams(table)
        self._routing_logged = True
