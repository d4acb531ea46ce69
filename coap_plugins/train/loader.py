"""Data for ``coap-train``: find or write the shards, and stream them in resumable epochs.

:class:`ShardLoader` is an iterable of batches ``(images, labels, indices)`` over webdataset
shards.  Epoch ``e`` is a fresh pipeline whose shuffles are seeded from ``(seed, e)`` alone, so
the data order of any epoch does not depend on how the run got there (a resumed run sees the
same batches as one that never stopped).  Training epochs have a fixed length per rank
(``ceil(samples / (world_size * batch_size))`` full batches, the stream repeating when a rank's
shards run out), so every rank takes the same number of steps under DDP; evaluation reads every
sample exactly once, split across ranks sample by sample.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from .._extras import require
from ._dist import rank_world
from .config import DataConfig
from .data import check_shards, read_meta, shard_dataset, write_cifar10_shards, write_digits_shards

__all__ = ["DataBundle", "ShardLoader", "cache_dir", "prepare_data", "prepare_shards"]


def cache_dir() -> Path:
    """Where automatically written shards go: ``$COAP_DATA_CACHE`` or ``~/.cache/coap-plugins``."""
    return Path(os.environ.get("COAP_DATA_CACHE") or Path.home() / ".cache" / "coap-plugins")


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; another process may have won the race (same content)."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "meta.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _write_once(final: Path, write: Any) -> Path:
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write(tmp / "shards")
        _publish(tmp / "shards", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _download_cifar10(dest: Path) -> Path:
    torchvision = require("torchvision", "vision", what="data.download")
    raw = dest.parent / "cifar10-raw"
    try:
        torchvision.datasets.CIFAR10(str(raw), train=True, download=True)
    except Exception as exc:  # urllib raises several types when offline
        raise ConnectionError(
            f"Downloading CIFAR-10 into {raw} failed ({type(exc).__name__}: {exc}); this machine may be offline. "
            "Put cifar-10-batches-py on disk, run `coap-data cifar10 SRC --out DIR` and set data.path=DIR"
        ) from None
    return _write_once(dest, lambda out: write_cifar10_shards(raw, out))


def prepare_shards(cfg: DataConfig) -> Path:
    """The shard folder for ``cfg``, writing digits (or downloading CIFAR-10 when asked) if needed.

    Raises:
        FileNotFoundError: ``data.path`` does not exist (and nothing may be written there).
        ValueError: the folder holds no shards.
    """
    if cfg.name == "digits":
        final = Path(cfg.path) if cfg.path else cache_dir() / f"digits-{cfg.size}px-{cfg.shard_size}"
        return _write_once(final, lambda out: write_digits_shards(out, size=cfg.size, shard_size=cfg.shard_size))
    if cfg.path and (Path(cfg.path) / "meta.json").is_file():
        return Path(cfg.path)
    if cfg.name == "cifar10" and cfg.download:
        return _download_cifar10(Path(cfg.path) if cfg.path else cache_dir() / "cifar10-shards")
    where = Path(cfg.path or ".")
    if not where.exists():
        raise FileNotFoundError(
            f"Data folder not found: {where} (data.path; write shards with "
            f"`coap-data {cfg.name if cfg.name != 'shards' else 'imagefolder'} SRC --out {where}`)"
        )
    raise ValueError(f"No shards in {where}: meta.json is missing (data.path must be a folder written by coap-data)")


class ShardLoader:
    """Batches ``(images, labels, indices)`` from shards, one reproducible pipeline per epoch.

    Args:
        source: shard folder.
        split: ``"train"`` or ``"val"``.
        batch_size: samples per batch (per rank).
        num_samples: samples in the split (after ``limit``).
        train: training stream (shuffled, fixed epoch length, repeats) or evaluation (in order,
            every sample once, split across ranks sample by sample).
        seed: seed of the shuffles (default 0).
        shuffle_buffer: sample shuffle buffer for training (default 1000).
        num_workers: DataLoader workers (default 0).
        limit: keep only samples whose index is below this (default None: all).
        num_shards: shard files of the split; each reader (rank x worker) needs one.
        micro_batches: yield each training batch as this many consecutive micro-batches of
            ``batch_size / micro_batches`` samples (default 1): the same samples in the same
            order, for a trainer that accumulates gradients over loader batches (Lightning's
            ``accumulate_grad_batches``).
    """

    def __init__(
        self,
        source: Path,
        split: str,
        batch_size: int,
        num_samples: int,
        *,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        limit: int | None = None,
        num_shards: int = 1,
        micro_batches: int = 1,
    ) -> None:
        if batch_size % micro_batches:
            raise ValueError(f"batch_size {batch_size} is not a multiple of micro_batches {micro_batches}")
        self.micro_batches = micro_batches if train else 1
        self.step_batch_size = batch_size
        batch_size //= self.micro_batches
        self.source, self.split, self.batch_size = source, split, batch_size
        self.train, self.seed, self.shuffle_buffer = train, seed, shuffle_buffer
        self.num_workers, self.limit = num_workers, limit
        self.epoch = 0
        self._skip = 0
        self.num_samples = num_samples
        self.num_shards = num_shards

    @property
    def world_size(self) -> int:
        # read when used: Lightning starts its DDP processes after the loaders are made
        return rank_world()[1]

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch and rank: every rank takes the same number of training steps."""
        world, workers = self.world_size, max(1, self.num_workers)
        readers = world * workers if self.train and self.limit is None else workers
        if self.num_shards < readers:
            raise ValueError(
                f"{self.source} has {self.num_shards} {self.split} shard(s) for {readers} readers "
                f"({world} rank(s) x {workers} worker(s)); write smaller shards "
                "(coap-data --shard-size, or data.shard_size for digits) or lower data.num_workers"
            )
        if self.train:  # whole optimizer steps of step_batch_size samples, in micro-batches
            return math.ceil(self.num_samples / (world * self.step_batch_size)) * self.micro_batches
        return math.ceil(math.ceil(self.num_samples / world) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch`` on the next iteration (its order depends on ``(seed, epoch)`` only)."""
        self.epoch = int(epoch)

    def skip(self, batches: int) -> None:
        """Drop the first ``batches`` batches of the next iteration (resuming mid-epoch)."""
        self._skip = int(batches)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _pipeline(self) -> Any:
        workers = max(1, self.num_workers)
        if self.train:
            steps = self.batches_per_epoch // self.micro_batches
            per_worker = math.ceil(steps / workers) * self.step_batch_size
            ds = shard_dataset(
                self.source,
                self.split,
                shuffle_buffer=self.shuffle_buffer,
                seed=self.seed * 100_003 + self.epoch * 7_919,
                epoch_length=per_worker,
                with_index=True,
                # a subset (limit) may sit in a few shards: every rank reads all and keeps its share
                rank_split="shard" if self.limit is None else "sample",
            )
        else:
            ds = shard_dataset(self.source, self.split, rank_split="sample", with_index=True)
        if self.limit is not None:
            ds.append(_Below(self.limit))
        return ds

    def __iter__(self) -> Iterator[Any]:
        # a generator: nothing (pipeline, skip) is read until the first batch is asked for, so
        # frameworks that call iter() only to check that the loader is iterable change nothing
        # the workers batch whole optimizer steps, split here: each step's micro-batches are one
        # worker's batch, as for a trainer that splits the step's batch itself
        loader = torch.utils.data.DataLoader(
            self._pipeline(), batch_size=self.step_batch_size, num_workers=self.num_workers, drop_last=False
        )
        skip, self._skip = self._skip, 0
        k = self.micro_batches
        if not self.train:
            yield from islice(iter(loader), skip, None)
            return
        for i, batch in enumerate(islice(loader, skip // k, self.batches_per_epoch // k)):
            parts = zip(*(t.split(self.batch_size) for t in batch)) if k > 1 else [batch]
            yield from islice(parts, skip % k if i == 0 else 0, None)


class _Below:
    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, src: Any) -> Any:
        return (s for s in src if s[2] < self.limit)


@dataclass
class DataBundle:
    """Everything the runner needs to know about the data."""

    train: ShardLoader
    eval: ShardLoader
    meta: dict[str, Any]
    source: Path
    in_chans: int
    num_classes: int
    size: tuple[int, int]


def prepare_data(cfg: DataConfig, seed: int, *, micro_batches: int = 1) -> DataBundle:
    """Shards for ``cfg`` (written on first use for digits), checked, and their train and eval loaders.

    ``micro_batches``: the training loader yields each batch as that many micro-batches (see
    :class:`ShardLoader`).

    Raises:
        ValueError: a shard is unreadable or disagrees with ``meta.json`` (the message names it).
    """
    source = prepare_shards(cfg)
    meta = read_meta(source)
    check_shards(source, meta)
    counts, shards = meta["counts"], meta["shards"]
    for split in ("train", "val"):
        if not counts.get(split):
            raise ValueError(f"{source} has no {split} samples (meta.json counts: {counts})")
    n_train = counts["train"] if cfg.train_samples is None else min(cfg.train_samples, counts["train"])
    train = ShardLoader(
        source,
        "train",
        cfg.batch_size,
        n_train,
        train=True,
        seed=seed,
        shuffle_buffer=cfg.shuffle_buffer,
        num_workers=cfg.num_workers,
        limit=cfg.train_samples,
        num_shards=len(shards["train"]),
        micro_batches=micro_batches,
    )
    evaluation = ShardLoader(
        # evaluation reads every shard on every rank; more workers than shards would idle
        source,
        "val",
        cfg.eval_batch_size,
        counts["val"],
        train=False,
        num_workers=min(cfg.num_workers, len(shards["val"])),
        num_shards=len(shards["val"]),
    )
    return DataBundle(
        train=train,
        eval=evaluation,
        meta=meta,
        source=source,
        in_chans=int(meta["channels"]),
        num_classes=len(meta["classes"]),
        size=tuple(meta["size"]),
    )
