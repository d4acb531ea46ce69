"""The ``coap-train`` configuration: one schema for both trainers, checked before anything runs.

A recipe is a YAML file whose keys are the fields of :class:`TrainConfig` (nested sections are
the dataclasses below).  :func:`load_config` reads it, applies ``dotted.key=value`` overrides
from the command line, and validates in three passes, each with an error that names the key:

1. unknown keys (in the file or an override) are refused with the valid keys of that section
   and the closest match;
2. types are checked by OmegaConf against the dataclass annotations (``data.batch_size=abc``);
3. values are checked here (every float finite, then choices, ranges, durations), before any
   model or data is built.

OmegaConf (the ``vision`` extra) is imported only by :func:`load_config`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..optim._base import DEFAULT_RESIDUAL
from ..projection import DEFAULT_MIN_CONV_NUMEL
from ..projection.linalg import DEFAULT_BASIS_ALIGNMENT, DEFAULT_CORRELATION_LOSS

__all__ = [
    "CheckpointConfig",
    "CoapConfig",
    "ConfigError",
    "CsvLoggerConfig",
    "DataConfig",
    "EmaConfig",
    "LoggersConfig",
    "MlflowLoggerConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RendezvousConfig",
    "ScheduleConfig",
    "TaskConfig",
    "TensorboardLoggerConfig",
    "TrainConfig",
    "WandbLoggerConfig",
    "duration_parts",
    "load_config",
    "to_yaml",
]


class ConfigError(ValueError):
    """A recipe or an override is invalid; the message names the key."""


@dataclass
class ModelConfig:
    """``model``: what to train.

    ``name`` is a timm model name (``resnet18``, ``resnet50``, ...), ``torchvision/<name>`` for a
    torchvision classification model, or ``unet`` (the compact DDPM UNet, ``task.name: ddpm``).
    ``in_chans`` and ``num_classes`` are taken from the data.  ``small_input`` replaces a
    ResNet's 7x7 stride-2 stem and max-pool with one 3x3 stride-1 conv (the usual CIFAR stem).
    ``widths`` / ``blocks_per_level`` / ``num_heads`` configure the UNet; ``kwargs`` go to
    ``timm.create_model`` or the torchvision builder.
    """

    name: str = "resnet18"
    pretrained: bool = False
    small_input: bool = False
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    blocks_per_level: int = 1
    num_heads: int = 4
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    """``task``: the objective.

    ``classification``: cross-entropy (``label_smoothing``), eval accuracy and loss.
    ``ddpm``: noise-prediction MSE with a linear beta schedule (``timesteps``, ``beta_start``,
    ``beta_end``); eval is the held-out denoising loss at ``eval_timesteps`` with noise fixed by
    ``eval_seed`` (identical for every optimizer); at the end of training ``num_samples`` images
    are sampled into ``samples.png`` (0: none).
    """

    name: str = "classification"
    label_smoothing: float = 0.0
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    eval_timesteps: list[int] = field(default_factory=lambda: [50, 150, 300, 500, 700, 900])
    eval_seed: int = 0
    num_samples: int = 64


@dataclass
class DataConfig:
    """``data``: webdataset shards.

    ``name``: ``digits`` (scikit-learn's bundled digits; the shards are written on first use into
    ``path`` or, when ``path`` is null, into ``$COAP_DATA_CACHE`` / ``~/.cache/coap-plugins``),
    ``cifar10`` (shards written by ``coap-data cifar10``; with ``download: true`` and no shards,
    torchvision's download is tried and converted) or ``shards`` (any folder ``coap-data``
    wrote).  ``size`` is the digits image side.  ``augment``: ``none``, ``crop`` (random
    translation by up to ``crop_padding`` pixels) or ``crop_flip`` (plus horizontal flips).
    ``train_samples`` keeps only the first N training samples (a smaller task).
    """

    name: str = "digits"
    path: Optional[str] = None
    size: int = 16
    shard_size: int = 100
    download: bool = False
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    shuffle_buffer: int = 1000
    augment: str = "none"
    crop_padding: int = 2
    train_samples: Optional[int] = None


@dataclass
class OptimizerConfig:
    """``optimizer``: the optimizer the user would write (COAP replaces it when ``coap`` is set).

    ``adamw``, ``adam`` (torch), ``adafactor`` (``timm.optim.Adafactor``: a first moment with
    ``betas[0]`` when it is > 0, none with 0; the second moment's decay follows Adafactor's
    ``-0.8`` rule, ``betas[1]`` is not used) or ``sgd`` (momentum ``betas[0]``).  Biases and
    normalization weights get no weight decay when ``no_decay_norm_bias`` is true.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    no_decay_norm_bias: bool = True


