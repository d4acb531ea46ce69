"""coap_plugins.train.data: shard writers, the shard reader and the coap-data script."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("webdataset")
pytest.importorskip("sklearn")

from _fakes import write_fake_cifar, write_png_folder  # noqa: E402  (tests/ helper)

from coap_plugins.examples import load_digits_tensors  # noqa: E402
from coap_plugins.train.data import (  # noqa: E402
    main,
    read_meta,
    shard_dataset,
    write_cifar10_shards,
    write_digits_shards,
    write_imagefolder_shards,
)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    meta = write_digits_shards(out, size=8, shard_size=500)
    return out, meta


def _read(dataset):
    pairs = list(dataset)
    return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])


def test_digits_round_trip_matches_load_digits_tensors(digits_dir):
    out, meta = digits_dir
    data = load_digits_tensors(size=8)
    assert meta["counts"] == {"train": len(data.y_train), "val": len(data.y_test)} == {"train": 1347, "val": 450}
    assert meta["shards"]["train"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert meta["size"] == [8, 8] and meta["channels"] == 1 and meta["classes"] == [str(i) for i in range(10)]
    assert meta["normalized"] is True and meta["mean"][0] == pytest.approx(0.0, abs=1e-5)
    assert meta["std"][0] == pytest.approx(1.0, abs=1e-4)
    assert read_meta(out) == json.loads((out / "meta.json").read_text()) == meta
    x, y = _read(shard_dataset(out, "train"))
    assert torch.equal(x, data.x_train) and torch.equal(y, data.y_train)
    x, y = _read(shard_dataset(out, "val"))
    assert torch.equal(x, data.x_test) and torch.equal(y, data.y_test)


def test_digits_shards_are_byte_identical_on_rewrite(digits_dir, tmp_path):
    out, _ = digits_dir
    write_digits_shards(tmp_path, size=8, shard_size=500)
    for name in ["train-000000.tar", "train-000002.tar", "val-000000.tar", "meta.json"]:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_shuffle_and_epoch_length(digits_dir):
    out, _ = digits_dir
    data = load_digits_tensors(size=8)
    ds = shard_dataset(out, "train", shuffle_buffer=200, seed=3)
    first, second = [y for _, y in ds], [y for _, y in ds]
    assert sorted(first) == sorted(second) == sorted(data.y_train.tolist())
    assert first != data.y_train.tolist() and first != second  # shuffled, new order each pass
    again = [y for _, y in shard_dataset(out, "train", shuffle_buffer=200, seed=3)]
    assert again == first  # reproducible from the seed
    ds = shard_dataset(out, "val", epoch_length=1000)
    labels = [y for _, y in ds]
    assert len(labels) == 1000  # repeats the 450 val samples
    assert labels[:450] == labels[450:900] == data.y_test.tolist()


def test_split_by_worker_sees_every_sample_once(digits_dir):
    out, _ = digits_dir
    loader = torch.utils.data.DataLoader(shard_dataset(out, "train"), batch_size=100, num_workers=2)
    labels = torch.cat([y for _, y in loader])
    assert sorted(labels.tolist()) == sorted(load_digits_tensors(size=8).y_train.tolist())


def test_split_by_node_uses_rank(digits_dir, monkeypatch):
    out, _ = digits_dir
    monkeypatch.setenv("WORLD_SIZE", "2")
    counts = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        counts.append(len(list(shard_dataset(out, "train"))))
    assert counts == [500 + 347, 500]  # shards 0 and 2 on rank 0, shard 1 on rank 1


def test_pattern_and_glob_inputs(digits_dir):
    out, _ = digits_dir
    assert len(list(shard_dataset(f"{out}/train-{{000000..000001}}.tar", "train"))) == 1000
    assert len(list(shard_dataset(f"{out}/val-*.tar", "val"))) == 450


def test_missing_and_empty_inputs_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="Shard directory not found: .*nope"):
        shard_dataset(tmp_path / "nope", "train")
    with pytest.raises(ValueError, match=r"No train shards in .* train-NNNNNN\.tar"):
        shard_dataset(tmp_path, "train")
    with pytest.raises(ValueError, match="No shards match"):
        shard_dataset(f"{tmp_path}/val-*.tar", "val")
    with pytest.raises(FileNotFoundError, match=r"Shard file not found: .*train-000006\.tar \(2 of the 2 files"):
        shard_dataset(f"{tmp_path}/train-{{000006..000007}}.tar", "train")
    with pytest.raises(ValueError, match="Invalid split: 'test' .*train, val"):
        shard_dataset(tmp_path, "test")
    with pytest.raises(ValueError, match="Invalid shuffle_buffer: -1"):
        shard_dataset(tmp_path, "train", shuffle_buffer=-1)
    with pytest.raises(ValueError, match="Invalid epoch_length: 0"):
        shard_dataset(tmp_path, "train", epoch_length=0)
    with pytest.raises(FileNotFoundError, match="No meta.json in"):
        read_meta(tmp_path)


def test_writer_refuses_folder_with_shards(digits_dir):
    out, _ = digits_dir
    with pytest.raises(FileExistsError, match="already holds shards"):
        write_digits_shards(out, size=8)


def test_imagefolder_converter(tmp_path):
    pixels = write_png_folder(tmp_path / "src", {"cat": 5, "dog": 3})
    meta = write_imagefolder_shards(tmp_path / "src", tmp_path / "out", val_fraction=0.4, seed=1)
    assert meta["classes"] == ["cat", "dog"]
    assert meta["counts"] == {"train": 3 + 2, "val": 2 + 1}
    assert meta["size"] == [6, 5] and meta["channels"] == 3 and meta["dtype"] == "uint8"
    got = {split: list(shard_dataset(tmp_path / "out", split)) for split in ("train", "val")}
    seen = {(y, x.mul(255).round().to(torch.uint8).numpy().tobytes()) for s in got.values() for x, y in s}
    expected = {(label, a.tobytes()) for label, name in enumerate(["cat", "dog"]) for a in pixels[name]}
    assert seen == expected  # every PNG exactly once, with its class label
    assert all(x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0 for x, _ in got["train"])
    train = torch.stack([x for x, _ in got["train"]])
    assert meta["mean"] == pytest.approx(train.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)

    resized = write_imagefolder_shards(tmp_path / "src", tmp_path / "out4", size=4, val_fraction=0.0)
    assert resized["size"] == [4, 4] and resized["counts"] == {"train": 8, "val": 0}
    assert resized["shards"]["val"] == []
    with pytest.raises(ValueError, match="No val shards in"):
        shard_dataset(tmp_path / "out4", "val")


def test_imagefolder_errors(tmp_path):
    from PIL import Image

    with pytest.raises(FileNotFoundError, match="ImageFolder root not found: .*missing"):
        write_imagefolder_shards(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "src" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        write_imagefolder_shards(tmp_path / "src", tmp_path / "out")
    Image.new("RGB", (4, 4)).save(tmp_path / "src" / "a" / "x.png")
    Image.new("RGB", (5, 4)).save(tmp_path / "src" / "a" / "y.jpg")
    with pytest.raises(ValueError, match="pass size="):
        write_imagefolder_shards(tmp_path / "src", tmp_path / "out", val_fraction=0.0)
    with pytest.raises(ValueError, match="Invalid val_fraction: 1.0"):
        write_imagefolder_shards(tmp_path / "src", tmp_path / "out", val_fraction=1.0)


def test_cifar10_converter(tmp_path):
    batches = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    meta = write_cifar10_shards(tmp_path, tmp_path / "out", shard_size=7)  # the parent folder works
    assert meta["counts"] == {"train": 20, "val": 4} and meta["size"] == [32, 32] and meta["classes"][0] == "airplane"
    assert meta["shards"]["train"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    x, y = _read(shard_dataset(tmp_path / "out", "train"))
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert torch.equal(x, torch.from_numpy(data).float() / 255.0)
    assert y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    x, y = _read(shard_dataset(tmp_path / "out", "val"))
    assert torch.equal(x, torch.from_numpy(batches["test_batch"][0].reshape(-1, 3, 32, 32)).float() / 255.0)


def test_cifar10_missing_files_says_nothing_is_downloaded(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(
        FileNotFoundError, match="missing in .*cifar-10-batches-py: data_batch_3 .*nothing is downloaded"
    ):
        write_cifar10_shards(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="data_batch_1, .*test_batch, batches.meta"):
        write_cifar10_shards(tmp_path / "empty", tmp_path / "out")


def test_coap_data_cli(tmp_path, capsys):
    assert main(["digits", "--out", str(tmp_path / "d"), "--size", "8"]) == 0
    assert "wrote 1347 train, 450 val samples (1x8x8, 10 classes)" in capsys.readouterr().out
    assert read_meta(tmp_path / "d")["counts"] == {"train": 1347, "val": 450}
    write_png_folder(tmp_path / "src", {"a": 2, "b": 2})
    assert main(["imagefolder", str(tmp_path / "src"), "--out", str(tmp_path / "f"), "--val-fraction", "0.5"]) == 0
    assert read_meta(tmp_path / "f")["counts"] == {"train": 2, "val": 2}
    assert main(["cifar10", str(tmp_path / "none"), "--out", str(tmp_path / "c")]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["digits"])  # --out is required
