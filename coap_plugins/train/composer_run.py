"""``trainer: composer``: the recipe as a Composer ``Trainer`` with :class:`CoapAlgorithm`.

Imported by :func:`coap_plugins.train.cli.run` only once a recipe chose Composer.
"""

from __future__ import annotations

import math
import os
import time
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
from .config import TrainConfig
from .loader import DataBundle, ShardLoader
from .outputs import RunLog
from .tasks import TaskModule, eval_metrics

try:
    from composer import Evaluator, Trainer
    from composer.algorithms import EMA, GradientClipping
    from composer.core import Callback, DataSpec, State
    from composer.loggers import Logger, LoggerDestination
    from composer.models import ComposerModel
    from composer.utils import dist
    from torchmetrics import MetricCollection

    from ..algorithms.composer import CoapAlgorithm
except ImportError as e:  # pragma: no cover - exercised only without composer
    raise missing_extra("coap-train's trainer: composer", "MosaicML Composer", "composer") from e

__all__ = ["run_composer"]

_PRECISION = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp_fp16"}


class CoapTaskModel(ComposerModel):
    """A :class:`TaskModule` as a ``ComposerModel`` (forward, loss, eval metrics)."""

    def __init__(self, task: TaskModule) -> None:
        super().__init__()
        self.task = task
        # a MetricCollection (not a ModuleDict): Composer's FSDP2 wrap policy leaves metrics unsharded
        self.metrics = MetricCollection(eval_metrics(task.task), compute_groups=False)
        # under FSDP2 the network and each of its children with parameters are sharding units:
        # evaluation calls the network directly (not through the task's forward), and each
        # unit's parameters are gathered only while it runs (Composer's wrap policy asks this)
        units = {task.net, *(m for m in task.net.children() if any(p.requires_grad for p in m.parameters()))}
        task.fsdp_wrap_fn = lambda module: module in units

    def forward(self, batch: Any) -> torch.Tensor:
        return self.task(batch)

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return self.task.loss(outputs, batch)

    def eval_forward(self, batch: Any, outputs: Any | None = None) -> dict[str, torch.Tensor]:
        return outputs if outputs is not None else self.task.eval_values(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Any]:
        return {} if is_train else dict(self.metrics.items())

    def update_metric(self, batch: Any, outputs: Any, metric: Any) -> None:
        metric.update(outputs[metric.key])


def _no_split(batch: Any, microbatch_size: int) -> list[Any]:
    """Composer's batch splitting without its warning for a short last batch."""
    n = len(batch[0])
    if microbatch_size >= n:
        return [batch]
    return [tuple(t[i : i + microbatch_size] for t in batch) for i in range(0, n, microbatch_size)]


