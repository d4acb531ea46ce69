"""coap-train end to end: every shipped recipe for a few batches, resume equality, DDP (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("omegaconf")
pytest.importorskip("webdataset")
pytest.importorskip("composer")
pytest.importorskip("lightning")

from _fakes import write_fake_cifar, write_png_folder  # noqa: E402  (tests/ helper)
from _helpers import launch_env  # noqa: E402  (tests/ helper)

from coap_plugins.recipes import RECIPES_DIR  # noqa: E402
from coap_plugins.train.cli import run  # noqa: E402
from coap_plugins.train.common import RunInterrupted  # noqa: E402
from coap_plugins.train.config import load_config  # noqa: E402
from coap_plugins.train.data import main as coap_data  # noqa: E402

ROOT = Path(__file__).parents[1]
YAMLS = RECIPES_DIR
DIGITS = [
    "resnet18_digits",
    "resnet18_digits_adamw",
    "resnet18_digits_adafactor",
    "resnet18_digits_8bit",
    "unet_ddpm_digits",
    "unet_ddpm_digits_adamw",
]
QUICK = [
    "max_duration=3ba",
    "eval_interval=3ba",
    "checkpoint.interval=null",
    "progress_bar=false",
    "threads=1",
    "log_interval=1",
]
QUICK_DDPM = ["task.timesteps=20", "task.eval_timesteps=[2,10,18]", "task.num_samples=4"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "coap-data-cache"
    monkeypatch.setenv("COAP_DATA_CACHE", str(cache))
    return cache


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _check_outputs(out, cfg, steps):
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    rows = _rows(out)
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert evals and evals[-1]["step"] == steps and summary["steps"] == steps
    metric = "accuracy" if cfg.task.name == "classification" else "heldout_loss"
    assert summary["metric"] == metric and summary["final"][metric] == evals[-1][metric]
    assert summary["state_bytes"] > 0 and summary["full_rank_state_bytes"] > 0
    assert summary["samples_per_second"] > 0 and summary["peak_memory_bytes"] > 0
    assert (out / "report.md").read_text().startswith(f"# {cfg.name}")
    assert (out / "curves.png").read_bytes()[:8] == PNG
    assert yaml_equal(out / "config.yaml", cfg)
    if cfg.task.name == "ddpm":
        assert summary["sample_grid"] == "samples.png" and (out / "samples.png").read_bytes()[:8] == PNG
    return summary


def yaml_equal(path, cfg):
    again = load_config(path)
    again.name, again.output_dir = cfg.name, cfg.output_dir
    return again == cfg


@pytest.mark.parametrize("trainer", ["composer", "lightning"])
@pytest.mark.parametrize("recipe", DIGITS)
def test_digits_recipe_runs_end_to_end(tmp_path, trainer, recipe):
    extra = QUICK_DDPM if "ddpm" in recipe else []
    cfg = load_config(YAMLS / trainer / f"{recipe}.yaml", [*QUICK, *extra, f"output_dir={tmp_path / 'run'}"])
    assert cfg.trainer == trainer
    summary = _check_outputs(tmp_path / "run", cfg, 3) if run(cfg) else None
    expected = {
        "resnet18_digits": "CoapAdamW",
        "resnet18_digits_adamw": "AdamW",
        "resnet18_digits_adafactor": "CoapAdafactor",
        "resnet18_digits_8bit": "CoapAdamW8bit",
        "unet_ddpm_digits": "CoapAdamW",
        "unet_ddpm_digits_adamw": "AdamW",
    }[recipe]
    assert summary["optimizer"] == expected and summary["coap"] is expected.startswith("Coap")
    if expected.startswith("Coap"):
        assert summary["state_bytes"] < 0.5 * summary["full_rank_state_bytes"]


def test_both_trainers_train_the_same_model(tmp_path):
    """Same recipe, same seed: Composer and Lightning runs log the same losses and metrics."""
    rows = {}
    for trainer in ("composer", "lightning"):
        cfg = load_config(
            YAMLS / trainer / "resnet18_digits.yaml",
            [
                *QUICK,
                "max_duration=4ba",
                "coap.update_interval=2",
                "coap.reproject_factor=2",
                f"output_dir={tmp_path / trainer}",
            ],
        )
        run(cfg)
        rows[trainer] = [{k: v for k, v in r.items() if k != "time"} for r in _rows(tmp_path / trainer)]
    assert len(rows["composer"]) == len(rows["lightning"]) == 6  # 4 train rows, evals at 3 and 4
    for a, b in zip(rows["composer"], rows["lightning"]):
        assert a.keys() == b.keys()
        for key in a:
            expected = b[key] if isinstance(b[key], str) else pytest.approx(b[key], rel=1e-5, abs=1e-7)
            assert a[key] == expected, (a, b)


def _final_params(trainer, folder, steps=7):
    """The checkpoint's model weights (the EMA when there is one) and, with an EMA, the training
    weights it keeps aside (prefixed ``training.``)."""
    if trainer == "composer":
        state = torch.load(folder / "latest-rank0.pt", map_location="cpu", weights_only=False)
        params = dict(state["state"]["model"])
        for name, algorithm in state["state"]["algorithms"]:
            if name == "EMA":  # the model holds the average while a checkpoint is written
                assert algorithm["ema_weights_active"]
                ema = algorithm["ema_model"]
                params.update({f"training.{k}": v for k, v in ema["named_parameters_dict"].items()})
                params.update({f"training.{k}": v for k, v in ema["named_buffers_dict"].items()})
    else:
        state = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)
        assert state["global_step"] == steps  # the end of training
        params = dict(state["state_dict"])
        params.update({f"training.{k}": v for k, v in state.get("current_model_state", {}).items()})
    return {k.replace("task.", ""): v for k, v in params.items() if "metrics" not in k}


@pytest.mark.parametrize("trainer", ["composer", "lightning"])
def test_resume_continues_to_the_same_parameters(tmp_path, trainer):
    # 256 training samples = 4 batches per epoch: 7 batches cross an epoch; stop mid-epoch after 3;
    # with an EMA of the weights (the average and the training weights both resume exactly) and
    # 2 micro-batches per step (Lightning resumes its loader mid-epoch in micro-batches)
    args = [
        *QUICK,
        "ema.decay=0.8",
        "accumulate=2",
        "max_duration=7ba",
        "eval_interval=7ba",
        "checkpoint.interval=3ba",
        "data.train_samples=256",
        "coap.update_interval=2",
        "coap.reproject_factor=2",
    ]
    recipe = YAMLS / trainer / "resnet18_digits.yaml"
    whole = load_config(recipe, [*args, f"output_dir={tmp_path / 'whole'}"])
    run(whole)
    parted = load_config(recipe, [*args, f"output_dir={tmp_path / 'parted'}"])
    with pytest.raises(RunInterrupted, match="stopped after 3 batches"):
        run(parted, stop_after_batches=3)
    resumed = load_config(recipe, [*args, f"output_dir={tmp_path / 'parted'}", "checkpoint.resume=true"])
    run(resumed)
    a = _final_params(trainer, tmp_path / "whole" / "checkpoints")
    b = _final_params(trainer, tmp_path / "parted" / "checkpoints")
    assert a.keys() == b.keys() and any(k.endswith("micro_batches") for k in a)
    assert "training.net.fc.weight" in a and not torch.equal(a["net.fc.weight"], a["training.net.fc.weight"])
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "whole")) == strip(_rows(tmp_path / "parted"))


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    cfg = load_config(
        YAMLS / "composer" / "resnet18_digits_adamw.yaml",
        [*QUICK, "max_duration=2ba", "eval_interval=2ba", f"output_dir={tmp_path}", "checkpoint.resume=true"],
    )
    assert run(cfg)["steps"] == 2


def test_cifar10_recipes_on_a_fake_cifar_folder(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py", per_batch=8)
    assert coap_data(["cifar10", str(tmp_path), "--out", str(tmp_path / "shards")]) == 0
    small = [
        "data.num_workers=0",
        "precision=fp32",
        "devices=1",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        f"data.path={tmp_path / 'shards'}",
    ]
    cfg = load_config(
        YAMLS / "composer" / "resnet18_cifar10.yaml", [*QUICK, *small, f"output_dir={tmp_path / 'resnet'}"]
    )
    summary = _check_outputs(tmp_path / "resnet", cfg, 3) if run(cfg) else None
    assert summary["optimizer"] == "CoapAdamW" and summary["final"]["accuracy"] >= 0
    cfg = load_config(
        YAMLS / "lightning" / "unet_ddpm_cifar10.yaml",
        [
            *QUICK,
            *QUICK_DDPM,
            *small,
            "model.widths=[16,32,32,32]",
            "model.blocks_per_level=1",
            f"output_dir={tmp_path / 'ddpm'}",
        ],
    )
    summary = _check_outputs(tmp_path / "ddpm", cfg, 3) if run(cfg) else None
    assert summary["optimizer"] == "CoapAdamW" and summary["trainer"] == "lightning"


def test_own_shards_template_on_an_imagefolder(tmp_path):
    write_png_folder(tmp_path / "images", {"cat": 12, "dog": 12})
    assert (
        coap_data(
            [
                "imagefolder",
                str(tmp_path / "images"),
                "--out",
                str(tmp_path / "shards"),
                "--size",
                "16",
                "--shard-size",
                "8",
            ]
        )
        == 0
    )
    cfg = load_config(
        YAMLS / "composer" / "own_shards.yaml",
        [
            *QUICK,
            "data.batch_size=4",
            "data.eval_batch_size=4",
            f"data.path={tmp_path / 'shards'}",
            f"output_dir={tmp_path / 'run'}",
            "checkpoint.resume=false",
        ],
    )
    summary = _check_outputs(tmp_path / "run", cfg, 3) if run(cfg) else None
    assert summary["optimizer"] == "CoapAdamW"


def test_data_errors_are_clear(tmp_path):
    cfg = load_config(YAMLS / "composer" / "own_shards.yaml", [f"data.path={tmp_path / 'nowhere'}"])
    with pytest.raises(
        FileNotFoundError, match=r"Data folder not found: .*nowhere \(data.path; write shards with `coap-data"
    ):
        run(cfg)
    (tmp_path / "empty").mkdir()
    cfg = load_config(YAMLS / "composer" / "own_shards.yaml", [f"data.path={tmp_path / 'empty'}"])
    with pytest.raises(ValueError, match=r"No shards in .*empty: meta.json is missing"):
        run(cfg)
    write_png_folder(tmp_path / "images", {"cat": 12, "dog": 12})
    coap_data(["imagefolder", str(tmp_path / "images"), "--out", str(tmp_path / "one"), "--size", "16"])
    cfg = load_config(
        YAMLS / "composer" / "own_shards.yaml",
        [*QUICK, f"data.path={tmp_path / 'one'}", f"output_dir={tmp_path / 'run'}"],
    )
    with pytest.raises(ValueError, match=r"has 1 train shard\(s\) for 2 readers \(1 rank\(s\) x 2 worker\(s\)\)"):
        run(cfg)


def _two_processes(tmp_path, trainer, data_cache, parallelism="ddp"):
    out = tmp_path / "run"
    env = launch_env(COAP_DATA_CACHE=str(data_cache))
    cmd = [
        sys.executable,
        "-m",
        "coap_plugins.train.cli",
        str(YAMLS / trainer / "resnet18_digits.yaml"),
        *QUICK,
        "max_duration=4ba",
        "eval_interval=4ba",
        "devices=2",
        f"parallelism={parallelism}",
        f"output_dir={out}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert 0 <= summary["final"]["accuracy"] <= 1 and summary["optimizer"] == "CoapAdamW"
    assert "report: " in proc.stdout
    return summary


@pytest.mark.slow
def test_two_process_fsdp2_from_yaml_gives_both_trainers_the_same_run(tmp_path, data_cache):
    """``parallelism: fsdp2``: Composer (FSDP2Config) and Lightning (ModelParallelStrategy) shard
    the ResNet-18 over 2 processes and train the same 4 steps: the same loss and accuracy, and
    the same optimizer state on rank 0 (its shards plus the replicated Tucker-2 cores), which is
    more than half of the unsharded run's (the replicated part does not split)."""
    runs = {}
    for trainer in ("composer", "lightning"):
        (tmp_path / trainer).mkdir()
        runs[trainer] = _two_processes(tmp_path / trainer, trainer, data_cache, "fsdp2")
    a, b = runs["composer"], runs["lightning"]
    assert a["final"] == pytest.approx(b["final"], rel=1e-5)
    assert a["state_bytes"] == b["state_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["composer", "lightning"])
def test_two_process_ddp_from_yaml(tmp_path, trainer, data_cache):
    _two_processes(tmp_path, trainer, data_cache)


def test_download_while_offline_says_so(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    cfg = load_config(
        YAMLS / "composer" / "resnet18_cifar10.yaml", [f"data.path={tmp_path / 'shards'}", "data.download=true"]
    )
    with pytest.raises(
        ConnectionError,
        match=r"Downloading CIFAR-10 into .*cifar10-raw failed \(URLError: .*\); "
        r"this machine may be offline\. Put cifar-10-batches-py on disk",
    ):
        run(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["composer", "lightning"])
def test_step_in_backward_trains_the_same_run(tmp_path, trainer):
    """``coap.step_in_backward: true`` with 2 micro-batches, an EMA and refreshes every 2 steps:
    the same logged losses and metrics, and bit-equal checkpoint weights (the averaged and the
    training ones), as the normal mode."""
    args = [
        *QUICK,
        "ema.decay=0.8",
        "accumulate=2",
        "max_duration=5ba",
        "eval_interval=5ba",
        "checkpoint.interval=5ba",
        "coap.update_interval=2",
        "coap.reproject_factor=2",
    ]
    recipe = YAMLS / trainer / "resnet18_digits.yaml"
    run(load_config(recipe, [*args, f"output_dir={tmp_path / 'normal'}"]))
    run(load_config(recipe, [*args, "coap.step_in_backward=true", f"output_dir={tmp_path / 'backward'}"]))
    a = _final_params(trainer, tmp_path / "normal" / "checkpoints", steps=5)
    b = _final_params(trainer, tmp_path / "backward" / "checkpoints", steps=5)
    assert a.keys() == b.keys() and "training.net.fc.weight" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "normal")) == strip(_rows(tmp_path / "backward"))
