"""CoapAlgorithm in a real composer.Trainer: the swap at INIT, schedulers, event-driven refreshes,
logging, exact resume from Composer checkpoints, gradient accumulation and the errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("composer")
pytest.importorskip("sklearn")

from _helpers import launch_env  # noqa: E402  (tests/ helper)
from composer import Algorithm, Callback, Event, Trainer  # noqa: E402
from composer.callbacks import OptimizerMonitor  # noqa: E402
from composer.loggers import InMemoryLogger  # noqa: E402
from composer.models import ComposerClassifier, ComposerModel  # noqa: E402
from composer.optim import DecoupledAdamW, LinearScheduler  # noqa: E402

from coap_plugins import CoapAdamW, CoapAdamW8bit  # noqa: E402
from coap_plugins.algorithms import CoapAlgorithm, apply_coap  # noqa: E402
from coap_plugins.examples import SmallCNN  # noqa: E402

torch.set_num_threads(1)
BATCH = 32


def loader(data, n=BATCH * 12, batch=BATCH):
    ds = torch.utils.data.TensorDataset(data.x_train[:n], data.y_train[:n])
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


def make_model(seed=0):
    torch.manual_seed(seed)
    return ComposerClassifier(SmallCNN(), num_classes=10)


def make_trainer(data, model=None, optimizer="adamw", algorithms=None, max_duration="6ba", seed=0, **kw):
    model = model or make_model(seed)
    if optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    kw.setdefault("train_dataloader", loader(data))
    return Trainer(
        model=model,
        optimizers=optimizer,
        algorithms=algorithms if algorithms is not None else [CoapAlgorithm(update_interval=2, reproject_factor=2)],
        max_duration=max_duration,
        device="cpu",
        seed=seed,
        progress_bar=False,
        log_to_console=False,
        **kw,
    )


def params(trainer):
    return {k: v.detach().clone() for k, v in trainer.state.model.named_parameters()}


# -- the swap --------------------------------------------------------------------------------
def test_swap_keeps_groups_and_hyperparameters(digits):
    model = make_model()
    convs = [p for n, p in model.named_parameters() if p.ndim > 1]
    rest = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": convs, "lr": 3e-3, "weight_decay": 0.1, "tag": "weights"}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.8, 0.95),
        eps=1e-7,
    )
    trainer = make_trainer(digits, model=model, optimizer=opt)
    new = trainer.state.optimizers[0]
    assert type(new) is CoapAdamW
    g0, g1 = new.param_groups
    assert (g0["lr"], g0["weight_decay"], g0["tag"], g0["betas"], g0["eps"]) == (
        3e-3,
        0.1,
        "weights",
        (0.8, 0.95),
        1e-7,
    )
    assert (g1["lr"], g1["weight_decay"]) == (1e-3, 0.0)
    assert [id(p) for p in g0["params"]] == [id(p) for p in convs]
    assert [id(p) for p in g1["params"]] == [id(p) for p in rest]
    assert g1["projection"] == ["none"] * len(rest)
    assert "tucker2" in g0["projection"] or "matrix" in g0["projection"]
    assert all(g["schedule"] == "external" for g in new.param_groups)


def test_decoupled_adamw_weight_decay_is_converted(digits):
    model = make_model()
    opt = DecoupledAdamW(model.parameters(), lr=2e-3, weight_decay=1e-5)
    trainer = make_trainer(digits, model=model, optimizer=opt)
    g = trainer.state.optimizers[0].param_groups[0]
    assert g["lr"] == 2e-3 and g["weight_decay"] == pytest.approx(1e-5 / 2e-3)


class LrRecorder(Callback):
    """The lr the optimizer holds when each batch's step runs (recorded at AFTER_TRAIN_BATCH)."""

    def __init__(self):
        self.lrs = []

    def after_train_batch(self, state, logger):
        self.lrs.append(state.optimizers[0].param_groups[0]["lr"])


