"""coap-train's training knobs on both trainers: loggers, accumulation, clipping, EMA, compile, nodes.

Each run is timm's ``test_resnet`` on 128 digits for 4 optimizer steps, in this process through
:func:`coap_plugins.train.cli.run`.  What the optimizer saw is recorded with torch's global
optimizer-step hooks, which run inside ``optimizer.step()``: after each framework's clipping and
accumulation, exactly where the COAP step starts.
"""

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

pytest.importorskip("omegaconf")
pytest.importorskip("webdataset")
pytest.importorskip("composer")
pytest.importorskip("lightning")

from _helpers import launch_env  # noqa: E402  (tests/ helper)

from coap_plugins.recipes import RECIPES_DIR  # noqa: E402
from coap_plugins.train import tasks  # noqa: E402
from coap_plugins.train.cli import run  # noqa: E402
from coap_plugins.train.config import ConfigError, MlflowLoggerConfig, WandbLoggerConfig, load_config  # noqa: E402

ROOT = Path(__file__).parents[1]
TRAINERS = ["composer", "lightning"]
TINY = [
    "model.name=test_resnet",
    "data.train_samples=128",
    "data.batch_size=32",
    "data.eval_batch_size=128",
    "progress_bar=false",
    "threads=1",
    "log_interval=1",
    "checkpoint.interval=null",
    "max_duration=4ba",
    "eval_interval=2ba",
    "coap.update_interval=2",
    "coap.reproject_factor=2",
]


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "coap-data-cache"
    monkeypatch.setenv("COAP_DATA_CACHE", str(cache))
    return cache


def _rows(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def _assert_same_rows(a, b):
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), (x, y)
        for key in x:
            expected = y[key] if isinstance(y[key], str) else pytest.approx(y[key], rel=1e-5, abs=1e-7)
            assert x[key] == expected, (key, x, y)