class RunRecorder(Callback):
    """Feeds :class:`RunLog`, keeps the loader's epoch in step, stops on ``stop_after_batches``
    and (``stop_on_nonfinite``) on a non-finite training loss."""

    def __init__(self, log: RunLog, loader: ShardLoader, stop_after: int | None, stop_on_nonfinite: bool) -> None:
        self.log, self.loader, self.stop_after = log, loader, stop_after
        self.stop_on_nonfinite = stop_on_nonfinite
        self._eval_start = 0.0
        self.first_step: int | None = None
        self._loss: torch.Tensor | None = None  # sum over this batch's micro-batches of loss x samples
        self._samples = 0

    def fit_start(self, state: State, logger: Logger) -> None:
        self.loader.set_epoch(int(state.timestamp.epoch))
        self.first_step = int(state.timestamp.batch)

    def epoch_start(self, state: State, logger: Logger) -> None:
        self.loader.set_epoch(int(state.timestamp.epoch))

    def batch_start(self, state: State, logger: Logger) -> None:
        if self.stop_after is not None and int(state.timestamp.batch) >= self.stop_after:
            raise RunInterrupted(f"stopped after {self.stop_after} batches (stop_after_batches)")

    def after_loss(self, state: State, logger: Logger) -> None:
        # once per micro-batch: this rank's loss of the whole batch is their sample-weighted mean
        n = len(state.batch[0])
        loss = state.loss.detach().float().mean() * n if torch.is_tensor(state.loss) else torch.tensor(float("nan"))
        self._loss = loss if self._loss is None else self._loss + loss
        self._samples += n

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = float("nan") if self._loss is None else self._loss.item() / self._samples
        self._loss, self._samples = None, 0
        lr = state.optimizers[0].param_groups[0]["lr"]
        # at BATCH_END the timestamp already counts this batch
        step = int(state.timestamp.batch)
        self.log.train_row(step, int(state.timestamp.epoch), loss, lr)
        if step % self.log.cfg.log_interval == 0:
            logger.log_metrics({"train/loss": loss, "train/lr": lr}, step=step)
        # raised before this batch's checkpoint (BATCH_CHECKPOINT comes after BATCH_END)
        if self.stop_on_nonfinite and self._any_rank(not math.isfinite(loss), state):
            raise TrainingDiverged(step, loss)

    @staticmethod
    def _any_rank(flag: bool, state: State) -> bool:
        if dist.get_world_size() == 1:
            return flag
        # every rank stops together (one rank raising alone would leave the others in all-reduce)
        t = state.device.tensor_to_device(torch.tensor([int(flag)], dtype=torch.uint8))
        dist.all_reduce(t, reduce_operation="MAX")
        return bool(t.item())

    def eval_start(self, state: State, logger: Logger) -> None:
        self._eval_start = time.perf_counter()

    def eval_end(self, state: State, logger: Logger) -> None:
        metrics = {name: m.compute() for name, m in state.eval_metrics["eval"].items()}
        step = int(state.timestamp.batch)
        self.log.eval_row(step, step // len(self.loader), metrics, time.perf_counter() - self._eval_start)
        logger.log_metrics({f"eval/{name}": float(v) for name, v in metrics.items()}, step=step)


class CsvLogger(LoggerDestination):
    """``folder/metrics.csv`` in the layout of Lightning's ``CSVLogger`` (a ``step`` column and one
    column per metric, sorted; a row per log call) with the keys both runners log (``train/*``,
    ``eval/*``, ``coap/*``): Composer ships no CSV logger.

    Rank 0 writes; a resumed run keeps the rows up to the step it resumed from.
    """

    KEYS = ("train/", "eval/", "coap/")

    def __init__(self, folder: str, flush_interval: int = 50) -> None:
        super().__init__()
        self.path = Path(folder) / "metrics.csv"
        self.flush_interval = flush_interval
        self.rows: list[dict[str, Any]] = []
        self._unsaved = 0

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        import csv

        start = int(state.timestamp.batch)
        if start and self.path.is_file():
            with self.path.open(newline="") as f:
                self.rows = [
                    {k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f) if int(row["step"]) <= start
                ]

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        # the keys both trainers log (Composer's own time/*, loss/train/*, metrics/* come every
        # batch, whatever log_interval is)
        metrics = {k: v for k, v in metrics.items() if k.startswith(self.KEYS)}
        if dist.get_global_rank() != 0 or not metrics:
            return
        row = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        row["step"] = len(self.rows) if step is None else step
        self.rows.append(row)
        self._unsaved += 1
        if self._unsaved >= self.flush_interval:
            self.save()

    def save(self) -> None:
        import csv

        if dist.get_global_rank() != 0 or not self.rows:
            return
        keys = sorted(set().union(*self.rows))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)
        self._unsaved = 0

    def epoch_end(self, state: State, logger: Logger) -> None:
        self.save()

    def fit_end(self, state: State, logger: Logger) -> None:
        self.save()

    def close(self, state: State, logger: Logger) -> None:
        self.save()


def _loggers(cfg: TrainConfig) -> list[LoggerDestination]:
    """The recipe's ``loggers`` as Composer logger destinations."""
    out: list[LoggerDestination] = []
    for name, kw in logger_settings(cfg).items():
        if name == "tensorboard":
            from composer.loggers import TensorboardLogger

            out.append(TensorboardLogger(log_dir=kw["folder"], flush_interval=cfg.log_interval))
        elif name == "csv":
            out.append(CsvLogger(kw["folder"]))
        elif name == "mlflow":
            from composer.loggers import MLFlowLogger

            out.append(
                MLFlowLogger(experiment_name=kw["experiment"], run_name=cfg.name, tracking_uri=kw["tracking_uri"])
            )
        elif name == "wandb":
            from composer.loggers import WandBLogger

            out.append(
                WandBLogger(
                    project=kw["project"],
                    entity=kw["entity"],
                    name=cfg.name,
                    init_kwargs={"mode": kw["mode"], "dir": kw["folder"]},
                )
            )
    return out


def _algorithms(cfg: TrainConfig) -> list[Any]:
    """COAP, gradient clipping and the weight average, as Composer algorithms.

    Clipping runs at ``AFTER_TRAIN_BATCH`` on the unscaled gradient (Composer unscales before that
    event); COAP's refresh is only requested there and runs inside the optimizer step, on the
    clipped gradient.  The average starts with the weights after step ``update_interval`` (as
    :class:`~coap_plugins.train.lightning_run.EmaCallback` does) and is updated every
    ``update_interval``-th step after.
    """
    algorithms: list[Any] = [CoapAlgorithm(**coap_kwargs(cfg.coap))] if cfg.coap is not None else []
    if cfg.clip_grad_norm is not None:
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=cfg.clip_grad_norm))
    if cfg.ema is not None:
        every = f"{cfg.ema.update_interval}ba"
        algorithms.append(EMA(half_life=None, smoothing=cfg.ema.decay, ema_start=every, update_interval=every))
    return algorithms