@dataclass
class CoapConfig:
    """``coap``: settings of :class:`~coap_plugins.algorithms.CoapAlgorithm` / ``CoapCallback``.

    Absent (null) trains with the plain optimizer, for baselines.  ``rank_ratio_cnn`` (the
    reference implementation's name) is an alias of ``rank_ratio_conv``; give one of them, or
    both with the same value.
    """

    optimizer: str = "auto"
    eight_bit: bool = False
    rank: Optional[int] = None
    rank_ratio_matrix: Optional[float] = None
    rank_ratio_conv: Optional[float] = None
    rank_ratio_cnn: Optional[float] = None
    min_conv_numel: int = DEFAULT_MIN_CONV_NUMEL
    exclude: list[str] = field(default_factory=list)
    update_interval: int = 32
    reproject_factor: int = 5
    restore_state: bool = False
    basis_alignment: str = DEFAULT_BASIS_ALIGNMENT
    correlation_loss: str = DEFAULT_CORRELATION_LOSS
    update_scale: Optional[Union[int, float, str]] = None
    residual: str = DEFAULT_RESIDUAL
    seed: int = 0
    step_in_backward: bool = False
    backward_reduce: str = "projected"
    backward_accumulate: str = "projected"


@dataclass
class ScheduleConfig:
    """``schedule``: the learning-rate schedule, stepped every optimizer step.

    ``constant``, ``cosine`` (to ``min_lr_ratio * lr``) or ``linear`` (to ``min_lr_ratio * lr``),
    after ``warmup`` batches of linear warm-up (``"100ba"`` or a fraction of the run like ``0.05``
    is not accepted: give batches).
    """

    name: str = "cosine"
    warmup: str = "0ba"
    min_lr_ratio: float = 0.0


@dataclass
class CheckpointConfig:
    """``checkpoint``: ``folder`` (relative paths are inside ``output_dir``), ``interval``
    (``"1ep"`` or ``"50ba"``; null: only at the end), ``resume`` (continue from the newest
    checkpoint in ``folder`` when there is one)."""

    folder: str = "checkpoints"
    interval: Optional[str] = "1ep"
    resume: bool = False


@dataclass
class EmaConfig:
    """``ema``: an exponential moving average of the weights, kept by Composer's ``EMA`` algorithm
    or Lightning's ``EMAWeightAveraging`` callback.

    After every ``update_interval``-th optimizer step ``ema = decay * ema + (1 - decay) * weights``
    (the first update copies the weights), parameters and buffers alike.  Evaluation, the DDPM
    samples and the final checkpoint's model weights are the averaged ones; the training weights
    and the average both resume exactly from a checkpoint.
    """

    decay: float = 0.9999
    update_interval: int = 1


@dataclass
class TensorboardLoggerConfig:
    """``loggers.tensorboard``: event files in ``folder`` (inside ``output_dir`` when relative)."""

    folder: str = "tensorboard"


@dataclass
class CsvLoggerConfig:
    """``loggers.csv``: ``folder/metrics.csv`` (inside ``output_dir`` when relative): a ``step``
    column and one column per metric (``train/*``, ``eval/*``, ``coap/*``), a row per log call
    (the training and eval metrics of one step are separate rows)."""

    folder: str = "csv"