class StepRecorder:
    """Records, at every optimizer step, the gradient norm the step sees (pre-hook) and the
    weights it leaves (post-hook), and captures the network the run builds."""

    def __init__(self, monkeypatch):
        self.norms, self.weights, self.net = [], [], None
        build = tasks.build_model

        def capture(*args, **kwargs):
            self.net = build(*args, **kwargs)
            return self.net

        monkeypatch.setattr(tasks, "build_model", capture)

    def __enter__(self):
        def record(optimizer):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        def pre(optimizer, args, kwargs):
            # both trainers hand step() a closure that runs backward (and clipping): the gradient
            # the step uses is there once the closure returns
            closure = kwargs.get("closure")
            if closure is None:
                record(optimizer)
                return None

            def measured():
                loss = closure()
                record(optimizer)
                return loss

            return args, {**kwargs, "closure": measured}

        def post(optimizer, args, kwargs):
            self.weights.append({n: p.detach().clone() for n, p in self.net.named_parameters()})

        self.handles = [
            register_optimizer_step_pre_hook(pre),
            register_optimizer_step_post_hook(post),
        ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in sorted(Path(folder).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return scalars


def test_accumulation_clipping_and_loggers(tmp_path, monkeypatch):
    """accumulate=2 (16-sample micro-batches), clip_grad_norm=0.05, CSV and TensorBoard on:
    - both trainers log the same losses and metrics;
    - 4 optimizer steps of 2 micro-batches each (the task counts its forward passes), COAP
      refreshes at steps 2 and 4 only (update_interval 2: one schedule position per step);
    - every step sees the clipped gradient: norm 0.05;
    - every logger gets train/loss, train/lr, eval/* and coap/* at the steps metrics.jsonl has."""
    pytest.importorskip("tensorboard")
    rows = {}
    for trainer in TRAINERS:
        out = tmp_path / trainer
        cfg = load_config(
            RECIPES_DIR / trainer / "resnet18_digits.yaml",
            [
                *TINY,
                "accumulate=2",
                "clip_grad_norm=0.05",
                "loggers.csv={}",
                "loggers.tensorboard={}",
                f"output_dir={out}",
            ],
        )
        with StepRecorder(monkeypatch) as rec:
            summary = run(cfg)
        rows[trainer] = _rows(out)
        assert summary["steps"] == 4 and len(rec.norms) == 4
        assert all(abs(n - 0.05) < 1e-4 for n in rec.norms), rec.norms
        ckpt = next((out / "checkpoints").glob("*.pt" if trainer == "composer" else "last.ckpt"))
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        model = state["state"]["model"] if trainer == "composer" else state["state_dict"]
        assert int(model["task.micro_batches"]) == 8  # 4 steps x 2 micro-batches

        train = {r["step"]: r for r in rows[trainer] if r["split"] == "train"}
        evals = {r["step"]: r for r in rows[trainer] if r["split"] == "eval"}
        assert sorted(train) == [1, 2, 3, 4] and sorted(evals) == [2, 4]
        folder = out / "csv"
        csv_rows = _csv_rows(next(folder.rglob("metrics.csv")))
        logged = {}
        for r in csv_rows:
            for k, v in r.items():
                if v != "" and k != "step":
                    logged.setdefault(k, {})[int(r["step"])] = float(v)
        tb = _tensorboard_scalars(out / "tensorboard")
        for got in (logged, tb):
            assert {s: pytest.approx(r["loss"], rel=1e-6) for s, r in train.items()} == got["train/loss"]
            assert {s: pytest.approx(r["lr"], rel=1e-6) for s, r in train.items()} == got["train/lr"]
            for metric in ("accuracy", "loss"):
                assert {s: pytest.approx(r[metric], rel=1e-6) for s, r in evals.items()} == got[f"eval/{metric}"]
            assert sorted(got["coap/reconstruction_error"]) == [2, 4]  # the refreshes
            assert got["coap/state_bytes"][4] == summary["state_bytes"]
    _assert_same_rows(rows["composer"], rows["lightning"])


def test_ema_evaluates_the_average_and_compile_keeps_the_numbers(tmp_path, monkeypatch):
    """ema {decay 0.5, update_interval 3} over 6 steps: before step 3 there is no average yet
    (evaluation at step 2 is of the training weights, as without EMA); it starts as w3 (the
    evaluation at step 4) and is 0.5 w3 + 0.5 w6 at the end, which the trained model holds, on both
    trainers.  compile (the eager backend: dynamo traces, nothing is lowered) changes no number."""
    import torch._dynamo

    ema = ["max_duration=6ba", "ema.decay=0.5", "ema.update_interval=3"]
    rows = {}
    for trainer in TRAINERS:
        for compiled in (False, True):
            out = tmp_path / f"{trainer}-{compiled}"
            extra = ["compile=true", "compile_options.backend=eager"] if compiled else []
            cfg = load_config(
                RECIPES_DIR / trainer / "resnet18_digits.yaml", [*TINY, *ema, f"output_dir={out}", *extra]
            )
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            with StepRecorder(monkeypatch) as rec:
                run(cfg)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            assert (graphs > 0) == compiled, graphs
            rows[trainer, compiled] = _rows(out)
            w3, w6 = rec.weights[2], rec.weights[5]
            for name, p in rec.net.named_parameters():
                torch.testing.assert_close(p.detach(), 0.5 * w3[name] + 0.5 * w6[name], rtol=1e-6, atol=1e-7)
    for key in rows:
        _assert_same_rows(rows[key], rows["composer", False])
    evals = [r for r in rows["composer", False] if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6]
    # against runs without EMA: step 2 evaluates the same training weights; step 4 evaluates w3
    plain, short = tmp_path / "plain", tmp_path / "three"
    run(
        load_config(
            RECIPES_DIR / "lightning" / "resnet18_digits.yaml", [*TINY, "max_duration=6ba", f"output_dir={plain}"]
        )
    )
    run(
        load_config(
            RECIPES_DIR / "composer" / "resnet18_digits.yaml", [*TINY, "max_duration=3ba", f"output_dir={short}"]
        )
    )
    plain_evals = [r for r in _rows(plain) if r["split"] == "eval"]
    _assert_same_rows([evals[0]], [plain_evals[0]])
    at3 = [r for r in _rows(short) if r["split"] == "eval"][-1]
    for metric in ("accuracy", "loss"):
        assert evals[1][metric] == pytest.approx(at3[metric], rel=1e-5)
    assert plain_evals[2]["loss"] != pytest.approx(evals[2]["loss"], rel=1e-6)


def test_two_nodes_need_node_0s_address_and_compile_options_are_typed(monkeypatch, capsys, tmp_path):
    from coap_plugins.train.cli import main

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    recipe = str(RECIPES_DIR / "composer" / "resnet18_digits.yaml")
    assert main([recipe, "num_nodes=2", "rendezvous.node_rank=1", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert (
        "coap-train: error: Missing rendezvous.master_addr for node_rank 1" in err and not (tmp_path / "run").exists()
    )
    for override, message in [
        (["compile_options.mode=default", "compile_options.options={}"], "give mode or options, not both"),
        (["compile_options.fullgraph=1"], "Invalid compile_options.fullgraph: 1 (expected true or false)"),
        (
            ["compile_options.dynamic=maybe"],
            "Invalid compile_options.dynamic: 'maybe' (expected true or false, or null)",
        ),
        (["compile_options.options=3"], "Invalid compile_options.options: 3 (expected a mapping of inductor options)"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(recipe, ["compile=true", *override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("accumulate=3", "Invalid accumulate: 3 (data.batch_size 64 is the batch of one optimizer step"),
        ("accumulate=0", "Invalid accumulate: 0 (must be >= 1)"),
        ("clip_grad_norm=-1", "Invalid clip_grad_norm: -1.0 (must be > 0"),
        ("ema.decay=1", "Invalid ema.decay: 1.0 (must be in (0, 1))"),
        ("ema.update_interval=0", "Invalid ema.update_interval: 0 (must be >= 1)"),
        ("ema.half_life=10", "Unknown key 'ema.half_life'"),
        ("compile_options.mode=fast", "with compile: false"),
        ("compile_options.fullgraf=true", "Invalid compile_options: unknown key 'fullgraf'"),
        ("num_nodes=0", "Invalid num_nodes: 0 (must be >= 1)"),
        ("rendezvous.node_rank=1", "Invalid rendezvous.node_rank: 1 (must be in [0, 0] for num_nodes 1)"),
        ("rendezvous.master_port=70000", "Invalid rendezvous.master_port: 70000"),
        ("loggers.wandb.mode=sometimes", "Invalid loggers.wandb.mode: 'sometimes'"),
        ("loggers.csv.dir=x", "Unknown key 'loggers.csv.dir'"),
        ("loggers.neptune={}", "Unknown key 'loggers.neptune'"),
    ],
)
def test_bad_knobs_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(RECIPES_DIR / "composer" / "resnet18_digits.yaml", [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_compile_mode_and_backend_are_checked():
    recipe = RECIPES_DIR / "composer" / "resnet18_digits.yaml"
    with pytest.raises(ConfigError, match=r"Invalid compile_options.mode: 'fast' \(expected one of default,"):
        load_config(recipe, ["compile=true", "compile_options.mode=fast"])
    with pytest.raises(ConfigError, match=r"Invalid compile_options.backend: 'nope' \(expected one of .*inductor"):
        load_config(recipe, ["compile=true", "compile_options.backend=nope"])


@pytest.mark.parametrize("logger, package", [("mlflow", "mlflow"), ("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_logger_without_its_package_is_refused_before_anything_runs(monkeypatch, logger, package):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ConfigError, match=rf"Invalid loggers.{logger}: the {package} package is not installed"):
        load_config(RECIPES_DIR / "composer" / "resnet18_digits.yaml", [f"loggers.{logger}={{}}"])


def test_logger_settings_default_to_local_offline_files(tmp_path, monkeypatch):
    from coap_plugins.train.common import logger_settings

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(RECIPES_DIR / "composer" / "resnet18_digits.yaml", [f"output_dir={tmp_path}"])
    cfg.loggers.mlflow, cfg.loggers.wandb = MlflowLoggerConfig(), WandbLoggerConfig()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # recorded, so that the variable set below is undone
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    got = logger_settings(cfg)
    assert got["mlflow"] == {"experiment": "resnet18_digits", "tracking_uri": (tmp_path / "mlruns").as_uri()}
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # MLflow 3 refuses its file store otherwise
    assert got["wandb"]["mode"] == "offline" and got["wandb"]["folder"] == str(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    got = logger_settings(cfg)
    assert got["wandb"]["mode"] == "online" and got["mlflow"]["tracking_uri"] == "http://tracking:5000"


def test_bad_rendezvous_environment_is_refused(tmp_path, monkeypatch, capsys):
    from coap_plugins.train.cli import main

    monkeypatch.setenv("NODE_RANK", "2")
    recipe = str(RECIPES_DIR / "lightning" / "resnet18_digits.yaml")
    assert main([recipe, "num_nodes=2", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "coap-train: error: Invalid NODE_RANK='2' in the environment (must be in [0, 1])" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main([recipe, "--dryrun"]) == 2
    assert "unknown option '--dryrun'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("trainer", TRAINERS)
def test_two_nodes_of_one_process_train_as_two_devices(tmp_path, trainer, data_cache):
    """2 nodes x 1 process over localhost (each node its own coap-train, the frameworks' launchers
    meeting at rendezvous.master_port) train exactly as 1 node x 2 processes: same data split per
    global rank, same losses and metrics."""
    env = launch_env(COAP_DATA_CACHE=str(data_cache))
    cmd = [sys.executable, "-m", "coap_plugins.train.cli", str(RECIPES_DIR / trainer / "resnet18_digits.yaml"), *TINY]
    port = 29400 + (os.getpid() % 500) * 2 + (trainer == "lightning")
    nodes = [
        subprocess.Popen(
            [
                *cmd,
                "num_nodes=2",
                f"rendezvous.node_rank={r}",
                f"rendezvous.master_port={port}",
                "rendezvous.master_addr=127.0.0.1",
                f"output_dir={tmp_path / 'nodes'}",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    devices = subprocess.run(
        [*cmd, "devices=2", f"output_dir={tmp_path / 'devices'}"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert devices.returncode == 0, devices.stdout[-3000:] + devices.stderr[-3000:]
    summary = json.loads((tmp_path / "nodes" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and len(summary["peak_memory_per_rank"]) == 2
    assert all(math.isfinite(r.get("loss", 0.0)) for r in _rows(tmp_path / "nodes"))
    _assert_same_rows(_rows(tmp_path / "nodes"), _rows(tmp_path / "devices"))