def test_composer_and_torch_schedulers_drive_the_new_optimizer(digits):
    # Composer scheduler.  In Composer 0.32.1 the step of batch k >= 1 runs with the schedule
    # evaluated at batch k - 1 (the scheduler steps before the timestamp advances); the plain
    # AdamW run shows the same sequence.
    expected = [2e-3, 2e-3, 1.8e-3, 1.6e-3]
    plain = LrRecorder()
    make_trainer(
        digits,
        schedulers=LinearScheduler(alpha_i=1.0, alpha_f=0.0, t_max="10ba"),
        max_duration="4ba",
        callbacks=[plain],
        algorithms=[],
    ).fit()
    assert plain.lrs == pytest.approx(expected)
    rec = LrRecorder()
    trainer = make_trainer(
        digits, schedulers=LinearScheduler(alpha_i=1.0, alpha_f=0.0, t_max="10ba"), max_duration="4ba", callbacks=[rec]
    )
    assert isinstance(trainer.state.optimizers[0], CoapAdamW)
    trainer.fit()
    assert rec.lrs == pytest.approx(expected)

    # torch LambdaLR built on the user's AdamW before the Trainer existed: lr of batch k = 2e-3 * 0.5**k
    model = make_model()
    user_opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(user_opt, lambda s: 0.5**s)
    rec = LrRecorder()
    trainer = make_trainer(
        digits,
        model=model,
        optimizer=user_opt,
        schedulers=sched,
        max_duration="4ba",
        step_schedulers_every_batch=True,
        callbacks=[rec],
    )
    opt = trainer.state.optimizers[0]
    assert sched.optimizer is opt
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "lr_scheduler.step() before optimizer.step()"
        trainer.fit()
    assert rec.lrs == pytest.approx([2e-3 * 0.5**k for k in range(4)])
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.5**4)
    assert user_opt.param_groups[0]["lr"] == 2e-3  # the old optimizer is no longer driven


def test_no_optimizer_builds_coap_from_own_settings(digits):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(digits, optimizer=None, algorithms=[CoapAlgorithm(lr=5e-4, weight_decay=0.02)])
    g = trainer.state.optimizers[0].param_groups[0]
    assert type(trainer.state.optimizers[0]) is CoapAdamW
    assert (g["lr"], g["weight_decay"]) == (5e-4, 0.02)


def test_eight_bit_swap(digits):
    pytest.importorskip("bitsandbytes")
    trainer = make_trainer(digits, algorithms=[CoapAlgorithm(eight_bit=True)])
    assert type(trainer.state.optimizers[0]) is CoapAdamW8bit


def test_explicit_optimizer_translates_sgd(digits):
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    trainer = make_trainer(digits, model=model, optimizer=sgd, algorithms=[CoapAlgorithm("coap_adamw")])
    g = trainer.state.optimizers[0].param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"]) == (0.05, 1e-4, (0.9, 0.999))
    assert "momentum" not in g