@dataclass
class MlflowLoggerConfig:
    """``loggers.mlflow``: an MLflow run in ``experiment`` (null: the recipe's ``name``);
    ``tracking_uri`` null: ``$MLFLOW_TRACKING_URI``, else a local file store
    ``output_dir/mlruns`` (no server)."""

    experiment: Optional[str] = None
    tracking_uri: Optional[str] = None


@dataclass
class WandbLoggerConfig:
    """``loggers.wandb``: a Weights & Biases run in ``project`` (null: ``coap-plugins``);
    ``mode`` null: ``$WANDB_MODE``, else ``offline`` (files in ``output_dir/wandb``, nothing sent:
    ``wandb sync`` uploads them later)."""

    project: Optional[str] = None
    entity: Optional[str] = None
    mode: Optional[str] = None


@dataclass
class LoggersConfig:
    """``loggers``: the experiment loggers of the chosen trainer, each null (off) or a mapping of its
    settings (``{}``: the defaults).  ``coap/*`` metrics, the training loss and learning rate
    (``train/loss``, ``train/lr`` every ``log_interval`` steps) and the eval metrics
    (``eval/<metric>``) reach every logger; ``metrics.jsonl`` and ``report.md`` are written as
    always.  Built from Composer's ``TensorboardLogger`` / ``MLFlowLogger`` / ``WandBLogger`` and
    Lightning's ``TensorBoardLogger`` / ``CSVLogger`` / ``MLFlowLogger`` / ``WandbLogger``
    (Composer has no CSV logger: its ``csv`` is a Composer ``LoggerDestination`` writing the
    layout of Lightning's).  ``tensorboard`` needs the ``tensorboard`` package, ``mlflow`` and
    ``wandb`` theirs."""

    tensorboard: Optional[TensorboardLoggerConfig] = None
    csv: Optional[CsvLoggerConfig] = None
    mlflow: Optional[MlflowLoggerConfig] = None
    wandb: Optional[WandbLoggerConfig] = None


@dataclass
class RendezvousConfig:
    """``rendezvous``: where the nodes of a multi-node run meet (``num_nodes`` > 1), each null to
    take the launcher's environment variable (``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
    then the defaults 0, ``127.0.0.1`` (node 0 only) and 29500.  Run ``coap-train`` once on every
    node with its own ``rendezvous.node_rank``; node 0's address is ``master_addr``.  ``output_dir``
    must be one shared folder: global rank 0 writes the run folder and the checkpoints, and every
    node resumes from them."""

    node_rank: Optional[int] = None
    master_addr: Optional[str] = None
    master_port: Optional[int] = None


