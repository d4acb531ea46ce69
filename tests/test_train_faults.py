"""coap-train when something is broken: unreadable checkpoints, a diverging loss, damaged shards.

Each run is a tiny model (timm's ``test_resnet``: 1 matrix and 6 Tucker-2 projected weights) for a
few batches, through ``coap_plugins.train.cli.main`` so that exit codes and messages are the
user's.
"""

import io
import json
import math
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("omegaconf")
pytest.importorskip("webdataset")
pytest.importorskip("composer")
pytest.importorskip("lightning")

from coap_plugins.recipes import RECIPES_DIR  # noqa: E402
from coap_plugins.train.cli import main  # noqa: E402
from coap_plugins.train.data import _write_all, write_digits_shards  # noqa: E402

YAMLS = RECIPES_DIR
TINY = [
    "model.name=test_resnet",
    "data.train_samples=128",
    "data.batch_size=32",
    "data.eval_batch_size=128",
    "progress_bar=false",
    "threads=1",
    "log_interval=1",
    "checkpoint.interval=null",
]
PROJECTED = 7  # test_resnet's weights that COAP projects: 1 matrix (the head) and 6 Tucker-2 convs


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "coap-data-cache"
    monkeypatch.setenv("COAP_DATA_CACHE", str(cache))
    return cache


def _train(trainer, out, *overrides):
    return main([str(YAMLS / trainer / "resnet18_digits.yaml"), *TINY, f"output_dir={out}", *overrides])


def _rows(out, split="train"):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows if r["split"] == split]


def _lines(text, prefix="coap-train:"):
    return [line for line in text.splitlines() if line.startswith(prefix)]


def _model_state(trainer, path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    params = state["state"]["model"] if trainer == "composer" else state["state_dict"]
    return {k: v for k, v in params.items() if not k.startswith("metrics")}


# ------------------------------------------------------------------ item 9: unreadable checkpoints


@pytest.mark.parametrize("trainer", ["composer", "lightning"])
def test_truncated_newest_checkpoint_falls_back_to_an_older_one(tmp_path, trainer, capfd):
    out, folder = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = ["max_duration=4ba", "eval_interval=4ba", "checkpoint.interval=2ba"]
    assert _train(trainer, out, *args) == 0
    if trainer == "composer":
        newest = [folder / os.readlink(folder / "latest-rank0.pt")]  # ep0-ba4-rank0.pt
        older = folder / "ep0-ba2-rank0.pt"
    else:
        newest = [folder / "last.ckpt", folder / "ep0-ba4.ckpt"]  # last.ckpt is a copy of the newest
        older = folder / "ep0-ba2.ckpt"
    assert newest[-1].name.startswith("ep0-ba4") and older.is_file()
    whole = _model_state(trainer, newest[0])
    rows = _rows(out)
    for path in newest:  # as a run killed while writing leaves it
        os.truncate(path, path.stat().st_size // 2)
    capfd.readouterr()
    assert _train(trainer, out, *args, "checkpoint.resume=true") == 0
    warnings = _lines(capfd.readouterr().err)
    assert len(warnings) == 1, warnings
    names = ", ".join(str(p) for p in newest)
    assert warnings[0] == (
        f"coap-train: warning: checkpoint{'s' if len(newest) > 1 else ''} {names} cannot be read "
        f"(truncated or corrupt: File is not a zip file); resuming from {older}, the newest checkpoint that loads"
    )
    # steps 3 and 4 trained again from the step-2 checkpoint, to the same place
    assert _rows(out) == rows
    again = _model_state(trainer, newest[0])
    assert again.keys() == whole.keys() and all(torch.equal(again[k], whole[k]) for k in whole)


@pytest.mark.parametrize("trainer", ["composer", "lightning"])
def test_no_readable_checkpoint_stops_before_training(tmp_path, trainer, capfd):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    if trainer == "composer":
        bad = folder / "ep0-ba2-rank0.pt"
        (folder / "latest-rank0.pt").symlink_to(bad.name)
    else:
        bad = folder / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    assert _train(trainer, tmp_path / "run", "checkpoint.resume=true") == 1
    errors = _lines(capfd.readouterr().err)
    assert errors == [
        f"coap-train: error: No checkpoint in {folder} can be read to resume from: checkpoint {bad} "
        "(truncated or corrupt: File is not a zip file); remove it or set checkpoint.resume=false to start afresh"
    ]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------ item 10: a diverging loss


def _check_diverged(out, trainer, err, step, loss="nan"):
    assert _lines(err) == [
        f"coap-train: error: Training diverged at step {step}: the training loss is {loss} (stopped by "
        "stop_on_nonfinite=true; lower optimizer.lr, check the data for NaN or infinite values, or set "
        f"stop_on_nonfinite=false to train on); report: {out / 'report.md'}"
    ]
    rows = _rows(out)
    assert rows[-1]["step"] == step and not math.isfinite(rows[-1]["loss"])  # nothing trained past it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"]["step"] == step and summary["diverged"]["stopped"] is True
    assert summary["steps"] == step and summary["trainer"] == trainer
    report = (out / "report.md").read_text()
    assert f"**Diverged**: the training loss was {loss} at step {step}; training stopped there" in report
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else []
    assert not any(f"ba{step}" in name for name in checkpoints)  # the diverged state is not saved
    return summary, report


@pytest.mark.parametrize("trainer", ["composer", "lightning"])
def test_a_huge_learning_rate_stops_at_the_first_nonfinite_loss(tmp_path, trainer, capfd):
    out = tmp_path / "run"
    code = _train(
        trainer,
        out,
        "optimizer.lr=1e6",
        "schedule.warmup=0ba",
        "max_duration=8ba",
        "eval_interval=8ba",
        "checkpoint.interval=1ba",
    )
    assert code == 1
    first = next(r["step"] for r in _rows(out) if not math.isfinite(r["loss"]))
    assert 1 < first < 8  # it trained a few steps before blowing up
    _check_diverged(out, trainer, capfd.readouterr().err, first)


def _nan_shards(folder):
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((1, 16, 16)).astype(np.float32) for _ in range(160)]
    for image in images[::2]:
        image[0, 3:5, 3:5] = np.nan  # half the images hold a few NaN pixels
    labels = [i % 10 for i in range(160)]
    split = {"train": (images[:128], labels[:128]), "val": (images[128:], labels[128:])}
    _write_all(
        folder, split, classes=[str(i) for i in range(10)], shard_size=64, source={"name": "nan"}, normalized=True
    )
    return ["data.name=shards", f"data.path={folder}", "data.augment=none"]


@pytest.mark.parametrize("trainer", ["composer", "lightning"])
def test_nan_images_stop_the_run_and_the_report_says_layers_never_set_up(tmp_path, trainer, capfd):
    out = tmp_path / "run"
    data = _nan_shards(tmp_path / "shards")
    assert _train(trainer, out, *data, "max_duration=3ba", "eval_interval=3ba") == 1
    summary, report = _check_diverged(out, trainer, capfd.readouterr().err, 1)
    # COAP skipped every non-finite gradient: no projected layer has state, which the report says
    assert len(summary["waiting_layers"]) == PROJECTED
    assert (
        f"**{PROJECTED} projected layers never received a usable gradient**: their state is not counted "
        "in the optimizer state below"
    ) in report


def test_stop_on_nonfinite_false_trains_on_and_reports_it(tmp_path, capfd):
    out = tmp_path / "run"
    data = _nan_shards(tmp_path / "shards")
    assert _train("composer", out, *data, "max_duration=3ba", "eval_interval=3ba", "stop_on_nonfinite=false") == 0
    stdout = capfd.readouterr().out
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    assert "resnet18_digits: diverged (training loss nan at step 1); accuracy " in stdout
    assert f"of full rank, not counting {PROJECTED} projected layer(s) that never received a usable gradient)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"]["step"] == 1 and summary["diverged"]["stopped"] is False and summary["steps"] == 3
    report = (out / "report.md").read_text()
    assert (
        "**Diverged**: the training loss was first nan at step 1; training went on (`stop_on_nonfinite: false`)."
        in report
    )
    assert f"**{PROJECTED} projected layers never received a usable gradient**" in report


