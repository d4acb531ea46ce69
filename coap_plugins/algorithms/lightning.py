"""Lightning adapter: :class:`CoapCallback`.

The only module of the package that imports Lightning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..optim import CoapOptimizer
from ..policy import CoapPolicy
from ..projection import DEFAULT_MIN_CONV_NUMEL
from ._swap import (
    CoapSettings,
    build_optimizer,
    find_coap_optimizers,
    rebind_lr_scheduler,
    refresh_metrics,
    routing_summary,
    routing_table,
    settle_refresh,
    translate_optimizer,
)

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

__all__ = ["CoapCallback", "DigitsClassifier", "cli_main"]

log = logging.getLogger(__name__)

# strategies that shard parameters or gradients: the projectors need whole, unsharded gradients
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
_MISSING = object()


class CoapCallback(Callback):
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
    written with other ones, or without CoapCallback, is refused with what differs).  FSDP,
    DeepSpeed and ModelParallel strategies are refused; one CoapCallback per Trainer (Lightning
    itself refuses two with equal settings, as their state keys collide).

    Args:
        optimizer: ``"auto"`` or a COAP optimizer name to use whatever the user returned (keeping
            its groups' lr and weight decay) (default ``"auto"``).
        eight_bit: 8-bit moments (default False).
        rank: matrix rank when no ratio is given (default None).
        rank_ratio_matrix: matrix rank = min(m, n) // ratio (default None: 4).
        rank_ratio_conv: Tucker-2 rank ratio (default None: 4).
        rank_ratio_cnn: alias of ``rank_ratio_conv``, the reference implementation's name
            (default None); giving both with different values is an error.
        min_conv_numel: convs with at most this many elements stay full rank (default 9216).
        exclude: parameter-name patterns kept full rank, e.g. ``["fc"]`` (default ()).
        policy: a :class:`~coap_plugins.CoapPolicy` instead of the four arguments above (default None).
        update_interval: T_u, optimizer steps (int) or ``"32ba"`` (default 32).
        reproject_factor: every lambda-th refresh is an SVD recalibration (default 5).
        restore_state: carry moments into a new basis (default False).
        seed: base seed of the projectors (default 0).
        lr: learning rate when ``configure_optimizers`` returns None (default 1e-3).
        betas: Adam betas when ``configure_optimizers`` returns None (default (0.9, 0.999)).
        eps: Adam eps when ``configure_optimizers`` returns None (default 1e-8).
        weight_decay: AdamW weight decay when ``configure_optimizers`` returns None (default 1e-2).

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

    def __init__(
        self,
        optimizer: str = "auto",
        *,
        eight_bit: bool = False,
        rank: int | None = None,
        rank_ratio_matrix: float | None = None,
        rank_ratio_conv: float | None = None,
        min_conv_numel: int = DEFAULT_MIN_CONV_NUMEL,
        exclude: Sequence[str] = (),
        policy: CoapPolicy | None = None,
        update_interval: int | str = 32,
        reproject_factor: int = 5,
        restore_state: bool = False,
        seed: int = 0,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        rank_ratio_cnn: float | None = None,
    ) -> None:
        try:
            self.settings = CoapSettings(
                optimizer=optimizer, eight_bit=eight_bit, rank=rank, rank_ratio_matrix=rank_ratio_matrix,
                rank_ratio_conv=rank_ratio_conv, min_conv_numel=min_conv_numel, exclude=tuple(exclude),
                policy=policy, update_interval=update_interval, reproject_factor=reproject_factor,
                restore_state=restore_state, seed=seed, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                rank_ratio_cnn=rank_ratio_cnn,
            )
        except ValueError as e:
            raise MisconfigurationException(str(e)) from e
        self.schedule = self.settings.schedule()
        self.refreshes: list[tuple[int, str]] = []  # (step, kind) of every refresh a step ran (first optimizer)
        self._requested: list[tuple[int, CoapOptimizer, int, str]] = []  # (index, optimizer, step, kind) this batch
        self._steps: list[int] = []  # optimizer steps taken under this callback, per COAP optimizer
        self._replaced: list[tuple[torch.optim.Optimizer | None, CoapOptimizer]] = []
        self._module: pl.LightningModule | None = None
        self._original: Any = _MISSING
        self._loaded: dict[str, Any] | None = None
        self._to_log = False
        self._routing_logged = False

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"CoapCallback(optimizer={s.optimizer!r}, eight_bit={s.eight_bit}, update_interval={s.interval}, "
            f"reproject_factor={s.reproject_factor}, policy={s.policy!r})"
        )

    @property
    def steps(self) -> int:
        """Optimizer steps of the first COAP optimizer taken under this callback (the schedule position)."""
        return self._steps[0] if self._steps else 0

    # -- state -------------------------------------------------------------------------------
    @property
    @override
    def state_key(self) -> str:
        # the settings a checkpoint must agree with, so two differently configured instances do not
        # collide in Lightning's callback states (and one is told apart from the other on resume)
        return self._generate_state_key(**self._identity())

    def _identity(self) -> dict[str, Any]:
        s = self.settings
        return dict(optimizer=s.optimizer, eight_bit=s.eight_bit, update_interval=s.interval,
                    reproject_factor=s.reproject_factor)

    @override
    def state_dict(self) -> dict[str, Any]:
        return dict(
            steps=list(self._steps),
            **self._identity(),
            optimizer_classes=[type(new).__name__ for _, new in self._replaced],
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)

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
                f"CoapCallback does not support {sharded[0]} (strategy {strategy.__name__}): its projectors need whole, "
                "unsharded gradients. Use strategy='ddp' (or a single device), or remove CoapCallback"
            )
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

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._unwrap()

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
            log.info("CoapCallback: configure_optimizers returned None; building %s(lr=%s)",
                     self.settings.optimizer_class("adamw").__name__, self.settings.lr)
            new = build_optimizer(pl_module, self.settings)
            new.drive_refreshes_externally()
            self._replaced = [(None, new)]
            self._steps = [0]
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
                    new.drive_refreshes_externally()
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
        loaded = self._loaded.get("steps") if self._loaded else None
        self._steps = [int(s) for s in loaded] if loaded and len(loaded) == len(self._replaced) else [0] * len(self._replaced)
        return out

    # -- checks once everything is built ------------------------------------------------------
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._requested = []
        mine = [type(new).__name__ for _, new in self._replaced]
        if self._loaded is not None:
            saved = list(self._loaded.get("optimizer_classes", mine))
            if saved != mine:
                raise MisconfigurationException(
                    f"The checkpoint was written with COAP optimizer(s) {saved} but this CoapCallback builds {mine}: "
                    "use the same optimizer/eight_bit settings as the run that wrote it"
                )
            self._loaded = None
        elif trainer.ckpt_path is not None:  # a checkpoint with no callback states at all
            raise MisconfigurationException(
                f"The checkpoint {trainer.ckpt_path} has no CoapCallback state (written without CoapCallback, or "
                f"weights only): its optimizer state does not belong to {', '.join(mine)}. Resume without "
                "CoapCallback, or load only the weights (LightningModule.load_from_checkpoint) and start a new fit"
            )
        self._log_routing(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning restores the optimizer state after on_fit_start: check it arrived
        if any(self._steps) and not any(new.state for _, new in self._replaced):
            wrappers = [
                type(old).__name__ for old, new in self._replaced
                if old is not None and old is not new and any(o is new for o in find_coap_optimizers([old]))
            ]
            raise MisconfigurationException(
                f"The checkpoint was written after {max(self._steps)} COAP step(s) but Lightning restored no state into "
                f"{', '.join(type(new).__name__ for _, new in self._replaced)}"
                + (f": the optimizer Lightning saves is {', '.join(wrappers)}, whose state_dict does not hold the state "
                   "of the COAP optimizer it wraps (make its state_dict/load_state_dict include it)" if wrappers else "")
                + ". The moments and projectors would restart from scratch"
            )

    # -- refreshes ---------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        inner = find_coap_optimizers([optimizer])
        for i, (_, opt) in enumerate(self._replaced):
            if opt is optimizer or any(opt is o for o in inner):
                break
        else:
            return  # not one of ours (an optimizer configure_optimizers did not return)
        step = self._steps[i] + 1
        kind = self.schedule.refresh_at(step)
        if kind != "none":
            opt.request_refresh(kind)
            self._requested.append((i, opt, step, kind))
        self._steps[i] = step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        requested, self._requested = self._requested, []
        for i, opt, step, kind in requested:
            if settle_refresh(opt):
                if i == 0:
                    self.refreshes.append((step, kind))
                self._to_log = True
            else:
                log.warning("CoapCallback: the %s refresh of step %d did not run (the optimizer step was skipped); "
                            "withdrawn", kind, step)
        if self._to_log:
            self._log_refresh(trainer)
            self._to_log = False

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

    def _log_refresh(self, trainer: pl.Trainer) -> None:
        metrics = refresh_metrics([opt for _, opt in self._replaced])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


# -- the LightningCLI recipe (yamls/lightning/) ----------------------------------------------
class DigitsClassifier(pl.LightningModule):
    """The example model of the ``yamls/lightning/`` recipes: an example network on scikit-learn's
    bundled digits (nothing is downloaded), with its own data loaders.

    It defines no ``configure_optimizers``: LightningCLI builds one from the YAML's ``optimizer``
    and ``lr_scheduler`` sections, and :class:`CoapCallback` swaps the optimizer it returns.

    Args:
        arch: ``"small_cnn"`` or ``"small_resnet"`` (default ``"small_cnn"``).
        size: image side the 8x8 digits are upsampled to (default 16).
        batch_size: training batch size (default 64).
        train_samples: how many training images to use, None for all (default None).
    """

    def __init__(self, arch: str = "small_cnn", size: int = 16, batch_size: int = 64,
                 train_samples: int | None = None) -> None:
        super().__init__()
        from ..examples import SmallCNN, SmallResNet

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

    def _data(self) -> Any:
        from ..examples import load_digits_tensors

        return load_digits_tensors(size=self.hparams.size)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        d = self._data()
        n = self.hparams.train_samples or len(d.y_train)
        ds = torch.utils.data.TensorDataset(d.x_train[:n], d.y_train[:n])
        return torch.utils.data.DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        d = self._data()
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(d.x_test, d.y_test), batch_size=256)


def cli_main(args: Any = None) -> Any:
    """``python -m coap_plugins.algorithms.lightning fit --config yamls/lightningcli/small_cnn_digits.yaml``:
    LightningCLI over any LightningModule (``model.class_path``); returns the ``LightningCLI``."""
    try:
        from lightning.pytorch.cli import LightningCLI
    except ImportError as e:  # pragma: no cover - exercised only without jsonargparse
        raise ImportError("the Lightning CLI needs jsonargparse: pip install 'coap-plugins[lightning]'") from e
    return LightningCLI(pl.LightningModule, subclass_mode_model=True, args=args,
                        save_config_kwargs={"overwrite": True})


if __name__ == "__main__":  # pragma: no cover
    cli_main()