@dataclass
class TrainConfig:
    """A whole ``coap-train`` recipe.

    ``stop_on_nonfinite`` (default true): stop at the first step whose training loss is NaN or
    infinite, with an error naming the step and a non-zero exit; the run folder still gets its
    metrics, summary and a report saying the run diverged.  False trains on and only reports it.

    ``accumulate``: micro-batches per optimizer step (Composer's micro-batching, Lightning's
    ``accumulate_grad_batches``); ``data.batch_size`` stays the samples of one optimizer step
    (per device) and must be a multiple of it; one COAP step (and refresh) per optimizer step.
    ``clip_grad_norm``: clip the global gradient norm to this value before every optimizer step
    (Composer's ``GradientClipping``, Lightning's ``gradient_clip_val``), on the unscaled gradient.
    ``compile``: ``torch.compile`` the model's forward through the trainer's own switch
    (Composer's ``compile_config``, a compiled ``LightningModule`` for Lightning) with
    ``compile_options`` (``torch.compile`` keywords: ``backend``, ``mode``, ``dynamic``,
    ``fullgraph``, ``options``).  ``num_nodes`` x ``devices`` processes train under DDP; see
    :class:`RendezvousConfig`.

    ``parallelism``: ``ddp`` (default: every process holds the whole model) or ``fsdp2``
    (PyTorch's ``fully_shard``: parameters, gradients and the COAP state are sharded across the
    processes; Composer's ``FSDP2Config``, Lightning's ``ModelParallelStrategy``; checkpoints
    are whole state dicts written by rank 0, so ``resume`` works as with DDP).  ``fsdp2`` does
    not combine with ``ema``, ``clip_grad_norm`` or ``compile`` yet.

    ``coap.step_in_backward: true`` runs each parameter's COAP update inside the backward pass and
    frees its gradient (see ``CoapAlgorithm`` / ``CoapCallback``); it does not combine with
    ``clip_grad_norm``, ``precision: fp16`` or ``parallelism: fsdp2``.
    """

    trainer: str = "composer"
    name: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    coap: Optional[CoapConfig] = None
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    max_duration: str = "1ep"
    eval_interval: str = "1ep"
    log_interval: int = 10
    seed: int = 0
    precision: str = "fp32"
    devices: int = 1
    num_nodes: int = 1
    parallelism: str = "ddp"
    rendezvous: RendezvousConfig = field(default_factory=RendezvousConfig)
    accelerator: str = "auto"
    accumulate: int = 1
    clip_grad_norm: Optional[float] = None
    ema: Optional[EmaConfig] = None
    compile: bool = False
    compile_options: dict[str, Any] = field(default_factory=dict)
    loggers: LoggersConfig = field(default_factory=LoggersConfig)
    threads: Optional[int] = None
    progress_bar: bool = True
    stop_on_nonfinite: bool = True
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output_dir: Optional[str] = None


_CHOICES: dict[str, tuple[str, ...]] = {
    "trainer": ("composer", "lightning"),
    "task.name": ("classification", "ddpm"),
    "data.name": ("digits", "cifar10", "shards"),
    "data.augment": ("none", "crop", "crop_flip"),
    "optimizer.name": ("adamw", "adam", "adafactor", "sgd"),
    "schedule.name": ("constant", "cosine", "linear"),
    "precision": ("fp32", "bf16", "fp16"),
    "accelerator": ("auto", "cpu", "gpu"),
    "parallelism": ("ddp", "fsdp2"),
}
_DURATION = re.compile(r"^\s*(\d+)\s*(ba|ep)\s*$")
# accepted keys left out of the "did you mean" hints (they would shadow the names they stand for)
_ALIASES = ("rank_ratio_cnn",)


def duration_parts(key: str, value: Any) -> tuple[int, str]:
    """``"300ba"`` -> ``(300, "ba")``; ``"5ep"`` -> ``(5, "ep")``; anything else is a ConfigError."""
    m = _DURATION.match(str(value)) if value is not None else None
    if m is None or int(m.group(1)) < 1:
        raise ConfigError(f"Invalid {key}: {value!r} (expected a positive number of batches or epochs: '300ba', '5ep')")
    return int(m.group(1)), m.group(2)


# ---------------------------------------------------------------------------------------------
# pass 1: keys


def _section_type(cls: type, name: str) -> type | None:
    """The dataclass of field ``name`` of ``cls`` (unwrapping Optional), or None for a leaf."""
    hint = typing.get_type_hints(cls)[name]
    for candidate in (hint, *typing.get_args(hint)):  # Optional[X] is Union[X, None]
        if isinstance(candidate, type) and is_dataclass(candidate):
            return candidate
    return None


def _check_keys(raw: Any, cls: type, prefix: str, origin: str) -> None:
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "the recipe"
        raise ConfigError(f"Invalid {where} in {origin}: expected a mapping of keys, got {raw!r}")
    valid = [f.name for f in fields(cls)]
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in valid:
            names = [v for v in valid if v not in _ALIASES]
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            section = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
            raise ConfigError(f"Unknown key '{full}' in {origin}{hint} Valid keys of {section}: {', '.join(valid)}")
        sub = _section_type(cls, key)
        if sub is not None and value is not None:
            _check_keys(value, sub, f"{full}.", origin)