# ------------------------------------------------------------------ item 11: damaged shards


def _truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def _truncate_in_a_member(path):
    with tarfile.open(path) as tar:
        member = tar.getmembers()[-1]
    os.truncate(path, member.offset_data + member.size // 2)


def _damage_a_header(path):
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        member = tar.getmembers()[5]
    data[member.offset + 100] ^= 0xFF  # the mode field: the header checksum no longer matches
    path.write_bytes(bytes(data))


def _drop_the_last_samples(path):
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for member, payload in members[:-4]:  # two samples (cls + image.npy each) fewer
            tar.addfile(member, io.BytesIO(payload))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_truncate, r"ends at byte \d+ without the end-of-archive blocks: it is truncated"),
        (_truncate_in_a_member, r"cannot be read \(unexpected end of data\): it is truncated or corrupt"),
        (_damage_a_header, r"has an unreadable tar header at byte \d+: it is corrupt"),
        (
            _drop_the_last_samples,
            r"disagrees with the index .*meta.json: the train shards hold 1345 samples, the index "
            r"counts 1347 \(this shard holds 98, numbered 100 to 197\)",
        ),
    ],
)
def test_damaged_shards_are_refused_before_training(tmp_path, damage, problem, capfd):
    shards = tmp_path / "shards"
    write_digits_shards(shards, size=16, shard_size=100)
    damage(shards / "train-000001.tar")
    out = tmp_path / "run"
    assert _train("composer", out, "data.name=shards", f"data.path={shards}") == 1
    errors = _lines(capfd.readouterr().err)
    assert len(errors) == 1
    assert re.fullmatch(
        rf"coap-train: error: Shard {re.escape(str(shards / 'train-000001.tar'))} {problem}; write the shards again "
        r"\(coap-data; digits shards are rewritten on first use once their folder is removed\)",
        errors[0],
    ), errors[0]
    assert not out.exists()  # nothing was built or trained


def test_a_shard_missing_from_the_index_is_named(tmp_path, capfd):
    shards = tmp_path / "shards"
    write_digits_shards(shards, size=16, shard_size=100)
    (shards / "val-000002.tar").unlink()
    assert _train("lightning", tmp_path / "run", "data.name=shards", f"data.path={shards}") == 1
    assert _lines(capfd.readouterr().err) == [
        f"coap-train: error: Shard {shards / 'val-000002.tar'} is listed in {shards / 'meta.json'} but missing; write "
        "the shards again (coap-data; digits shards are rewritten on first use once their folder is removed)"
    ]
