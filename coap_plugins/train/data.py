"""Image data as webdataset shards: writers, a reader, and the ``coap-data`` console script.

Shard layout (the same for every source)::

    OUT/train-000000.tar, train-000001.tar, ...
    OUT/val-000000.tar, ...
    OUT/meta.json

Each sample holds ``__key__`` (``"<split>-<index:06d>"``), ``image.npy`` (a C x H x W numpy
array) and ``cls`` (the integer label).  The array's dtype says how to read it:

- ``float32``: stored ready to use.  The digits writer stores the images exactly as
  :func:`coap_plugins.train.digits.load_digits_tensors` returns them, i.e. already normalized with
  the training images' mean and std (``meta["normalized"]`` is ``true``).
- ``uint8``: raw 8-bit pixels (ImageFolder, CIFAR-10), a quarter of the float size on disk;
  :func:`shard_dataset` scales them to ``[0, 1]`` (``meta["normalized"]`` is ``false``).

``meta.json`` records ``counts`` per split, ``shards`` per split, ``size`` (H, W), ``channels``,
``classes`` (names in label order), ``mean`` / ``std`` (per channel, over the training images
as :func:`shard_dataset` yields them, so a runner can normalize uint8 sources) and ``source``.

Writing is deterministic: the same inputs and seed give byte-identical shards (tar member times
are fixed).  webdataset (the ``vision`` extra) is imported only by the functions that need it.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import pickle
import re
import sys
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .._checks import check_positive_int
from .._extras import require
from ._dist import rank_world

__all__ = [
    "IMAGE_EXTENSIONS",
    "check_shards",
    "main",
    "read_meta",
    "shard_dataset",
    "write_cifar10_shards",
    "write_digits_shards",
    "write_imagefolder_shards",
]

Split = Literal["train", "val"]
_SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_FILES = (*_CIFAR_TRAIN, "test_batch", "batches.meta")


def _import_webdataset() -> Any:
    return require("webdataset", "vision", what="coap_plugins.train.data")


def _check_split(split: Any) -> None:
    if split not in _SPLITS:
        raise ValueError(f"Invalid split: {split!r} (expected one of {', '.join(_SPLITS)})")


def _as_float_image(array: np.ndarray) -> np.ndarray:
    """What :func:`shard_dataset` yields for a stored array (uint8 scaled to [0, 1])."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32, copy=False)


def _write_split(
    out_dir: Path, split: str, images: Iterable[np.ndarray], labels: Iterable[int], shard_size: int
) -> tuple[int, list[str]]:
    """Write one split into ``shard_size``-sample tar files; returns (count, shard names)."""
    wds = _import_webdataset()
    count, names, writer = 0, [], None
    try:
        for image, label in zip(images, labels):
            if count % shard_size == 0:
                if writer is not None:
                    writer.close()
                name = f"{split}-{len(names):06d}.tar"
                names.append(name)
                # mtime fixed so that the same data gives byte-identical shards
                writer = wds.TarWriter(str(out_dir / name), mtime=0.0)
            writer.write(
                {"__key__": f"{split}-{count:06d}", "image.npy": np.ascontiguousarray(image), "cls": int(label)}
            )
            count += 1
    finally:
        if writer is not None:
            writer.close()
    return count, names


def _channel_stats(images: Sequence[np.ndarray]) -> tuple[list[float], list[float]]:
    if len(images) == 0:
        return [], []
    channels = images[0].shape[0]
    total = np.zeros(channels, dtype=np.float64)
    total_sq = np.zeros(channels, dtype=np.float64)
    n = 0
    for image in images:
        x = _as_float_image(image).reshape(channels, -1).astype(np.float64)
        total += x.sum(axis=1)
        total_sq += (x * x).sum(axis=1)
        n += x.shape[1]
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1))
    return [float(v) for v in mean], [float(v) for v in std]