# -- errors ----------------------------------------------------------------------------------
def test_sgd_without_optimizer_is_refused(digits):
    model = make_model()
    with pytest.raises(ValueError, match=r"cannot translate SGD.*AdamW.*optimizer='coap_adamw'"):
        make_trainer(digits, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_fsdp_is_refused(digits):
    with pytest.raises(ValueError, match=r"supports FSDP2, not FSDP1 \(got FSDPConfig.*FSDP2Config"):
        make_trainer(digits, parallelism_config={"fsdp": {}})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(update_interval=0), r"Invalid update_interval: 0"),
        (dict(update_interval="2ep"), r"Invalid update_interval: '2ep'.*'32ba'"),
        (dict(optimizer="sgd"), r"Invalid optimizer: 'sgd'.*coap_adamw"),
        (dict(rank_ratio_conv=0.5), r"Invalid rank_ratio_conv: 0.5"),
        (dict(reproject_factor=-1), r"Invalid reproject_factor"),
        (dict(on_foreign_checkpoint="maybe"), r"Invalid on_foreign_checkpoint"),
        (dict(policy=object()), r"Invalid policy"),
        (dict(lr=math.nan), r"^Invalid lr: nan \(must be a finite number >= 0\)$"),
        (dict(lr=math.inf), r"^Invalid lr: inf \(must be a finite number >= 0\)$"),
        (dict(weight_decay=math.inf), r"^Invalid weight_decay: inf \(must be a finite number >= 0\)$"),
        (dict(weight_decay=-0.1), r"^Invalid weight_decay: -0.1 "),
        (dict(eps=math.nan), r"^Invalid eps: nan \(must be a finite number >= 0\)$"),
        (
            dict(betas=(0.9, math.nan)),
            r"^Invalid betas: \(0.9, nan\) \(must be a pair of finite numbers in \[0, 1\)\)$",
        ),
        (dict(betas=(1.0, 0.999)), r"^Invalid betas: \(1.0, 0.999\)"),
        (dict(betas=0.9), r"^Invalid betas: 0.9 "),
        (dict(rank_ratio_cnn=0.5), r"^Invalid rank_ratio_cnn: 0.5"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoapAlgorithm(**kwargs)


def test_policy_conflicts_with_rank_arguments():
    from coap_plugins import CoapPolicy

    with pytest.raises(ValueError, match="Conflicting settings.*rank_ratio_conv"):
        CoapAlgorithm(policy=CoapPolicy(), rank_ratio_conv=4)
    with pytest.raises(ValueError, match="Conflicting settings: a policy was given together with rank_ratio_cnn;"):
        CoapAlgorithm(policy=CoapPolicy(), rank_ratio_cnn=4)


def _routing(trainer):
    return [(r["name"], r["shape"], repr(r["projector"])) for r in trainer.state.optimizers[0].routing()]


def test_rank_ratio_cnn_is_an_alias_of_rank_ratio_conv(digits):
    # the reference implementation's name (COAP's `rank_ratio_cnn`) routes as rank_ratio_conv does
    alias = CoapAlgorithm(rank_ratio_cnn=2)
    assert alias.settings.rank_ratio_conv == 2
    routed = _routing(make_trainer(digits, algorithms=[alias]))
    assert routed == _routing(make_trainer(digits, algorithms=[CoapAlgorithm(rank_ratio_conv=2)]))
    assert routed != _routing(make_trainer(digits, algorithms=[CoapAlgorithm()]))  # default ratio 4: other ranks
    assert any("Tucker2Projector" in proj for _, _, proj in routed)
    assert CoapAlgorithm(rank_ratio_cnn=2, rank_ratio_conv=2).settings.rank_ratio_conv == 2
    with pytest.raises(
        ValueError, match=r"^Conflicting settings: rank_ratio_cnn=2 and rank_ratio_conv=4 \(.*alias.*\)$"
    ):
        CoapAlgorithm(rank_ratio_cnn=2, rank_ratio_conv=4)


def test_time_string_interval():
    assert CoapAlgorithm(update_interval="16ba").settings.interval == 16


def test_functional_form_and_lazy_import():
    import subprocess
    import sys

    code = "import coap_plugins.algorithms, sys; assert 'composer' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    new = apply_coap(model, opt, schedulers=[sched], rank_ratio_matrix=2)
    assert type(new) is CoapAdamW and sched.optimizer is new


# -- refreshes and logging -------------------------------------------------------------------
def test_refreshes_follow_schedule_and_are_logged(digits):
    mem = InMemoryLogger()
    algo = CoapAlgorithm(update_interval=2, reproject_factor=2)
    trainer = make_trainer(
        digits,
        algorithms=[algo],
        max_duration="12ba",
        loggers=[mem],
        callbacks=[OptimizerMonitor(batch_log_interval=1)],
    )
    losses = []

    class Loss(Callback):
        def after_train_batch(self, state, logger):
            losses.append(float(state.loss))

    trainer.state.callbacks.append(Loss())
    trainer.fit()
    assert algo.refreshes == [
        (2, "correlation"),
        (4, "svd"),
        (6, "correlation"),
        (8, "svd"),
        (10, "correlation"),
        (12, "svd"),
    ]
    opt = trainer.state.optimizers[0]
    steps = {e["last_refresh_step"] for e in opt.coap_report()["layers"] if "last_refresh_step" in e}
    assert steps == {12}  # every projected layer refreshed on the algorithm's last refresh step
    for key in (
        "coap/state_bytes",
        "coap/full_rank_state_bytes",
        "coap/state_ratio",
        "coap/reconstruction_error",
        "coap/cosine",
        "coap/refresh_seconds",
    ):
        values = [float(v) for _, v in mem.data[key]]
        assert values and all(math.isfinite(v) for v in values), key
    assert len(mem.data["coap/state_ratio"]) == 6 and len(mem.data["coap/cosine"]) == 3
    assert 0 < mem.data["coap/state_ratio"][-1][1] < 1
    assert any(k.startswith("l2_norm/grad") for k in mem.data)  # OptimizerMonitor still works
    # ... and reports COAP's per-parameter numbers through the optimizer's hook
    conv = "module.features.8.weight"
    assert f"coap/state_bytes/{conv}" in mem.data and f"coap/reconstruction_error/{conv}" in mem.data
    assert int(mem.data[f"coap/state_bytes/{conv}"][-1][1]) == opt.state_bytes(
        dict(trainer.state.model.named_parameters())[conv]
    )
    routing = {k: v for k, v in mem.hyperparameters.items() if k.startswith("coap/routing/")}
    assert any("tucker2" in v for v in routing.values()) and any("full rank" in v for v in routing.values())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2


class TinyUNet(ComposerModel):
    """One down, one up, a skip connection; trained to denoise the digits."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1))

    def forward(self, batch):
        x, _ = batch
        noisy = x + 0.5 * torch.randn_like(x)
        e = self.enc(noisy)
        return self.dec(torch.cat([e, self.up(self.down(e))], dim=1))

    def loss(self, outputs, batch):
        return nn.functional.mse_loss(outputs, batch[0])


def test_unet_trains(digits):
    torch.manual_seed(0)
    model = TinyUNet()
    mem = InMemoryLogger()
    trainer = make_trainer(
        digits,
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
        algorithms=[CoapAlgorithm(update_interval=3, reproject_factor=2)],
        max_duration="12ba",
        loggers=[mem],
    )
    trainer.fit()
    loss = [float(v) for _, v in mem.data["loss/train/total"]]
    assert sum(loss[-3:]) / 3 < 0.7 * sum(loss[:3]) / 3
    assert all(math.isfinite(float(v)) for _, v in mem.data["coap/reconstruction_error"])
    assert "tucker2" in trainer.state.optimizers[0].param_groups[0]["projection"]


# -- exact resume ----------------------------------------------------------------------------
def _resume_run(digits, tmp_path, eight_bit=False, autoresume=False):
    def algo():
        return CoapAlgorithm(update_interval=2, reproject_factor=2, eight_bit=eight_bit)

    full = make_trainer(digits, algorithms=[algo()], max_duration="6ba")
    full.fit()
    ref = params(full)
    ref_state = full.state.optimizers[0].state_dict()["state"]

    kw = dict(save_folder=str(tmp_path / "ckpt"), save_interval="3ba", save_filename="ba{batch}.pt")
    if autoresume:
        kw.update(run_name="coap-resume", autoresume=True, save_overwrite=True)
    first = make_trainer(digits, algorithms=[algo()], max_duration="3ba", **kw)
    first.fit()
    first.close()
    if autoresume:
        second = make_trainer(digits, model=make_model(seed=1), algorithms=[algo()], max_duration="6ba", **kw)
    else:
        second = make_trainer(
            digits,
            model=make_model(seed=1),
            algorithms=[algo()],
            max_duration="6ba",
            load_path=str(tmp_path / "ckpt" / "ba3.pt"),
        )
    assert int(second.state.timestamp.batch) == 3
    algo2 = second.state.algorithms[0]
    assert algo2.steps == 3
    second.fit()
    assert algo2.refreshes == [(4, "svd"), (6, "correlation")]  # a recalibration in the second half
    got = params(second)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    got_state = second.state.optimizers[0].state_dict()["state"]
    for pid, st in ref_state.items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(got_state[pid][key], v), (pid, key)


def test_exact_resume_load_path(digits, tmp_path):
    _resume_run(digits, tmp_path)


def test_exact_resume_eight_bit(digits, tmp_path):
    pytest.importorskip("bitsandbytes")
    _resume_run(digits, tmp_path, eight_bit=True)


def test_exact_resume_autoresume(digits, tmp_path):
    _resume_run(digits, tmp_path, autoresume=True)


def test_foreign_checkpoint_is_refused_or_fresh(digits, tmp_path):
    first = make_trainer(
        digits,
        algorithms=[],
        max_duration="3ba",
        save_folder=str(tmp_path),
        save_interval="3ba",
        save_filename="ba{batch}.pt",
    )
    first.fit()
    first.close()
    path = str(tmp_path / "ba3.pt")
    with pytest.raises(ValueError, match="written without CoapAlgorithm.*on_foreign_checkpoint='fresh'"):
        make_trainer(digits, max_duration="6ba", load_path=path)
    mem = InMemoryLogger()
    second = make_trainer(
        digits,
        max_duration="6ba",
        load_path=path,
        loggers=[mem],
        algorithms=[CoapAlgorithm(update_interval=2, on_foreign_checkpoint="fresh")],
    )
    assert mem.hyperparameters["coap/fresh_start"] is True
    second.fit()
    assert second.state.algorithms[0].refreshes == [(2, "correlation")]


def test_checkpoint_with_other_coap_optimizer_is_refused(digits, tmp_path):
    pytest.importorskip("bitsandbytes")
    first = make_trainer(
        digits, max_duration="3ba", save_folder=str(tmp_path), save_interval="3ba", save_filename="ba{batch}.pt"
    )
    first.fit()
    first.close()
    with pytest.raises(ValueError, match=r"written with COAP optimizer\(s\) \['CoapAdamW'\].*\['CoapAdamW8bit'\]"):
        make_trainer(
            digits,
            max_duration="6ba",
            load_path=str(tmp_path / "ba3.pt"),
            algorithms=[CoapAlgorithm(update_interval=2, reproject_factor=2, eight_bit=True)],
        )


# -- gradient accumulation -------------------------------------------------------------------
def test_gradient_accumulation_refreshes_once_per_step(digits):
    # no BatchNorm: microbatches must not change the forward pass, only how the gradient is summed
    def net():
        torch.manual_seed(0)
        body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(256, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
        return ComposerClassifier(body, num_classes=10)

    runs = {}
    for mb in (BATCH, BATCH // 4):
        for steps in (1, 6):
            algo = CoapAlgorithm(update_interval=2, reproject_factor=2)
            model = net()
            # eps well above float noise: Adam's first steps are ~lr * sign(g), which turns the rounding
            # differences of near-zero gradient entries (summed in another order) into lr-sized ones
            opt = torch.optim.AdamW(model.parameters(), lr=2e-3, eps=1e-4)
            t = make_trainer(
                digits,
                model=model,
                optimizer=opt,
                algorithms=[algo],
                max_duration=f"{steps}ba",
                device_train_microbatch_size=mb,
            )
            t.fit()
            runs[mb, steps] = (algo.refreshes, params(t))
    assert runs[BATCH, 6][0] == runs[BATCH // 4, 6][0] == [(2, "correlation"), (4, "svd"), (6, "correlation")]
    # The first step (projector set-up and one update) agrees to rounding: measured up to 4e-5
    # (the set-up sketches differ in their last bits), against steps of lr * 4 = 8e-3.
    for k, v in runs[BATCH, 1][1].items():
        torch.testing.assert_close(runs[BATCH // 4, 1][1][k], v, rtol=0, atol=1e-4)
    # Later the runs drift apart without any wiring error: the gradient summed over microbatches
    # differs in its last bits, and a basis of singular vectors is not continuous in the gradient
    # where singular values nearly tie (already the set-up projectors differ by 2.5e-3), so a
    # recalibration can reorder near-equal directions, which Adam's per-coordinate normalization
    # and the projected update's scale (4 at ratio 4) carry into the weights.  Measured after 6
    # steps: at most 1.3e-2 per entry and 3.5 % of a tensor's norm (the 64x32x3x3 conv).  Bound:
    # 0.1 of each tensor's norm (a step per microbatch would also show in the refresh steps).
    for k, v in runs[BATCH, 6][1].items():
        assert float((runs[BATCH // 4, 6][1][k] - v).norm() / v.norm()) < 0.1, k


# -- distributed -----------------------------------------------------------------------------
def _launch_two(script: str, *args: str) -> None:
    """``tests/scripts/<script> args`` on 2 CPU processes under torch.distributed.run (a clean
    environment; Composer's checkpoint loading wants NODE_RANK)."""
    import subprocess
    import sys
    from pathlib import Path

    env = launch_env(NODE_RANK="0")
    path = Path(__file__).parent / "scripts" / script
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_parameters_and_projectors_identical(tmp_path):
    _launch_two("ddp_composer.py", str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    expected = [(2, "correlation"), (4, "svd"), (6, "correlation"), (8, "svd")]
    assert [tuple(r) for r in r0["refreshes"]] == [tuple(r) for r in r1["refreshes"]] == expected
    assert len(r0["projectors"]) >= 4 and r0["projectors"].keys() == r1["projectors"].keys()
    for k in r0["projectors"]:
        assert torch.equal(r0["projectors"][k], r1["projectors"][k]), k
    start = dict(make_model(0).named_parameters())
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    # DDP wraps the model: "module.module.features.0.weight" is "module.features.0.weight" here
    moved = [k for k, v in r0["params"].items() if not torch.equal(v, start[k.removeprefix("module.")])]
    assert len(moved) == len(r0["params"]) == len(start)  # every parameter trained


@pytest.mark.slow
@pytest.mark.parametrize("state_dict_type", ["sharded", "full"])
def test_fsdp2_two_cpu_processes_train_checkpoint_and_resume_bit_exactly(tmp_path, state_dict_type):
    """CoapAlgorithm under parallelism_config={"fsdp": FSDP2Config(...)}: the optimizer Composer
    re-binds to the sharded parameters keeps DTensor state, refreshes on schedule, and a run
    resumed from the batch-4 checkpoint (Composer's sharded or full type) ends bit for bit where
    the uninterrupted one does, on both ranks."""
    (tmp_path / "full").mkdir()
    (tmp_path / "resumed").mkdir()
    ckpt = tmp_path / "ckpt"
    _launch_two(
        "ddp_composer.py", str(tmp_path / "full"), "--fsdp2", "--save", str(ckpt), "--state-dict-type", state_dict_type
    )
    load = ckpt / ("ep0-ba4" if state_dict_type == "sharded" else "ep0-ba4-rank0.pt")
    _launch_two(
        "ddp_composer.py",
        str(tmp_path / "resumed"),
        "--fsdp2",
        "--load",
        str(load),
        "--state-dict-type",
        state_dict_type,
    )
    full = [torch.load(tmp_path / "full" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    resumed = [torch.load(tmp_path / "resumed" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [tuple(r) for r in full[0]["refreshes"]] == [(2, "correlation"), (4, "svd"), (6, "correlation"), (8, "svd")]
    assert [tuple(r) for r in resumed[0]["refreshes"]] == [(6, "correlation"), (8, "svd")]
    assert full[0]["state_types"] == ["DTensor", "Tensor"] and len(full[0]["projectors"]) >= 4
    start = dict(make_model(0).named_parameters())
    for run in (full[1], *resumed):
        for k, v in full[0]["params"].items():
            assert torch.equal(run["params"][k], v), k
        for k, v in full[0]["projectors"].items():
            assert torch.equal(run["projectors"][k], v), k
    assert all(not torch.equal(v, start[k]) for k, v in full[0]["params"].items())  # every parameter trained


def test_adam_and_adafactor_translate(digits):
    from coap_plugins import CoapAdafactor

    model = make_model()
    trainer = make_trainer(digits, model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3))
    assert type(trainer.state.optimizers[0]) is CoapAdamW and trainer.state.optimizers[0].param_groups[0]["lr"] == 1e-3
    model = make_model()
    with pytest.raises(ValueError, match=r"Cannot translate Adam with weight_decay=0.1: .*Use torch.optim.AdamW"):
        make_trainer(digits, model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.1))
    model = make_model()
    fac = torch.optim.Adafactor(model.parameters(), lr=1e-2, weight_decay=0.0)
    trainer = make_trainer(digits, model=model, optimizer=fac, max_duration="4ba")
    new = trainer.state.optimizers[0]
    assert type(new) is CoapAdafactor
    g = new.param_groups[0]
    assert (g["lr"], g["beta1"], g["relative_step"], g["decay_rate"]) == (1e-2, None, False, -0.8)
    before = params(trainer)
    trainer.fit()
    assert any(not torch.equal(before[k], v) for k, v in params(trainer).items())
    # timm's Adafactor has a first moment (betas) and names its epsilons differently
    timm_optim = pytest.importorskip("timm.optim")
    model = make_model()
    fac = timm_optim.Adafactor(model.parameters(), lr=1e-2, betas=(0.8, 0.999), eps_scale=2e-3, weight_decay=0.01)
    g = make_trainer(digits, model=model, optimizer=fac).state.optimizers[0].param_groups[0]
    assert (g["lr"], g["beta1"], g["eps"], g["relative_step"], g["weight_decay"]) == (
        1e-2,
        0.8,
        (1e-30, 2e-3),
        False,
        0.01,
    )
    assert g["scale_parameter"] is False  # timm scales by the parameter's RMS only with relative_step
    assert not {"betas", "eps_scale", "min_dim_size_to_factor", "caution"} & g.keys()
    model = make_model()
    with pytest.raises(ValueError, match="Cannot translate Adafactor with caution=True"):
        make_trainer(digits, model=model, optimizer=timm_optim.Adafactor(model.parameters(), lr=1e-2, caution=True))


def test_timm_resnet_trains_and_logs(digits):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=10, in_chans=1)
    model = ComposerClassifier(net, num_classes=10)
    mem = InMemoryLogger()
    trainer = make_trainer(
        digits,
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        algorithms=[CoapAlgorithm(rank_ratio_conv=4, update_interval=2, reproject_factor=2, exclude=["*fc*"])],
        max_duration="8ba",
        loggers=[mem],
    )
    trainer.fit()
    loss = [float(v) for _, v in mem.data["loss/train/total"]]
    assert sum(loss[-2:]) / 2 < sum(loss[:2]) / 2
    for key in ("coap/state_bytes", "coap/state_ratio", "coap/reconstruction_error", "coap/refresh_seconds"):
        assert key in mem.data and all(math.isfinite(float(v)) for _, v in mem.data[key]), key
    assert 0 < float(mem.data["coap/state_ratio"][-1][1]) < 0.5
    report = trainer.state.optimizers[0].coap_report()
    assert report["waiting"] == []  # the zero-initialised block norms moved after step 1, the convs set up
    assert sum(1 for layer in report["layers"] if layer["projector"] == "tucker2") >= 16


def test_schedulers_passed_to_fit_are_rebound(digits):
    model = make_model()
    user_opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(user_opt, lambda s: 0.5**s)
    rec = LrRecorder()
    trainer = make_trainer(digits, model=model, optimizer=user_opt, callbacks=[rec])
    trainer.fit(schedulers=sched, duration="3ba", step_schedulers_every_batch=True)
    assert sched.optimizer is trainer.state.optimizers[0]
    assert rec.lrs == pytest.approx([2e-3 * 0.5**k for k in range(3)])


# -- optimizer wrappers (SAM) ----------------------------------------------------------------
def _projectors(opt):
    """Every projector tensor of a COAP optimizer: {(parameter name, state key): tensor}."""
    names = {id(p): n for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}
    return {(names[id(p)], k): v.clone() for p, st in opt.state.items() for k, v in st.items() if k.startswith("proj")}


class ProjectorRecorder(Callback):
    """The projectors after each batch (found through SAM-style wrappers' ``base_optimizer``)."""

    def __init__(self):
        self.after = []

    def batch_end(self, state, logger):
        opt = state.optimizers[0]
        self.after.append(_projectors(getattr(opt, "base_optimizer", opt)))


def _changed(before, after):
    return {k for k in after if k not in before or not torch.equal(after[k], before[k])}


def test_sam_wrapped_optimizer_refreshes_projectors(digits):
    from composer.algorithms import SAM

    rec = ProjectorRecorder()
    algo = CoapAlgorithm(update_interval=2, reproject_factor=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SAM warns about resuming from checkpoints
        trainer = make_trainer(digits, algorithms=[algo, SAM(rho=0.05)], callbacks=[rec], max_duration="6ba")
    trainer.fit()
    wrapper = trainer.state.optimizers[0]
    assert type(wrapper).__name__ == "SAMOptimizer" and isinstance(wrapper.base_optimizer, CoapAdamW)
    assert algo.refreshes == [(2, "correlation"), (4, "svd"), (6, "correlation")]
    snaps = rec.after
    assert len(snaps[0]) >= 5  # two Tucker-2 convs (proj_out, proj_in) and fc1 set up at step 1
    for step in range(2, 7):
        changed = _changed(snaps[step - 2], snaps[step - 1])
        if step % 2 == 0:
            assert changed == set(snaps[step - 1]), step  # every projector refreshed
        else:
            assert not changed, step
    layers = [e for e in wrapper.base_optimizer.coap_report()["layers"] if e["projector"] != "none"]
    assert layers and all(e["last_refresh_step"] == 6 for e in layers)


class SkipStepOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer as SAM does (``base_optimizer``, shared param groups) and skips the
    wrapped step on the given calls (1-based), as an AMP scaler does on an inf gradient."""

    def __init__(self, base, skip=()):
        self.base_optimizer, self.skip, self.calls = base, set(skip), 0
        super().__init__(base.param_groups, {})

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.calls += 1
        if self.calls not in self.skip:
            self.base_optimizer.step()
        return loss


class WrapOptimizers(Algorithm):
    """At AFTER_LOAD (where SAM wraps) replace every optimizer by ``make(optimizer)``."""

    def __init__(self, make):
        self.make = make

    def match(self, event, state):
        return event == Event.AFTER_LOAD

    def apply(self, event, state, logger):
        state.optimizers = [self.make(o) for o in state.optimizers]


def test_refresh_of_a_skipped_step_is_not_reported_and_does_not_run_later(digits):
    rec = ProjectorRecorder()
    algo = CoapAlgorithm(update_interval=2, reproject_factor=2)
    trainer = make_trainer(
        digits,
        algorithms=[algo, WrapOptimizers(lambda o: SkipStepOptimizer(o, skip={4}))],
        callbacks=[rec],
        max_duration="6ba",
    )
    trainer.fit()
    assert algo.refreshes == [(2, "correlation"), (6, "correlation")]  # the svd of step 4 never ran
    snaps = rec.after
    assert _changed(snaps[0], snaps[1]) == set(snaps[1])  # step 2 refreshed
    assert not _changed(snaps[2], snaps[3])  # step 4: no optimizer step, no refresh
    assert not _changed(snaps[3], snaps[4])  # step 5: the withdrawn request did not run late
    assert _changed(snaps[4], snaps[5]) == set(snaps[5])
    assert all(g["pending_refresh"] == "none" for g in trainer.state.optimizers[0].base_optimizer.param_groups)


def test_no_coap_optimizer_left_is_an_error(digits):
    # an algorithm that rebuilds the optimizer after the swap: no projector would ever be refreshed
    trainer = make_trainer(
        digits,
        algorithms=[
            CoapAlgorithm(update_interval=2),
            WrapOptimizers(lambda o: torch.optim.AdamW(o.param_groups[0]["params"])),
        ],
    )
    with pytest.raises(RuntimeError, match=r"found no COAP optimizer in state.optimizers \(AdamW\).*base_optimizer"):
        trainer.fit()


# -- module surgery in either order ----------------------------------------------------------
def _strided_net():
    # no BatchNorm (exact comparisons); both strided convs have 32+ input channels (BlurPool
    # replaces them) and more than min_conv_numel elements (Tucker-2)
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    return ComposerClassifier(body, num_classes=10)


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def after_train_batch(self, state, logger):
        self.losses.append(float(state.loss))


@pytest.mark.parametrize("surgery", ["blurpool", "channels_last", "both"])
def test_module_surgery_before_or_after_coap(digits, surgery):
    from composer.algorithms import BlurPool, ChannelsLast

    def surgeries():
        return {"blurpool": [BlurPool()], "channels_last": [ChannelsLast()], "both": [BlurPool(), ChannelsLast()]}[
            surgery
        ]

    runs = {}
    for order in ("coap_first", "coap_last"):
        algo = CoapAlgorithm(update_interval=2, reproject_factor=2)
        model = _strided_net()
        rec = LossRecorder()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BlurPool: "no MaxPool2d found" and the like
            trainer = make_trainer(
                digits,
                model=model,
                optimizer=torch.optim.AdamW(model.parameters(), lr=2e-3),
                algorithms=[algo, *surgeries()] if order == "coap_first" else [*surgeries(), algo],
                callbacks=[rec],
                max_duration="4ba",
            )
            trainer.fit()
        opt = trainer.state.optimizers[0]
        names = {id(p): n for n, p in trainer.state.model.named_parameters()}
        for g in opt.param_groups:  # the groups name and route the parameters they hold
            assert g["param_names"] == [names[id(p)] for p in g["params"]]
            assert len(g["projection"]) == len(g["params"])
        runs[order] = (_routing(trainer), rec.losses, params(trainer), algo.refreshes)
    first, last = runs["coap_first"], runs["coap_last"]
    assert first[0] == last[0]
    routed = {name: proj for name, _, proj in first[0]}
    blurred = "module.2.conv.weight" if surgery != "channels_last" else "module.2.weight"
    assert routed[blurred].startswith("Tucker2Projector(shape=(64, 32, 3, 3)")
    assert first[3] == last[3] == [(2, "correlation"), (4, "svd")]
    assert first[1] == last[1] and len(first[1]) == 4
    for k, v in first[2].items():
        assert torch.equal(last[2][k], v), k


@pytest.mark.parametrize("coap_first", [True, False])
@pytest.mark.parametrize("named_on", ["model", "inner_net"])
def test_module_surgery_keeps_the_routing_of_a_users_coap_optimizer(digits, coap_first, named_on):
    from composer.algorithms import BlurPool

    from coap_plugins import CoapPolicy

    model = _strided_net()
    # the user's own routing: the hidden linear (module.8) kept full rank, where CoapAlgorithm's
    # default policy would give it a matrix projector
    named = model if named_on == "model" else model.module
    opt = CoapAdamW(CoapPolicy(exclude=["*8"]).param_groups(named), lr=2e-3)
    algo = CoapAlgorithm(update_interval=2, reproject_factor=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(
            digits,
            model=model,
            optimizer=opt,
            max_duration="2ba",
            algorithms=[algo, BlurPool()] if coap_first else [BlurPool(), algo],
        )
        trainer.fit()
    assert trainer.state.optimizers[0] is opt
    routed = {name: proj for name, _, proj in _routing(trainer)}
    assert routed["module.8.weight"] == "None" and routed["module.10.weight"].startswith("MatrixProjector")
    assert routed["module.2.conv.weight"].startswith("Tucker2Projector")  # added by the surgery: the policy's kind
    assert algo.refreshes == [(2, "correlation")]


def test_find_coap_optimizers_follows_wrappers_once():
    from types import SimpleNamespace

    from coap_plugins.translate import find_coap_optimizers

    model = nn.Linear(8, 8)
    coap = CoapAdamW(model.parameters())
    a = SimpleNamespace(step=lambda: None)
    b = SimpleNamespace(step=lambda: None, optimizer=a, optim=coap)
    a.base_optimizer, a._optimizer = b, a  # a cycle and a self-reference end the search
    assert find_coap_optimizers([a, coap, b]) == [coap]
    assert find_coap_optimizers([SimpleNamespace(step=lambda: None, optimizer="not an optimizer")]) == []


def test_resuming_a_sam_checkpoint_without_coap_state_is_refused_or_fresh(digits, tmp_path):
    from composer.algorithms import SAM

    def algos(**kw):
        return [CoapAlgorithm(update_interval=2, reproject_factor=2, **kw), SAM(rho=0.05)]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SAM's and Composer's warnings about the resumption
        first = make_trainer(
            digits,
            algorithms=algos(),
            max_duration="2ba",
            save_folder=str(tmp_path),
            save_interval="2ba",
            save_filename="ba{batch}.pt",
        )
        first.fit()
        first.close()
        path = str(tmp_path / "ba2.pt")
        # SAM's checkpoint holds the SAMOptimizer's state (e_w), none of CoapAdamW's moments or projectors
        with pytest.raises(
            ValueError,
            match=r"written after 2 COAP step\(s\) but Composer restored no state into "
            r"CoapAdamW.*SAMOptimizer.*on_foreign_checkpoint='fresh'",
        ):
            make_trainer(digits, algorithms=algos(), max_duration="4ba", load_path=path)
        mem = InMemoryLogger()
        second = make_trainer(
            digits, algorithms=algos(on_foreign_checkpoint="fresh"), max_duration="4ba", load_path=path, loggers=[mem]
        )
    assert mem.hyperparameters["coap/fresh_start"] is True
    second.fit()
    assert second.state.algorithms[0].refreshes == [(4, "svd")]
