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
    lr_scheduler,
    total_steps,
)
from .config import TrainConfig
from .loader import DataBundle, ShardLoader
from .outputs import RunLog
from .tasks import TaskModule, eval_metrics

try:
    from composer import Evaluator, Trainer
    from composer.core import Callback, DataSpec, State
    from composer.loggers import Logger
    from composer.models import ComposerModel
    from composer.utils import dist

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
        self.metrics = torch.nn.ModuleDict(eval_metrics(task.task))

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

    def fit_start(self, state: State, logger: Logger) -> None:
        self.loader.set_epoch(int(state.timestamp.epoch))
        self.first_step = int(state.timestamp.batch)

    def epoch_start(self, state: State, logger: Logger) -> None:
        self.loader.set_epoch(int(state.timestamp.epoch))

    def batch_start(self, state: State, logger: Logger) -> None:
        if self.stop_after is not None and int(state.timestamp.batch) >= self.stop_after:
            raise RunInterrupted(f"stopped after {self.stop_after} batches (stop_after_batches)")

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = state.loss.detach().float().mean().item() if torch.is_tensor(state.loss) else float("nan")
        lr = state.optimizers[0].param_groups[0]["lr"]
        # at BATCH_END the timestamp already counts this batch
        step = int(state.timestamp.batch)
        self.log.train_row(step, int(state.timestamp.epoch), loss, lr)
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
        algorithms=[CoapAlgorithm(**coap_kwargs(cfg.coap))] if cfg.coap is not None else [],
        callbacks=[recorder],
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
