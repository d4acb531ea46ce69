"""``trainer: lightning``: the recipe as a Lightning ``Trainer`` with :class:`CoapCallback`.

Imported by :func:`coap_plugins.train.cli.run` only once a recipe chose Lightning.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .._extras import missing_extra
from .checkpoints import resume_checkpoint
from .common import (
    RunInterrupted,
    TrainingDiverged,
    build_optimizer,
    coap_kwargs,
    finish_run,
    logger_settings,
    lr_scheduler,
    total_steps,
)
from .config import TrainConfig, duration_parts
from .loader import DataBundle, ShardLoader
from .outputs import RunLog
from .tasks import TaskModule, eval_metrics

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    from ..algorithms.lightning import CoapCallback
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise missing_extra("coap-train's trainer: lightning", "PyTorch Lightning", "lightning") from e

__all__ = ["run_lightning"]

_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


class CoapTaskModule(pl.LightningModule):
    """A :class:`TaskModule` as a ``LightningModule``; the data come from ``bundle``."""

    def __init__(self, cfg: TrainConfig, task: TaskModule, bundle: DataBundle) -> None:
        super().__init__()
        self.cfg, self.task, self.bundle = cfg, task, bundle
        self.metrics = torch.nn.ModuleDict(eval_metrics(task.task))
        self.log_run: RunLog | None = None
        self._eval_start = 0.0

    def configure_model(self) -> None:
        """Under ``parallelism: fsdp2``: every child of the network with parameters, then the
        whole module, sharded with ``fully_shard`` over the data-parallel mesh."""
        if self.cfg.parallelism != "fsdp2" or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.task.net.children():
            if any(p.requires_grad for p in module.parameters()):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)
        self._sharded = True

    def forward(self, batch: Any) -> torch.Tensor:
        return self.task(batch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # through forward (self(batch)), the part `compile: true` compiles on both trainers
        return self.task.loss(self(batch), batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        for name, values in self.task.eval_values(batch).items():
            self.metrics[name].update(values)

    def on_validation_epoch_start(self) -> None:
        self._eval_start = time.perf_counter()

    def on_validation_epoch_end(self) -> None:
        values = {name: m.compute() for name, m in self.metrics.items()}  # summed across ranks
        for m in self.metrics.values():
            m.reset()
        if self.log_run is not None and not self.trainer.sanity_checking:
            step = self.global_step
            epoch = step // (len(self.bundle.train) // self.cfg.accumulate)
            self.log_run.eval_row(step, epoch, values, time.perf_counter() - self._eval_start)
            for logger in self.trainer.loggers:
                logger.log_metrics({f"eval/{name}": float(v) for name, v in values.items()}, step=step)

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.cfg, self.task.net)
        steps = total_steps(self.cfg, len(self.bundle.train) // self.cfg.accumulate)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": lr_scheduler(self.cfg, optimizer, steps), "interval": "step"},
        }

    def train_dataloader(self) -> ShardLoader:
        return self.bundle.train

    def val_dataloader(self) -> ShardLoader:
        return self.bundle.eval


class RunRecorder(pl.Callback):
    """Feeds :class:`RunLog`; keeps the loader's epoch and mid-epoch position in checkpoints;
    stops (``stop_on_nonfinite``) on a non-finite training loss."""

    def __init__(self, cfg: TrainConfig, loader: ShardLoader, stop_after: int | None, resume: bool) -> None:
        self.cfg, self.loader, self.stop_after, self.resume = cfg, loader, stop_after, resume
        self.run_log: RunLog | None = None
        self.batches_in_epoch = 0
        self._epoch = 0
        self._restored = False
        self.first_step: int | None = None
        self._step_loss = 0.0  # the losses of the step's micro-batches so far, each already divided by accumulate
        self._last_step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # restored before Lightning makes the restarted epoch's iterator: position the loader now
        self._epoch = int(state_dict["epoch"])
        self.batches_in_epoch = int(state_dict["batches_in_epoch"])
        self.loader.set_epoch(self._epoch)
        self.loader.skip(self.batches_in_epoch)
        self._restored = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.run_log is None:  # the global rank is known from here on (DDP processes exist)
            self.run_log = RunLog(self.cfg, rank=trainer.global_rank, resuming=self.resume)
            pl_module.log_run = self.run_log

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.first_step = self._last_step = trainer.global_step
        if not self._restored:
            self._epoch = trainer.current_epoch
            self.loader.set_epoch(self._epoch)
        if self.resume:  # the checkpoint is loaded: drop the rows past it
            assert self.run_log is not None
            self.run_log.truncate(trainer.global_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self._epoch:  # a new epoch (not the restarted one)
            self._epoch = trainer.current_epoch
            self.loader.set_epoch(self._epoch)
            self.loader.skip(0)
            self.batches_in_epoch = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.stop_after is not None and trainer.global_step >= self.stop_after:
            raise RunInterrupted(f"stopped after {self.stop_after} batches (stop_after_batches)")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches_in_epoch += 1
        # Lightning hands over each micro-batch's loss divided by accumulate_grad_batches: their sum
        # is the loss of the optimizer step, as Composer reports it
        self._step_loss += outputs["loss"].detach().float().item() if isinstance(outputs, dict) else float(outputs)
        if trainer.global_step == self._last_step:
            return  # gradients accumulate: no optimizer step yet
        loss, self._step_loss, self._last_step = self._step_loss, 0.0, trainer.global_step
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        assert self.run_log is not None
        self.run_log.train_row(trainer.global_step, trainer.current_epoch, loss, lr)
        if trainer.global_step % self.cfg.log_interval == 0:
            for logger in trainer.loggers:
                logger.log_metrics({"train/loss": loss, "train/lr": lr}, step=trainer.global_step)
        # raised before ModelCheckpoint (always the last callback) saves this step; every rank
        # decides together, as EarlyStopping(check_finite=True) does
        if self.cfg.stop_on_nonfinite and trainer.strategy.reduce_boolean_decision(not math.isfinite(loss), all=False):
            raise TrainingDiverged(trainer.global_step, loss)


def _interval_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    n, unit = duration_parts("max_duration", cfg.max_duration)
    kwargs: dict[str, Any] = {"max_steps": n, "max_epochs": -1} if unit == "ba" else {"max_epochs": n}
    n, unit = duration_parts("eval_interval", cfg.eval_interval)
    # val_check_interval counts loader batches: micro-batches when gradients accumulate
    kwargs.update(
        {"check_val_every_n_epoch": n}
        if unit == "ep"
        else {"val_check_interval": n * cfg.accumulate, "check_val_every_n_epoch": None}
    )
    return kwargs


class EmaCallback(EMAWeightAveraging):
    """Lightning's EMA of the weights, updated after every ``update_interval``-th optimizer step
    (steps ``k, 2k, ...``; the first update copies the weights), as Composer's ``EMA`` with
    ``ema_start = update_interval = k`` batches does."""

    def __init__(self, decay: float, update_interval: int) -> None:
        super().__init__(decay=decay, update_every_n_steps=update_interval)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and (step_idx + 1) % self.update_every_n_steps == 0

    @property
    def started(self) -> bool:
        """Whether the average holds anything yet (its first update has run)."""
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    # Before the first update the average is only the copy made at set-up: evaluation uses, and a
    # checkpoint's model weights are, the training weights (as Composer's EMA before it starts).
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.started:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.started:
            super().on_validation_epoch_end(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if not self.started and "current_model_state" in checkpoint:
            checkpoint["state_dict"] = checkpoint["current_model_state"]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not here: the final checkpoint is written after this hook and must keep the training
        # weights; run_lightning moves the average into the model once fit returns
        pass

    def use_average(self, pl_module: pl.LightningModule) -> None:
        """After training: the model holds the average (when it has started)."""
        if self.started:
            self._copy_average_to_current(pl_module)


def _loggers(cfg: TrainConfig) -> list[Any]:
    """The recipe's ``loggers`` as Lightning loggers (Lightning's own version folders)."""
    from lightning.pytorch import loggers

    out: list[Any] = []
    for name, kw in logger_settings(cfg).items():
        if name == "tensorboard":
            out.append(loggers.TensorBoardLogger(save_dir=kw["folder"], name=cfg.name, default_hp_metric=False))
        elif name == "csv":
            out.append(loggers.CSVLogger(save_dir=kw["folder"], name=cfg.name, flush_logs_every_n_steps=50))
        elif name == "mlflow":
            out.append(
                loggers.MLFlowLogger(
                    experiment_name=kw["experiment"], run_name=cfg.name, tracking_uri=kw["tracking_uri"]
                )
            )
        elif name == "wandb":
            out.append(
                loggers.WandbLogger(
                    project=kw["project"],
                    entity=kw["entity"],
                    name=cfg.name,
                    save_dir=kw["folder"],
                    offline=kw["mode"] == "offline",
                    mode=kw["mode"],
                )
            )
    return out


class _Checkpoints(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes the final step when the interval does not end on it
    (as Composer's saver does), so ``last.ckpt`` is the end of training."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > self._last_global_step_saved:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


def _checkpoint_callback(cfg: TrainConfig, folder: Path) -> ModelCheckpoint:
    every: dict[str, Any] = {}
    if cfg.checkpoint.interval is not None:
        n, unit = duration_parts("checkpoint.interval", cfg.checkpoint.interval)
        every = {"every_n_train_steps": n} if unit == "ba" else {"every_n_epochs": n}
    return _Checkpoints(
        dirpath=str(folder),
        filename="ep{epoch}-ba{step}",
        auto_insert_metric_name=False,
        save_last=True,
        save_top_k=-1,
        enable_version_counter=False,
        **every,
    )


def _strategy(cfg: TrainConfig) -> Any:
    world = cfg.devices * cfg.num_nodes
    if cfg.parallelism == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # whole state dicts in one file (rank 0), as under DDP, so `resume` finds them alike
        return ModelParallelStrategy(
            data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    return "ddp" if world > 1 else "auto"


def run_lightning(
    cfg: TrainConfig, data: DataBundle, task: TaskModule, *, stop_after_batches: int | None = None
) -> dict[str, Any] | None:
    """Train ``task`` on ``data`` with Lightning; returns the summary (None off rank 0)."""
    module = CoapTaskModule(cfg, task, data)
    folder = Path(cfg.output_dir or ".") / cfg.checkpoint.folder
    last = folder / "last.ckpt"
    # the global rank before Lightning's processes exist: this node's first process is rank 0 only on node 0
    first = int(os.environ.get("NODE_RANK", 0)) * cfg.devices + int(os.environ.get("LOCAL_RANK", 0)) == 0
    start = None
    if cfg.checkpoint.resume:
        start = resume_checkpoint(folder, last if last.is_file() else None, folder.glob("ep*-ba*.ckpt"), announce=first)
    resume = start is not None
    if not resume and first:
        last.unlink(missing_ok=True)  # a fresh run: a later `resume` must not pick up an older run's pointer
    recorder = RunRecorder(cfg, data.train, stop_after_batches, resume)
    callbacks: list[Any] = [recorder, _checkpoint_callback(cfg, folder)]
    if cfg.coap is not None:
        callbacks.insert(0, CoapCallback(**coap_kwargs(cfg.coap)))
    ema = EmaCallback(cfg.ema.decay, cfg.ema.update_interval) if cfg.ema is not None else None
    if ema is not None:
        callbacks.insert(-1, ema)
    accelerator = {"auto": "auto", "cpu": "cpu", "gpu": "gpu"}[cfg.accelerator]
    loggers = _loggers(cfg)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=_strategy(cfg),
        precision=_PRECISION[cfg.precision],
        callbacks=callbacks,
        logger=loggers or False,
        accumulate_grad_batches=cfg.accumulate,
        gradient_clip_val=cfg.clip_grad_norm,
        gradient_clip_algorithm="norm" if cfg.clip_grad_norm is not None else None,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=cfg.log_interval,
        num_sanity_val_steps=0,
        default_root_dir=cfg.output_dir,
        use_distributed_sampler=False,
        **_interval_kwargs(cfg),
    )
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    with warnings.catch_warnings():
        # the RunRecorder callback restores the loader's mid-epoch position; Lightning cannot see it
        warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended")
        # a compiled LightningModule is Lightning's switch for torch.compile
        fitted = torch.compile(module, **cfg.compile_options) if cfg.compile else module
        try:
            trainer.fit(fitted, ckpt_path=str(start) if resume else None)
        except TrainingDiverged as exc:
            diverged = exc  # the run folder is written below, then the error goes on
            recorder.run_log.stopped_diverged(exc.step, exc.loss)
        else:
            diverged = None
    if ema is not None:
        ema.use_average(module)
    # Lightning's teardown moved the module to the CPU: the device it trained on, for the sample
    # grid and the peak-memory figure
    device = trainer.strategy.root_device
    task.to(device)
    assert recorder.run_log is not None  # made at setup
    return finish_run(
        cfg,
        task,
        recorder.run_log,
        evaluate=lambda: trainer.validate(module, verbose=False),
        optimizer=trainer.optimizers[0],
        steps=trainer.global_step,
        first_step=recorder.first_step,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        device=device,
        diverged=diverged,
    )