# ---------------------------------------------------------------------------------------------
# pass 3: values


def _positive(cfg: TrainConfig, key: str, minimum: float = 1) -> None:
    value = _get(cfg, key)
    if value is not None and value < minimum:
        raise ConfigError(f"Invalid {key}: {value!r} (must be >= {minimum:g})")


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_finite(value: Any, key: str) -> None:
    """Every float of the recipe is finite: NaN and inf pass range checks (``inf >= 0``), then
    fail (or train to a NaN loss) far into the run."""
    if is_dataclass(value):
        for f in fields(value):
            _check_finite(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, dict):
        for name, item in value.items():
            _check_finite(item, f"{key}.{name}")
    elif isinstance(value, (list, tuple)):
        if any(isinstance(v, float) and not math.isfinite(v) for v in value):
            raise ConfigError(f"Invalid {key}: {list(value)!r} (must be finite numbers)")
        for item in value:
            _check_finite(item, key)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"Invalid {key}: {value!r} (must be a finite number)")


def _validate(cfg: TrainConfig) -> None:
    _check_finite(cfg, "")
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Invalid {key}: {value!r} (expected one of {', '.join(allowed)}){hint}")
    for key in (
        "data.batch_size",
        "data.eval_batch_size",
        "data.size",
        "data.shard_size",
        "devices",
        "log_interval",
        "task.timesteps",
        "model.blocks_per_level",
        "model.num_heads",
        "data.train_samples",
        "threads",
        "num_nodes",
        "accumulate",
    ):
        _positive(cfg, key)
    for key in (
        "data.num_workers",
        "data.shuffle_buffer",
        "data.crop_padding",
        "task.num_samples",
        "optimizer.lr",
        "optimizer.weight_decay",
        "optimizer.eps",
        "task.label_smoothing",
        "schedule.min_lr_ratio",
    ):
        _positive(cfg, key, 0)
    if cfg.data.size < 8:
        raise ConfigError(f"Invalid data.size: {cfg.data.size!r} (must be >= 8: the digits are 8x8)")
    if not 0 <= cfg.task.label_smoothing < 1:
        raise ConfigError(f"Invalid task.label_smoothing: {cfg.task.label_smoothing!r} (must be in [0, 1))")
    if not 0 <= cfg.schedule.min_lr_ratio <= 1:
        raise ConfigError(f"Invalid schedule.min_lr_ratio: {cfg.schedule.min_lr_ratio!r} (must be in [0, 1])")
    betas = list(cfg.optimizer.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"Invalid optimizer.betas: {betas!r} (expected two numbers in [0, 1))")
    if not 0 < cfg.task.beta_start <= cfg.task.beta_end < 1:
        raise ConfigError(
            f"Invalid task.beta_start / task.beta_end: {cfg.task.beta_start!r}, {cfg.task.beta_end!r} "
            "(need 0 < beta_start <= beta_end < 1)"
        )
    bad_t = [t for t in cfg.task.eval_timesteps if not 0 <= t < cfg.task.timesteps]
    if not cfg.task.eval_timesteps or bad_t:
        raise ConfigError(
            f"Invalid task.eval_timesteps: {list(cfg.task.eval_timesteps)!r} "
            f"(need at least one step, each in [0, {cfg.task.timesteps - 1}])"
        )
    if not cfg.model.widths or any(w < 1 for w in cfg.model.widths):
        raise ConfigError(f"Invalid model.widths: {list(cfg.model.widths)!r} (need positive channel counts)")
    is_unet = cfg.model.name.lower() == "unet"
    if is_unet != (cfg.task.name == "ddpm"):
        raise ConfigError(
            f"Invalid model.name / task.name: {cfg.model.name!r} with {cfg.task.name!r} "
            "(model 'unet' trains task 'ddpm'; classification models train task 'classification')"
        )
    if is_unet and cfg.data.size % 2 ** (len(cfg.model.widths) - 1) and cfg.data.name == "digits":
        raise ConfigError(
            f"Invalid data.size: {cfg.data.size} (the UNet with {len(cfg.model.widths)} levels needs a multiple of "
            f"{2 ** (len(cfg.model.widths) - 1)})"
        )
    if cfg.data.name != "digits" and not cfg.data.path:
        if not (cfg.data.name == "cifar10" and cfg.data.download):
            raise ConfigError(
                f"Missing data.path for data.name {cfg.data.name!r} (a folder of shards written by coap-data)"
            )
    duration_parts("max_duration", cfg.max_duration)
    duration_parts("eval_interval", cfg.eval_interval)
    if cfg.checkpoint.interval is not None:
        duration_parts("checkpoint.interval", cfg.checkpoint.interval)
    warmup, unit = (
        duration_parts("schedule.warmup", cfg.schedule.warmup) if cfg.schedule.warmup not in ("0", "0ba") else (0, "ba")
    )
    if unit != "ba":
        raise ConfigError(f"Invalid schedule.warmup: {cfg.schedule.warmup!r} (give batches, e.g. '100ba')")
    if cfg.optimizer.name == "sgd" and cfg.coap is not None:
        raise ConfigError("Invalid optimizer.name: 'sgd' with a coap section (COAP replaces adamw, adam or adafactor)")
    if cfg.coap is not None:
        _validate_coap(cfg.coap)
    _validate_training_knobs(cfg)