def _write_all(
    out_dir: str | os.PathLike[str],
    splits: dict[str, tuple[Sequence[np.ndarray], Sequence[int]]],
    *,
    classes: Sequence[str],
    shard_size: int,
    source: dict[str, Any],
    normalized: bool,
) -> dict[str, Any]:
    check_positive_int("shard_size", shard_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for s in _SPLITS for p in out.glob(f"{s}-*.tar"))
    if stale:
        raise FileExistsError(
            f"Output folder {out} already holds shards ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}); "
            "choose an empty folder or remove them first"
        )
    train_images = splits["train"][0]
    first = train_images[0] if len(train_images) else splits["val"][0][0]
    counts, shards = {}, {}
    for split in _SPLITS:
        images, labels = splits[split]
        counts[split], shards[split] = _write_split(out, split, images, labels, shard_size)
    mean, std = _channel_stats(train_images)
    meta = {
        "counts": counts,
        "shards": shards,
        "size": [int(first.shape[1]), int(first.shape[2])],
        "channels": int(first.shape[0]),
        "dtype": str(first.dtype),
        "normalized": normalized,
        "classes": list(classes),
        "mean": mean,
        "std": std,
        "source": source,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(shard_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a shard folder written by this module."""
    path = Path(shard_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"No meta.json in {shard_dir} (expected a folder written by coap-data)")
    return json.loads(path.read_text())


# webdataset's grouping: a sample's key is the member name up to the first dot of its file name
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _shard_error(path: Path, problem: str) -> ValueError:
    return ValueError(
        f"Shard {path} {problem}; write the shards again (coap-data; digits shards are rewritten on first use "
        "once their folder is removed)"
    )


def _shard_keys(path: Path) -> list[str]:
    """The sample keys of one shard in order, from its tar headers alone (no sample data is read)."""
    keys: list[str] = []
    parts: list[set[str]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                m = _MEMBER.match(member.name)
                if not member.isfile() or m is None:
                    continue
                if not keys or keys[-1] != m.group(1):
                    keys.append(m.group(1))
                    parts.append(set())
                parts[-1].add(m.group(2))
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _shard_error(path, f"cannot be read ({exc}): it is truncated or corrupt") from None
    # tarfile ends quietly at a damaged header after the first, or at the end of a file cut between
    # two members: the end-of-archive zero blocks, and only they, must follow the last member
    with path.open("rb") as f:
        f.seek(end)
        rest = f.read()
    if not rest:
        raise _shard_error(path, f"ends at byte {end} without the end-of-archive blocks: it is truncated")
    if rest.strip(b"\0"):
        raise _shard_error(path, f"has an unreadable tar header at byte {end}: it is corrupt")
    for key, exts in zip(keys, parts):
        if not {"image.npy", "cls"} <= exts:
            raise _shard_error(path, f"holds a sample {key!r} with {sorted(exts)}, expected image.npy and cls")
    return keys


def _shard_to_blame(shards: list[tuple[Path, list[int]]]) -> Path:
    """The shard of a split whose total disagrees with meta.json.  Writers number samples
    consecutively across shards, so the first break in the numbering points at it (a shard that
    lost its tail leaves a gap before the next one); the last shard when nothing breaks."""
    expected = 0
    for i, (path, indices) in enumerate(shards):
        start = indices[0] if indices else expected
        if start > expected and i > 0:
            return shards[i - 1][0]
        if start != expected or indices != list(range(start, start + len(indices))):
            return path
        expected = start + len(indices)
    return shards[-1][0]


def check_shards(shard_dir: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> None:
    """Check a shard folder before training: every tar readable, every split as long as ``meta.json`` says.

    Reads the tar headers only (a seek per member), so it is cheap next to an epoch; a truncated
    or corrupt shard, or one whose samples disagree with the index, would otherwise stop
    training mid-epoch with a webdataset traceback.  Sample data are not decoded.

    Args:
        shard_dir: a folder written by this module.
        meta: its ``meta.json`` when already read (default None: read here).

    Raises:
        ValueError: the message names the shard file.
    """
    folder = Path(shard_dir)
    meta = read_meta(folder) if meta is None else meta
    index = folder / "meta.json"
    for split in _SPLITS:
        missing = [name for name in meta.get("shards", {}).get(split, []) if not (folder / name).is_file()]
        if missing:
            raise _shard_error(folder / missing[0], f"is listed in {index} but missing")
        shards = []
        for path in sorted(folder.glob(f"{split}-*.tar")):  # the files the reader opens
            keys = _shard_keys(path)
            indices = [_key_index({"__key__": key, "__url__": str(path)}) for key in keys]
            shards.append((path, indices))
        total, expected = sum(len(i) for _, i in shards), meta.get("counts", {}).get(split)
        if shards and expected is not None and total != expected:
            path = _shard_to_blame(shards)
            held = next(i for p, i in shards if p == path)
            numbered = f", numbered {held[0]} to {held[-1]}" if held else ""
            raise _shard_error(
                path,
                f"disagrees with the index {index}: the {split} shards hold {total} samples, the index counts "
                f"{expected} (this shard holds {len(held)}{numbered})",
            )


def write_digits_shards(
    out_dir: str | os.PathLike[str],
    size: int = 16,
    seed: int = 0,
    test_fraction: float = 0.25,
    shard_size: int = 1000,
) -> dict[str, Any]:
    """scikit-learn's digits, split by :func:`~coap_plugins.train.digits.load_digits_tensors`, as shards.

    The train split is ``x_train``/``y_train`` and the val split ``x_test``/``y_test``, in the
    order ``load_digits_tensors(size, seed, test_fraction)`` returns them, stored as float32
    1 x size x size arrays already normalized (see the module docstring).

    Args:
        out_dir: folder to write (created; must not hold shards already).
        size: image side, >= 8 (default 16).
        seed: seed of the stratified split (default 0).
        test_fraction: share of the images in the val split, in (0, 1) (default 0.25).
        shard_size: samples per shard file (default 1000).

    Returns:
        The metadata written to ``meta.json``.
    """
    from .digits import load_digits_tensors

    check_positive_int("shard_size", shard_size)
    data = load_digits_tensors(size=size, seed=seed, test_fraction=test_fraction)
    splits = {
        "train": (list(data.x_train.numpy()), data.y_train.tolist()),
        "val": (list(data.x_test.numpy()), data.y_test.tolist()),
    }
    source = {"name": "digits", "seed": seed, "test_fraction": test_fraction}
    return _write_all(
        out_dir, splits, classes=[str(i) for i in range(10)], shard_size=shard_size, source=source, normalized=True
    )


def _load_image(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def write_imagefolder_shards(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_size: int = 1000,
) -> dict[str, Any]:
    """A torchvision-style ImageFolder (``SRC/<class>/<image>``) as train/val shards.

    Classes are the sorted subfolder names (label = position, as torchvision does); images with
    the extensions in :data:`IMAGE_EXTENSIONS` are loaded with PIL as RGB and stored as uint8
    3 x H x W.  Per class, ``round(n * val_fraction)`` images chosen by ``seed`` go to val.
    Samples are written class by class, in sorted file order.

    Args:
        src: the ImageFolder root.
        out_dir: folder to write (created; must not hold shards already).
        size: resize every image to ``size x size`` (bilinear); ``None`` keeps the sizes, which
            must then all be equal (default ``None``).
        val_fraction: share of each class in the val split, in [0, 1) (default 0.1).
        seed: seed of the split (default 0).
        shard_size: samples per shard file (default 1000).

    Returns:
        The metadata written to ``meta.json``.
    """
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root not found: {root} (expected a folder with one subfolder per class)")
    if size is not None:
        check_positive_int("size", size)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"Invalid val_fraction: {val_fraction!r} (must be in [0, 1))")
    check_positive_int("shard_size", shard_size)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"No class subfolders in {root} (expected SRC/<class>/<image>.png|.jpg)")
    rng = np.random.default_rng(seed)
    files: dict[str, list[tuple[Path, int]]] = {"train": [], "val": []}
    for label, name in enumerate(classes):
        paths = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise ValueError(
                f"Class folder {root / name} holds no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
            )
        n_val = int(round(len(paths) * val_fraction))
        val_idx = set(rng.permutation(len(paths))[:n_val].tolist())
        for i, path in enumerate(paths):
            files["val" if i in val_idx else "train"].append((path, label))
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    shape = None
    for split in _SPLITS:
        images = []
        for path, _ in files[split]:
            image = _load_image(path, size)
            if shape is None:
                shape = (image.shape, path)
            elif image.shape != shape[0]:
                raise ValueError(
                    f"Image {path} is {image.shape[2]}x{image.shape[1]} but {shape[1]} is "
                    f"{shape[0][2]}x{shape[0][1]}; pass size= (--size) to resize them all"
                )
            images.append(image)
        splits[split] = (images, [label for _, label in files[split]])
    source = {"name": "imagefolder", "path": str(root), "seed": seed, "val_fraction": val_fraction}
    return _write_all(out_dir, splits, classes=classes, shard_size=shard_size, source=source, normalized=False)


def _find_cifar_dir(src: Path) -> Path:
    for candidate in (src, src / "cifar-10-batches-py"):
        if candidate.is_dir() and (candidate / "data_batch_1").is_file():
            return candidate
    return src / "cifar-10-batches-py" if (src / "cifar-10-batches-py").is_dir() else src


def _unpickle(path: Path) -> dict[bytes, Any]:
    # The user's own CIFAR-10 download (the python version): pickles are the only format it has.
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def write_cifar10_shards(
    src: str | os.PathLike[str], out_dir: str | os.PathLike[str], shard_size: int = 5000
) -> dict[str, Any]:
    """An on-disk CIFAR-10 (torchvision's ``cifar-10-batches-py`` pickles) as shards.

    ``data_batch_1..5`` become the train split and ``test_batch`` the val split, in file order;
    images are uint8 3 x 32 x 32.  Nothing is downloaded: the files must already be there.

    Args:
        src: the ``cifar-10-batches-py`` folder or the folder that contains it.
        out_dir: folder to write (created; must not hold shards already).
        shard_size: samples per shard file (default 5000).

    Returns:
        The metadata written to ``meta.json``.
    """
    check_positive_int("shard_size", shard_size)
    folder = _find_cifar_dir(Path(src))
    missing = [name for name in _CIFAR_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 files missing in {folder}: {', '.join(missing)} (expected torchvision's "
            "cifar-10-batches-py folder, python version); nothing is downloaded, fetch it yourself first"
        )
    meta = _unpickle(folder / "batches.meta")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    splits: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    for split, names in (("train", _CIFAR_TRAIN), ("val", ("test_batch",))):
        images: list[np.ndarray] = []
        labels: list[int] = []
        for name in names:
            batch = _unpickle(folder / name)
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{folder / name}: data has shape {data.shape}, expected (N, 3072)")
            images.extend(data.reshape(-1, 3, 32, 32))
            labels.extend(int(v) for v in batch[b"labels"])
        splits[split] = (images, labels)
    source = {"name": "cifar10", "path": str(folder)}
    return _write_all(out_dir, splits, classes=classes, shard_size=shard_size, source=source, normalized=False)


def _shard_urls(pattern_or_dir: str | os.PathLike[str], split: str) -> list[str]:
    spec = str(pattern_or_dir)
    path = Path(spec)
    if path.is_dir():
        urls = sorted(glob.glob(str(path / f"{split}-*.tar")))
        if not urls:
            raise ValueError(
                f"No {split} shards in {path} (expected files named {split}-NNNNNN.tar, as coap-data writes)"
            )
        return urls
    if "{" in spec:
        from webdataset.shardlists import expand_urls

        urls = list(expand_urls(spec))
    elif any(c in spec for c in "*?["):
        urls = sorted(glob.glob(spec))
    elif path.suffix == ".tar":
        urls = [spec]
    else:
        raise FileNotFoundError(
            f"Shard directory not found: {spec} (expected a folder with {split}-NNNNNN.tar files, "
            "a brace pattern like DIR/train-{000000..000003}.tar, or a glob)"
        )
    if not urls:
        raise ValueError(f"No shards match {spec} (expected at least one .tar file)")
    local_missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if local_missing:
        raise FileNotFoundError(
            f"Shard file not found: {local_missing[0]} ({len(local_missing)} of the {len(urls)} files of {spec} "
            "are missing)"
        )
    return urls


def _key_index(sample: dict[str, Any]) -> int:
    m = re.search(r"(\d+)$", str(sample.get("__key__", "")))
    if m is None:
        raise ValueError(f"Sample key {sample.get('__key__')!r} in {sample.get('__url__')!r} does not end in an index")
    return int(m.group(1))


class _EveryNth:
    """Keep samples ``rank, rank + world, ...`` of the stream (a sample-level rank split)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __call__(self, src: Iterable[Any]) -> Iterable[Any]:
        for i, sample in enumerate(src):
            if i % self.world == self.rank:
                yield sample


def _decode_sample(sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
    if "image.npy" not in sample or "cls" not in sample:
        raise ValueError(
            f"Sample {sample.get('__key__')!r} in {sample.get('__url__')!r} has keys "
            f"{sorted(k for k in sample if not k.startswith('__'))}, expected image.npy and cls"
        )
    array = np.lib.format.read_array(io.BytesIO(sample["image.npy"]), allow_pickle=False)
    return torch.from_numpy(_as_float_image(array).copy()), int(sample["cls"])


def _decode_with_index(sample: dict[str, Any]) -> tuple[torch.Tensor, int, int]:
    return (*_decode_sample(sample), _key_index(sample))


def shard_dataset(
    pattern_or_dir: str | os.PathLike[str],
    split: Split,
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch_length: int | None = None,
    rank_split: Literal["shard", "sample"] = "shard",
    with_index: bool = False,
) -> Any:
    """A webdataset pipeline over shards, yielding ``(image, label)``.

    ``image`` is a float32 C x H x W tensor (uint8 shards scaled to [0, 1]), ``label`` an int.
    Shards are split across distributed ranks (``split_by_node``: ``RANK``/``WORLD_SIZE`` or an
    initialized process group) and then across DataLoader workers (``split_by_worker``), so each
    sample is seen once per pass; a rank or worker left without a shard yields nothing, so write
    at least ``world_size * num_workers`` shards (``shard_size``) for multi-process training.

    Args:
        pattern_or_dir: a shard folder (its ``<split>-*.tar`` files are used), a brace pattern
            (``DIR/train-{000000..000003}.tar``), a glob or one ``.tar`` file.
        split: ``"train"`` or ``"val"``; picks the files of a folder.
        shuffle_buffer: 0 keeps file order; > 0 shuffles the shard order and then the samples in
            a buffer of this many, reproducibly from ``seed`` (each pass a new order; the pass
            counter lives in the pipeline object, so DataLoader workers only see new orders
            across epochs with ``persistent_workers=True``).
        seed: seed of the shuffles (default 0); the same on every rank so ranks agree on the
            shard order.
        epoch_length: when given, the stream repeats the shards endlessly and each pass over the
            pipeline stops after this many samples (webdataset's ``with_epoch``), per rank and
            worker.
        rank_split: ``"shard"`` (default) gives each rank whole shards; ``"sample"`` has every
            rank read every shard and keep every ``world_size``-th sample, so ranks get equal
            shares (within one sample) whatever the shard count: for evaluation sets.
        with_index: yield ``(image, label, index)``, ``index`` being the sample's position in
            its split as the writer numbered it (its key), e.g. to draw fixed noise per image.

    Returns:
        A ``webdataset.DataPipeline`` (an ``IterableDataset``) for ``torch.utils.data.DataLoader``.
    """
    _check_split(split)
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
        raise ValueError(f"Invalid shuffle_buffer: {shuffle_buffer!r} (must be an integer >= 0)")
    if epoch_length is not None:
        check_positive_int("epoch_length", epoch_length)
    wds = _import_webdataset()
    urls = _shard_urls(pattern_or_dir, split)
    stages: list[Any] = [wds.SimpleShardList(urls)]
    if shuffle_buffer > 0:
        stages.append(wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed))
    if rank_split not in ("shard", "sample"):
        raise ValueError(f"Invalid rank_split: {rank_split!r} (expected 'shard' or 'sample')")
    if rank_split == "shard":
        stages += [wds.split_by_node, wds.split_by_worker, wds.tarfile_to_samples()]
    else:
        rank, world = rank_world()
        stages += [wds.split_by_worker, wds.tarfile_to_samples(), _EveryNth(rank, world)]
    if shuffle_buffer > 0:
        # a different seed than the shard shuffle, still identical on every rank/worker
        stages.append(wds.detshuffle(bufsize=shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed + 1))
    if with_index:
        stages.append(wds.map(_decode_with_index))
    else:
        stages.append(wds.map(_decode_sample))
    pipeline = wds.DataPipeline(*stages)
    if epoch_length is not None:
        pipeline = pipeline.with_epoch(epoch_length)
    return pipeline


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coap-data",
        description="Write image data sets as webdataset shards for coap-train (nothing is downloaded).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    digits = sub.add_parser("digits", help="scikit-learn's bundled 8x8 digits, upsampled")
    digits.add_argument("--out", required=True, help="output folder")
    digits.add_argument("--size", type=int, default=16, help="image side, >= 8 (default 16)")
    digits.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    digits.add_argument("--test-fraction", type=float, default=0.25, help="val share (default 0.25)")
    digits.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    folder = sub.add_parser("imagefolder", help="a torchvision-style ImageFolder (SRC/<class>/<image>)")
    folder.add_argument("src", help="ImageFolder root")
    folder.add_argument("--out", required=True, help="output folder")
    folder.add_argument("--size", type=int, default=None, help="resize to size x size (default: keep)")
    folder.add_argument("--val-fraction", type=float, default=0.1, help="val share per class (default 0.1)")
    folder.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    folder.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    cifar = sub.add_parser("cifar10", help="an on-disk CIFAR-10 (cifar-10-batches-py); never downloads")
    cifar.add_argument("src", help="the cifar-10-batches-py folder or its parent")
    cifar.add_argument("--out", required=True, help="output folder")
    cifar.add_argument("--shard-size", type=int, default=5000, help="samples per shard (default 5000)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``coap-data`` console script; returns the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "digits":
            meta = write_digits_shards(
                args.out, size=args.size, seed=args.seed, test_fraction=args.test_fraction, shard_size=args.shard_size
            )
        elif args.command == "imagefolder":
            meta = write_imagefolder_shards(
                args.src,
                args.out,
                size=args.size,
                val_fraction=args.val_fraction,
                seed=args.seed,
                shard_size=args.shard_size,
            )
        else:
            meta = write_cifar10_shards(args.src, args.out, shard_size=args.shard_size)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"coap-data: error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{n} {s}" for s, n in meta["counts"].items())
    size = "x".join(str(v) for v in meta["size"])
    print(f"wrote {counts} samples ({meta['channels']}x{size}, {len(meta['classes'])} classes) to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
