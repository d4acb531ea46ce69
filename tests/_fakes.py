"""Fake data sets the tests write: an ImageFolder of PNGs and an on-disk CIFAR-10."""

import pickle
from pathlib import Path

import numpy as np


def write_png_folder(root: Path, sizes: dict[str, int]) -> dict[str, list[np.ndarray]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = {}
    for name, n in sizes.items():
        (root / name).mkdir(parents=True)
        pixels[name] = []
        for i in range(n):
            array = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / name / f"img{i}.png")
            pixels[name].append(array.transpose(2, 0, 1))
    (root / next(iter(sizes)) / "notes.txt").write_text("not an image")
    return pixels


def write_fake_cifar(folder: Path, per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        batches[name] = (data, labels)
        with (folder / name).open("wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
    names = [
        n.encode() for n in ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    ]
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f)
    return batches