_COMPILE_KEYS = ("backend", "mode", "dynamic", "fullgraph", "options")
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_WANDB_MODES = ("online", "offline", "disabled")
# the package each logger needs, and its pip name
_LOGGER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def _validate_training_knobs(cfg: TrainConfig) -> None:
    """``accumulate``, ``clip_grad_norm``, ``ema``, ``compile``, multi-node and ``loggers``."""
    import importlib.util

    if cfg.data.batch_size % cfg.accumulate:
        raise ConfigError(
            f"Invalid accumulate: {cfg.accumulate} (data.batch_size {cfg.data.batch_size} is the batch of one "
            "optimizer step and must be a multiple of it)"
        )
    if cfg.clip_grad_norm is not None and not cfg.clip_grad_norm > 0:
        raise ConfigError(f"Invalid clip_grad_norm: {cfg.clip_grad_norm!r} (must be > 0, or null for no clipping)")
    if cfg.parallelism == "fsdp2":
        for key, on in (
            ("ema", cfg.ema is not None),
            ("clip_grad_norm", cfg.clip_grad_norm is not None),
            ("compile", cfg.compile),
        ):
            if on:
                raise ConfigError(
                    f"Invalid {key} with parallelism: fsdp2 (not supported together yet): remove {key}, or use "
                    "parallelism: ddp"
                )
    if cfg.coap is not None and cfg.coap.step_in_backward:
        # what needs every gradient before any step, or shards them after the backward pass
        for key, on, why in (
            ("clip_grad_norm", cfg.clip_grad_norm is not None, "clips by the norm of every gradient"),
            ("precision", cfg.precision == "fp16", "fp16 scales the loss (GradScaler) and may skip a step"),
            ("parallelism", cfg.parallelism == "fsdp2", "fsdp2 reduce-scatters the gradients after backward"),
        ):
            if on:
                raise ConfigError(
                    f"Invalid {key} with coap.step_in_backward: true ({why}, which a step inside backward "
                    f"cannot wait for): remove {key}, or set coap.step_in_backward: false"
                )
    if cfg.ema is not None:
        if not 0 < cfg.ema.decay < 1:
            raise ConfigError(f"Invalid ema.decay: {cfg.ema.decay!r} (must be in (0, 1))")
        _positive(cfg, "ema.update_interval")
    unknown = sorted(set(cfg.compile_options) - set(_COMPILE_KEYS))
    if unknown:
        raise ConfigError(
            f"Invalid compile_options: unknown key {unknown[0]!r} (torch.compile takes {', '.join(_COMPILE_KEYS)})"
        )
    if cfg.compile_options and not cfg.compile:
        raise ConfigError(
            f"Invalid compile_options: {dict(cfg.compile_options)!r} with compile: false (set compile=true to use them)"
        )
    if "mode" in cfg.compile_options and "options" in cfg.compile_options:
        raise ConfigError("Invalid compile_options: give mode or options, not both (torch.compile takes one of them)")
    for key in ("fullgraph", "dynamic"):
        value = cfg.compile_options.get(key)
        if key in cfg.compile_options and not (isinstance(value, bool) or (key == "dynamic" and value is None)):
            allowed = "true or false" + (", or null" if key == "dynamic" else "")
            raise ConfigError(f"Invalid compile_options.{key}: {value!r} (expected {allowed})")
    options = cfg.compile_options.get("options")
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"Invalid compile_options.options: {options!r} (expected a mapping of inductor options)")
    mode = cfg.compile_options.get("mode")
    if mode is not None and mode not in _COMPILE_MODES:
        raise ConfigError(f"Invalid compile_options.mode: {mode!r} (expected one of {', '.join(_COMPILE_MODES)})")
    backend = cfg.compile_options.get("backend")
    if cfg.compile and backend is not None:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if backend not in known:
            raise ConfigError(f"Invalid compile_options.backend: {backend!r} (expected one of {', '.join(known)})")
    r = cfg.rendezvous
    if r.node_rank is not None and not 0 <= r.node_rank < cfg.num_nodes:
        raise ConfigError(
            f"Invalid rendezvous.node_rank: {r.node_rank!r} (must be in [0, {cfg.num_nodes - 1}] for num_nodes "
            f"{cfg.num_nodes})"
        )
    if r.master_port is not None and not 1 <= r.master_port <= 65535:
        raise ConfigError(f"Invalid rendezvous.master_port: {r.master_port!r} (must be in [1, 65535])")
    if r.master_addr is not None and not r.master_addr.strip():
        raise ConfigError("Invalid rendezvous.master_addr: '' (a host name or address of node 0)")
    if cfg.loggers.wandb is not None and cfg.loggers.wandb.mode not in (None, *_WANDB_MODES):
        raise ConfigError(
            f"Invalid loggers.wandb.mode: {cfg.loggers.wandb.mode!r} (expected one of {', '.join(_WANDB_MODES)}, "
            "or null for $WANDB_MODE, else offline)"
        )
    for name, package in _LOGGER_PACKAGES.items():
        if getattr(cfg.loggers, name) is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(f"Invalid loggers.{name}: the {package} package is not installed (pip install {package})")
    if cfg.loggers.wandb is not None and cfg.trainer == "composer":
        _check_composer_wandb()