def _use_average_weights(state: State) -> None:
    """After training: the model holds the average (as Lightning's weight averaging leaves it)."""
    for algorithm in state.algorithms:
        if isinstance(algorithm, EMA) and algorithm.ema_started:
            if algorithm.ema_weights_active:  # swapped in for the last checkpoint: swap back first
                algorithm.ema_model.swap_params(model=state.model)
                algorithm.ema_weights_active = False
            algorithm.get_ema_model(state.model)


def _parallelism(cfg: TrainConfig) -> dict[str, Any] | None:
    """FSDP2 with whole state dicts in the checkpoints (rank 0 writes one file, as under DDP)."""
    if cfg.parallelism != "fsdp2":
        return None
    from composer.utils.parallelism import FSDP2Config

    return {"fsdp": FSDP2Config(state_dict_type="full")}


def run_composer(
    cfg: TrainConfig, data: DataBundle, task: TaskModule, *, stop_after_batches: int | None = None
) -> dict[str, Any] | None:
    """Train ``task`` on ``data`` with Composer; returns the summary (None off rank 0)."""
    model = CoapTaskModel(task)
    optimizer = build_optimizer(cfg, model.task.net)
    steps = total_steps(cfg, len(data.train))
    scheduler = lr_scheduler(cfg, optimizer, steps)
    folder = Path(cfg.output_dir or ".") / cfg.checkpoint.folder
    latest = folder / "latest-rank0.pt"
    pointed = folder / os.readlink(latest) if latest.is_symlink() else None
    start = None
    if cfg.checkpoint.resume:
        start = resume_checkpoint(
            folder, pointed, folder.glob("ep*-ba*-rank0.pt"), announce=dist.get_global_rank() == 0
        )
    resuming = start is not None
    if not resuming and latest.is_symlink() and dist.get_global_rank() == 0:
        latest.unlink()  # a fresh run: a later `resume` must not pick up an older run's pointer
    log = RunLog(cfg, rank=dist.get_global_rank(), resuming=resuming)
    recorder = RunRecorder(log, data.train, stop_after_batches, cfg.stop_on_nonfinite)
    accelerator = cfg.accelerator if cfg.accelerator != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    trainer = Trainer(
        model=model,
        train_dataloader=DataSpec(data.train, split_batch=_no_split),
        eval_dataloader=Evaluator(
            label="eval", dataloader=DataSpec(data.eval, split_batch=_no_split), metric_names=list(model.metrics.keys())
        ),
        eval_interval=cfg.eval_interval,
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        algorithms=_algorithms(cfg),
        callbacks=[recorder],
        loggers=_loggers(cfg),
        device_train_microbatch_size=cfg.data.batch_size // cfg.accumulate if cfg.accumulate > 1 else None,
        compile_config=dict(cfg.compile_options) if cfg.compile else None,
        parallelism_config=_parallelism(cfg),
        precision=_PRECISION[cfg.precision],
        device=accelerator,
        seed=cfg.seed,
        run_name=cfg.name,
        save_folder=str(folder),
        save_interval=cfg.checkpoint.interval or cfg.max_duration,
        save_filename="ep{epoch}-ba{batch}-rank{rank}.pt",
        save_overwrite=True,
        # Composer's own autoresume follows the `latest` pointer; an older checkpoint (the newest
        # one unreadable) is loaded the way Composer documents for manual resumption
        autoresume=resuming and start == pointed,
        load_path=str(start) if resuming and start != pointed else None,
        progress_bar=cfg.progress_bar,
        log_to_console=False,
    )
    if resuming:
        log.truncate(int(trainer.state.timestamp.batch))
    diverged = None
    try:
        trainer.fit()
    except TrainingDiverged as exc:
        diverged = exc  # the run folder is written below, then the error goes on
        log.stopped_diverged(exc.step, exc.loss)
    state = trainer.state
    _use_average_weights(state)
    try:
        return finish_run(
            cfg,
            task,
            log,
            evaluate=trainer.eval,
            optimizer=state.optimizers[0],
            steps=int(state.timestamp.batch),
            first_step=recorder.first_step,
            rank=dist.get_global_rank(),
            world_size=dist.get_world_size(),
            device=state.device.tensor_to_device(torch.empty(0)).device,
            diverged=diverged,
        )
    finally:
        trainer.close()