def _check_composer_wandb() -> None:
    """Composer 0.32's ``WandBLogger`` calls ``wandb.run.get_url()``, which recent wandb releases
    no longer have (they have ``Run.url``): refuse the pair before a run starts and fails in
    Composer's logger set-up."""
    from importlib.metadata import version

    from wandb.sdk.wandb_run import Run

    if not hasattr(Run, "get_url"):
        raise ConfigError(
            f"Invalid loggers.wandb with trainer composer: Composer's WandBLogger needs a wandb with Run.get_url, "
            f"which wandb {version('wandb')} no longer has (install an older wandb, or use trainer: lightning)"
        )


def _validate_coap(coap: CoapConfig) -> None:
    """Check the section with the adapters' own validation; resolve ``rank_ratio_cnn`` into
    ``rank_ratio_conv``."""
    from .._checks import SettingError
    from ..settings import CoapSettings

    alias = coap.rank_ratio_cnn is not None
    if alias:
        if coap.rank_ratio_conv is not None and coap.rank_ratio_conv != coap.rank_ratio_cnn:
            raise ConfigError(
                f"Invalid coap.rank_ratio_cnn: {coap.rank_ratio_cnn!r} with coap.rank_ratio_conv: "
                f"{coap.rank_ratio_conv!r} "
                "(rank_ratio_cnn is an alias of rank_ratio_conv: give one of them)"
            )
        coap.rank_ratio_conv, coap.rank_ratio_cnn = coap.rank_ratio_cnn, None
    try:
        given = {f.name: getattr(coap, f.name) for f in fields(coap) if f.name != "rank_ratio_cnn"}
        CoapSettings(**dict(given, exclude=tuple(coap.exclude)))
    except SettingError as exc:  # the offending key comes with the error
        key = "rank_ratio_cnn" if alias and exc.key == "rank_ratio_conv" else exc.key
        raise ConfigError(f"Invalid coap.{key}: {exc.reason}") from None
    except ValueError as exc:
        raise ConfigError(f"Invalid coap section: {exc}") from None


# ---------------------------------------------------------------------------------------------


def _omegaconf() -> Any:
    try:
        import omegaconf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("coap-train needs omegaconf; install it with `pip install coap-plugins[vision]`") from exc
    return omegaconf


def _parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    OmegaConf = _omegaconf().OmegaConf
    parsed = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"Invalid override {item!r} (expected dotted.key=value, e.g. optimizer.lr=3e-4)")
        key, _ = item.split("=", 1)
        value = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        for part in key.split("."):
            value = value[part]
        parsed.append((key.strip(), value))
    return parsed


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _read_recipe(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """A recipe file as a dict, with its ``base:`` recipe (a path relative to it) merged under it."""
    OmegaConf = _omegaconf().OmegaConf
    if not path.is_file():
        raise FileNotFoundError(f"Recipe not found: {path}" + (f" (the base of {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"Recipe {path} is its own base (through {' -> '.join(str(p) for p in seen)})")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
    except Exception as exc:  # YAML syntax errors come in several types
        raise ConfigError(f"Cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Invalid recipe {path}: expected a mapping of keys, got {raw!r}")
    base = raw.pop("base", None)
    _check_keys(raw, TrainConfig, "", str(path))
    if base is None:
        return raw
    parent = _read_recipe(path.parent / str(base), (*seen, path.resolve()))
    return OmegaConf.to_container(OmegaConf.merge(parent, raw))  # type: ignore[return-value]


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Sequence[str] = (),
    *,
    data: dict[str, Any] | None = None,
) -> TrainConfig:
    """Read a recipe (``path``, or a ``data`` mapping), apply ``overrides``, validate.

    A recipe may start from another: ``base: ../composer/resnet18_digits.yaml`` (relative to the
    recipe) loads that one first and lays this file's keys over it (``coap: null`` removes a
    base's ``coap`` section).

    Returns a plain :class:`TrainConfig` (dataclasses all the way down, no OmegaConf nodes);
    ``output_dir`` defaults to ``runs/<trainer>/<name>`` and ``name`` to the recipe's file name.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: an unknown key, a wrong type or a bad value; the message names the key.
    """
    omegaconf = _omegaconf()
    OmegaConf = omegaconf.OmegaConf
    if path is not None:
        path = Path(path)
        origin = str(path)
        raw = _read_recipe(path, ())
    else:
        origin = "the given config"
        raw = dict(data or {})
    _check_keys(raw, TrainConfig, "", origin)
    layers = [raw]
    for key, value in _parse_overrides(overrides):
        layer = _nest(key, value)
        _check_keys(layer, TrainConfig, "", "the overrides")
        layers.append(layer)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), *layers)
        cfg: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except omegaconf.errors.OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"Invalid {key}: {reason}") from None
    if cfg.name is None:
        cfg.name = path.stem if path is not None else "run"
    if cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / cfg.trainer / cfg.name)
    _validate(cfg)
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved recipe as YAML (written to ``output_dir/config.yaml``)."""
    OmegaConf = _omegaconf().OmegaConf
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
