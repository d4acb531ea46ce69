"""CoapCallback in a real lightning.Trainer: the swap through configure_optimizers, schedulers,
hook-driven refreshes, logging, exact resume from Lightning checkpoints, gradient accumulation,
clipping, bf16 and the errors."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("lightning")
pytest.importorskip("sklearn")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

from coap_plugins import CoapAdamW, CoapAdamW8bit  # noqa: E402
from coap_plugins.algorithms import CoapCallback  # noqa: E402
from coap_plugins.examples import SmallCNN  # noqa: E402

torch.set_num_threads(1)
BATCH = 32


def loader(data, n=BATCH * 6, batch=BATCH):
    ds = torch.utils.data.TensorDataset(data.x_train[:n], data.y_train[:n])
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


class Classifier(pl.LightningModule):
    """SmallCNN on the digits; ``make_optim(module)`` is what ``configure_optimizers`` returns."""

    def __init__(self, make_optim=None, net=None):
        super().__init__()
        self.net = net if net is not None else SmallCNN()
        self.make_optim = make_optim or (lambda m: torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.05))
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return self.make_optim(self)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Classifier(**kw)


def make_trainer(tmp_path, callbacks=None, max_steps=6, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks if callbacks is not None else [CoapCallback(update_interval=2, reproject_factor=2)],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


class LrRecorder(Callback):
    """The lr of the first group when each optimizer step runs."""

    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


# -- the swap --------------------------------------------------------------------------------
def test_swap_keeps_groups_and_restores_configure_optimizers(digits, tmp_path):
    def optim(m):
        convs = [p for p in m.parameters() if p.ndim > 1]
        rest = [p for p in m.parameters() if p.ndim <= 1]
        return torch.optim.AdamW(
            [
                {"params": convs, "lr": 3e-3, "weight_decay": 0.1, "tag": "weights"},
                {"params": rest, "weight_decay": 0.0},
            ],
            lr=1e-3,
            betas=(0.8, 0.95),
            eps=1e-7,
        )

    model = make_model(make_optim=optim)
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(model, loader(digits))
    new = trainer.optimizers[0]
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
    assert [id(p) for p in g0["params"]] == [id(p) for p in model.parameters() if p.ndim > 1]
    assert g1["projection"] == ["none"] * len(g1["params"])
    assert "tucker2" in g0["projection"]
    assert all(g["schedule"] == "external" for g in new.param_groups)
    # teardown put the user's method back: a plain call returns the user's AdamW again
    assert "configure_optimizers" not in model.__dict__
    assert type(model.configure_optimizers()) is torch.optim.AdamW


def test_setup_twice_wraps_once_and_second_fit_swaps_again(digits, tmp_path):
    cb = CoapCallback(update_interval=2)
    model = make_model()
    fake = SimpleNamespace(callbacks=[cb], strategy=pl.strategies.SingleDeviceStrategy())
    cb.setup(fake, model, "fit")
    cb.setup(fake, model, "fit")  # a double wrap would translate a CoapAdamW and raise
    assert type(model.configure_optimizers()) is CoapAdamW
    cb.teardown(fake, model, "fit")
    assert type(model.configure_optimizers()) is torch.optim.AdamW
    for _ in range(2):  # the same callback and module in two fits
        trainer = make_trainer(tmp_path, callbacks=[cb], max_steps=2)
        trainer.fit(model, loader(digits))
        assert type(trainer.optimizers[0]) is CoapAdamW


def test_none_builds_coap_from_own_settings(digits, tmp_path):
    model = make_model(make_optim=lambda m: None)
    trainer = make_trainer(tmp_path, callbacks=[CoapCallback(lr=5e-4, weight_decay=0.02)], max_steps=1)
    trainer.fit(model, loader(digits))  # Lightning never sees the None (no "no optimizer" warning)
    opt = trainer.optimizers[0]
    assert type(opt) is CoapAdamW and (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (5e-4, 0.02)


def test_eight_bit_and_explicit_sgd_translation(digits, tmp_path):
    pytest.importorskip("bitsandbytes")
    trainer = make_trainer(tmp_path, callbacks=[CoapCallback(eight_bit=True)], max_steps=1)
    trainer.fit(make_model(), loader(digits))
    assert type(trainer.optimizers[0]) is CoapAdamW8bit
    model = make_model(make_optim=lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4))
    trainer = make_trainer(tmp_path, callbacks=[CoapCallback("coap_adamw")], max_steps=1)
    trainer.fit(model, loader(digits))
    g = trainer.optimizers[0].param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"]) == (0.05, 1e-4, (0.9, 0.999)) and "momentum" not in g


# -- schedulers ------------------------------------------------------------------------------
def test_step_lr_per_epoch_and_one_cycle_per_step_drive_the_new_optimizer(digits, tmp_path):
    def step_lr(m):  # ([optimizers], [schedulers]); StepLR stepped per epoch (3 batches per epoch)
        opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    def one_cycle(m):  # dict form with a config dict, stepped every optimizer step
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=6)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def small_loader(data):
        return loader(data, n=BATCH * 3)

    for make_optim, expected in ((step_lr, [2e-3] * 3 + [1e-3] * 3), (one_cycle, None)):
        runs = {}
        for coap in (False, True):
            rec = LrRecorder()
            cbs = ([CoapCallback(update_interval=2, reproject_factor=2)] if coap else []) + [rec]
            trainer = make_trainer(tmp_path, callbacks=cbs, max_steps=6)
            trainer.fit(make_model(make_optim=make_optim), small_loader(digits))
            runs[coap] = (rec.lrs, trainer)
        (plain, _), (got, trainer) = runs[False], runs[True]
        assert len(got) == 6 and got == plain  # the exact same lr sequence as without COAP
        if expected is not None:
            assert got == pytest.approx(expected, rel=0, abs=0)
        sched = trainer.lr_scheduler_configs[0].scheduler
        assert sched.optimizer is trainer.optimizers[0] and type(trainer.optimizers[0]) is CoapAdamW
    # OneCycleLR also cycles Adam's beta1 on the new optimizer's groups
    assert trainer.optimizers[0].param_groups[0]["betas"][0] != 0.9


# -- errors ----------------------------------------------------------------------------------
def test_unsupported_optimizer_is_refused(digits, tmp_path):
    model = make_model(make_optim=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(MisconfigurationException, match=r"CoapCallback cannot translate SGD.*optimizer='coap_adamw'"):
        make_trainer(tmp_path).fit(model, loader(digits))
    assert "configure_optimizers" not in model.__dict__  # unwrapped although fit raised
    trainer = make_trainer(tmp_path, callbacks=[CoapCallback("coap_adamw")], max_steps=1)
    trainer.fit(model, loader(digits))  # as the error suggests
    assert type(trainer.optimizers[0]) is CoapAdamW
    model = make_model(make_optim=lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=0.1))
    with pytest.raises(MisconfigurationException, match=r"Cannot translate Adam with weight_decay=0.1"):
        make_trainer(tmp_path).fit(model, loader(digits))


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategies_are_refused(strategy):
    # Neither can be built on a CPU-only machine (FSDP wants CUDA, DeepSpeed its package), so the
    # strategy is an uninitialised instance of the real class.
    cls = getattr(pl.strategies, strategy)
    cb = CoapCallback()
    fake = SimpleNamespace(callbacks=[cb], strategy=cls.__new__(cls))
    model = make_model()
    with pytest.raises(MisconfigurationException, match=rf"does not support {strategy}.*ModelParallelStrategy.*'ddp'"):
        cb.setup(fake, model, "fit")
    assert "configure_optimizers" not in model.__dict__


def test_two_callbacks_have_distinct_state_keys_and_are_refused(digits, tmp_path):
    a, b = CoapCallback(), CoapCallback(update_interval=4)
    assert (
        a.state_key
        == "CoapCallback{'optimizer': 'auto', 'eight_bit': False, 'update_interval': 32, 'reproject_factor': 5}"
    )
    assert b.state_key != a.state_key
    with pytest.raises(MisconfigurationException, match="2 CoapCallbacks.*keep one"):
        make_trainer(tmp_path, callbacks=[a, b]).fit(make_model(), loader(digits))
    # with equal settings the keys collide and Lightning refuses them itself, at Trainer construction
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `CoapCallback`"):
        make_trainer(tmp_path, callbacks=[CoapCallback(), CoapCallback()])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(update_interval=0), r"Invalid update_interval: 0"),
        (dict(update_interval="2ep"), r"Invalid update_interval: '2ep'.*'32ba'"),
        (dict(optimizer="sgd"), r"Invalid optimizer: 'sgd'.*coap_adamw"),
        (dict(rank_ratio_conv=0.5), r"Invalid rank_ratio_conv: 0.5"),
        (dict(reproject_factor=-1), r"Invalid reproject_factor"),
        (dict(eight_bit="yes"), r"Invalid eight_bit: 'yes'"),
        (dict(policy=object()), r"Invalid policy"),
        (dict(lr=math.nan), r"^Invalid lr: nan \(must be a finite number >= 0\)$"),
        (dict(weight_decay=math.inf), r"^Invalid weight_decay: inf \(must be a finite number >= 0\)$"),
        (dict(eps=-1.0), r"^Invalid eps: -1.0 \(must be a finite number >= 0\)$"),
        (
            dict(betas=(0.9, math.inf)),
            r"^Invalid betas: \(0.9, inf\) \(must be a pair of finite numbers in \[0, 1\)\)$",
        ),
        (dict(betas=0.9), r"^Invalid betas: 0.9 "),
        (dict(rank_ratio_cnn=0.5), r"^Invalid rank_ratio_cnn: 0.5"),
        (dict(rank_ratio_cnn=2, rank_ratio_conv=4), r"^Conflicting settings: rank_ratio_cnn=2 and rank_ratio_conv=4 "),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        CoapCallback(**kwargs)


def test_rank_ratio_cnn_is_an_alias_of_rank_ratio_conv(digits, tmp_path):
    def routing(cb):
        model = make_model()
        make_trainer(tmp_path, callbacks=[cb], max_steps=1).fit(model, loader(digits, n=BATCH))
        return [(r["name"], repr(r["projector"])) for r in cb._replaced[0][1].routing()]

    routed = routing(CoapCallback(rank_ratio_cnn=2))
    assert routed == routing(CoapCallback(rank_ratio_conv=2)) != routing(CoapCallback())
    assert dict(routed)["net.features.4.weight"].startswith("Tucker2Projector")


def test_lazy_import():
    import subprocess
    import sys

    code = (
        "import coap_plugins.algorithms, sys; assert 'lightning' not in sys.modules; assert 'composer' not in "
        "sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- refreshes, logging, state_key -----------------------------------------------------------
def _csv_rows(tmp_path):
    [path] = list(tmp_path.glob("logs/**/metrics.csv"))
    with open(path) as f:
        return list(csv.DictReader(f))


def test_refreshes_follow_schedule_and_are_logged(digits, tmp_path):
    cb = CoapCallback(update_interval=2, reproject_factor=2)
    model = make_model()
    trainer = make_trainer(tmp_path, callbacks=[cb], max_steps=12, logger=CSVLogger(tmp_path, name="logs"))
    trainer.fit(model, loader(digits))
    assert cb.refreshes == [
        (2, "correlation"),
        (4, "svd"),
        (6, "correlation"),
        (8, "svd"),
        (10, "correlation"),
        (12, "svd"),
    ]
    assert cb.steps == 12 == trainer.global_step
    steps = {e["last_refresh_step"] for e in trainer.optimizers[0].coap_report()["layers"] if "last_refresh_step" in e}
    assert steps == {12}
    rows = [r for r in _csv_rows(tmp_path) if r.get("coap/state_ratio")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    for key in ("coap/state_bytes", "coap/full_rank_state_bytes", "coap/reconstruction_error", "coap/refresh_seconds"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    assert [bool(r["coap/cosine"]) for r in rows] == [True, False] * 3  # correlation updates only
    assert 0 < float(rows[-1]["coap/state_ratio"]) < 1
    import yaml

    hparams = yaml.safe_load((tmp_path / "logs" / "version_0" / "hparams.yaml").read_text())
    assert hparams["coap/routing/net.features.4.weight"].startswith("tucker2")
    assert hparams["coap/routing/net.features.1.weight"] == "full rank 32"
    assert sum(model.losses[-3:]) < sum(model.losses[:3]) - 0.6


def test_state_key_and_checkpoint_content(digits, tmp_path):
    cb = CoapCallback(update_interval=2, reproject_factor=2)
    trainer = make_trainer(tmp_path, callbacks=[cb], max_steps=3)
    trainer.fit(make_model(), loader(digits))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=True)  # plain tensors and numbers only
    assert ckpt["callbacks"][cb.state_key] == {
        "steps": [3],
        "optimizer": "auto",
        "eight_bit": False,
        "update_interval": 2,
        "reproject_factor": 2,
        "optimizer_classes": ["CoapAdamW"],
    }
    assert any(k.startswith("proj") for st in ckpt["optimizer_states"][0]["state"].values() for k in st)


# -- exact resume ----------------------------------------------------------------------------
def _resume(digits, tmp_path, eight_bit=False):
    def cb():
        return CoapCallback(update_interval=2, reproject_factor=2, eight_bit=eight_bit)

    def sched_optim(m):
        opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.05)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)}

    full_model = make_model(make_optim=sched_optim)
    full = make_trainer(tmp_path / "full", callbacks=[cb()], max_steps=-1, max_epochs=2)
    full.fit(full_model, loader(digits))
    ref_state = full.optimizers[0].state_dict()

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    first = make_trainer(tmp_path / "a", callbacks=[cb(), ckpt], max_steps=-1, max_epochs=1, enable_checkpointing=True)
    first.fit(make_model(make_optim=sched_optim), loader(digits))
    path = tmp_path / "ckpt" / "epoch=0.ckpt"
    assert torch.load(path, weights_only=True)["global_step"] == 6  # what fit(ckpt_path=...) does by default

    cb2 = cb()
    second_model = make_model(seed=1, make_optim=sched_optim)
    second = make_trainer(tmp_path / "b", callbacks=[cb2], max_steps=-1, max_epochs=2)
    second.fit(second_model, loader(digits), ckpt_path=path)  # the default weights_only
    assert second.global_step == 12 and cb2.steps == 12
    assert cb2.refreshes == [(8, "svd"), (10, "correlation"), (12, "svd")]
    got, ref = params(second_model), params(full_model)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    got_state = second.optimizers[0].state_dict()
    for pid, st in ref_state["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(got_state["state"][pid][key], v), (pid, key)
    assert got_state["param_groups"][0]["lr"] == ref_state["param_groups"][0]["lr"] == pytest.approx(2e-3 * 0.7**2)
    return path


def test_exact_resume_at_epoch_end(digits, tmp_path):
    path = _resume(digits, tmp_path)
    # the checkpoint needs the same schedule and optimizer, and a CoapCallback at all
    with pytest.raises(MisconfigurationException, match=r"written by a CoapCallback with update_interval=2 \(here 3\)"):
        make_trainer(
            tmp_path, callbacks=[CoapCallback(update_interval=3, reproject_factor=2)], max_steps=-1, max_epochs=2
        ).fit(make_model(), loader(digits), ckpt_path=path)
    pytest.importorskip("bitsandbytes")
    with pytest.raises(
        MisconfigurationException, match=r"written by a CoapCallback with eight_bit=False \(here True\)"
    ):
        make_trainer(
            tmp_path,
            callbacks=[CoapCallback(update_interval=2, reproject_factor=2, eight_bit=True)],
            max_steps=-1,
            max_epochs=2,
        ).fit(make_model(), loader(digits), ckpt_path=path)


def test_exact_resume_eight_bit(digits, tmp_path):
    pytest.importorskip("bitsandbytes")
    _resume(digits, tmp_path, eight_bit=True)


def test_checkpoint_without_callback_is_refused(digits, tmp_path):
    first = make_trainer(tmp_path, callbacks=[], max_steps=3)
    first.fit(make_model(), loader(digits))
    first.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(MisconfigurationException, match=r"written without CoapCallback.*load_from_checkpoint"):
        make_trainer(tmp_path, max_steps=6).fit(make_model(), loader(digits), ckpt_path=tmp_path / "plain.ckpt")
    # a user optimizer of another family under optimizer="auto": same settings, other COAP class
    coap = make_trainer(tmp_path, max_steps=3)
    coap.fit(make_model(), loader(digits))
    coap.save_checkpoint(tmp_path / "coap.ckpt")
    model = make_model(make_optim=lambda m: torch.optim.Adafactor(m.parameters(), lr=1e-2))
    with pytest.raises(
        MisconfigurationException, match=r"\['CoapAdamW'\] but this CoapCallback builds \['CoapAdafactor'\]"
    ):
        make_trainer(tmp_path, max_steps=6).fit(model, loader(digits), ckpt_path=tmp_path / "coap.ckpt")


# -- accumulation, clipping, bf16 ------------------------------------------------------------
def _no_bn_net():
    # no BatchNorm: accumulated microbatches must not change the forward pass
    return nn.Sequential(
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


def test_gradient_accumulation_refreshes_once_per_step(digits, tmp_path):
    runs = {}
    for accumulate, batch in ((1, BATCH), (2, BATCH // 2)):
        for steps in (1, 6):
            cb = CoapCallback(update_interval=2, reproject_factor=2)
            torch.manual_seed(0)
            model = Classifier(
                net=_no_bn_net(), make_optim=lambda m: torch.optim.AdamW(m.parameters(), lr=2e-3, eps=1e-4)
            )
            trainer = make_trainer(tmp_path, callbacks=[cb], max_steps=steps, accumulate_grad_batches=accumulate)
            trainer.fit(model, loader(digits, batch=batch))
            assert trainer.global_step == steps and len(model.losses) == steps * accumulate
            runs[accumulate, steps] = (cb.refreshes, params(model))
    assert runs[1, 6][0] == runs[2, 6][0] == [(2, "correlation"), (4, "svd"), (6, "correlation")]
    # as the Composer microbatch test: the first step agrees to rounding; later, summation order
    # changes the last bits of the gradient, which a recalibration can turn into a different
    # ordering of near-tied directions (measured after 6 steps: 16 % of the norm of the 64x32x3x3
    # conv and 14 % of the 64x256 linear, 4 % with the paper's unscaled update; 2 % or less for
    # the other tensors)
    for k, v in runs[1, 1][1].items():
        torch.testing.assert_close(runs[2, 1][1][k], v, rtol=0, atol=1e-4)
    for k, v in runs[1, 6][1].items():
        assert float((runs[2, 6][1][k] - v).norm() / v.norm()) < 0.3, k


class GradNorm(Callback):
    """Total gradient norm the optimizer step used (after Lightning's clipping)."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))


def test_gradient_clipping_and_bf16_mixed(digits, tmp_path):
    cb, gn = CoapCallback(update_interval=2, reproject_factor=2), GradNorm()
    trainer = make_trainer(tmp_path, callbacks=[cb, gn], max_steps=6, gradient_clip_val=0.05)
    trainer.fit(make_model(), loader(digits))
    assert cb.refreshes == [(2, "correlation"), (4, "svd"), (6, "correlation")]
    assert len(gn.norms) == 6 and max(gn.norms) <= 0.05 * (1 + 1e-5)

    cb = CoapCallback(update_interval=2, reproject_factor=2)
    model = make_model()
    start = params(model)
    trainer = make_trainer(tmp_path, callbacks=[cb], max_steps=12, precision="bf16-mixed")
    trainer.fit(model, loader(digits))
    assert len(cb.refreshes) == 6
    opt = trainer.optimizers[0]
    projs = [v for st in opt.state.values() for k, v in st.items() if k.startswith("proj")]
    assert projs and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in projs)
    assert all(not torch.equal(v, start[k]) for k, v in params(model).items())
    assert sum(model.losses[-3:]) < sum(model.losses[:3]) - 0.5


# -- optimizer wrappers ----------------------------------------------------------------------
class SkipStepOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer as Composer's SAM does (``base_optimizer``, shared param groups) and
    skips the wrapped step on the given calls (1-based), as an AMP scaler does on an inf gradient."""

    def __init__(self, base, skip=()):
        self.base_optimizer, self.skip, self.calls = base, set(skip), 0
        super().__init__(base.param_groups, {})

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.calls += 1
        if self.calls not in self.skip:
            self.base_optimizer.step()
        return loss


class ProjectorRecorder(Callback):
    def __init__(self, opt):
        self.opt, self.after = opt, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = self.opt()
        self.after.append(
            {(id(p), k): v.clone() for p, st in opt.state.items() for k, v in st.items() if k.startswith("proj")}
        )


def test_wrapped_coap_optimizer_is_driven_and_a_skipped_refresh_is_not_reported(digits, tmp_path):
    from coap_plugins import CoapPolicy

    inner = []

    def optim(m):
        inner.append(CoapAdamW(CoapPolicy().param_groups(m), lr=2e-3))
        return SkipStepOptimizer(inner[-1], skip={4})

    cb = CoapCallback(update_interval=2, reproject_factor=2)
    rec = ProjectorRecorder(lambda: inner[-1])
    model = make_model(make_optim=optim)
    trainer = make_trainer(tmp_path, callbacks=[cb, rec], max_steps=6)
    trainer.fit(model, loader(digits))
    assert type(trainer.optimizers[0]) is SkipStepOptimizer  # the wrapper is kept, its COAP optimizer driven
    assert all(g["schedule"] == "external" for g in inner[-1].param_groups)
    assert cb.refreshes == [(2, "correlation"), (6, "correlation")]  # the svd of step 4 never ran
    snaps = rec.after

    def changed(a, b):
        return {k for k in b if k not in a or not torch.equal(a[k], b[k])}

    assert len(snaps[0]) >= 5 and changed(snaps[0], snaps[1]) == set(snaps[1])
    assert not changed(snaps[2], snaps[3]) and not changed(snaps[3], snaps[4])  # skipped; not run late
    assert changed(snaps[4], snaps[5]) == set(snaps[5])


def test_resuming_a_wrapper_checkpoint_without_coap_state_is_refused(digits, tmp_path):
    from coap_plugins import CoapPolicy

    def optim(m):
        return SkipStepOptimizer(CoapAdamW(CoapPolicy().param_groups(m), lr=2e-3))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", save_top_k=-1)
    first = make_trainer(
        tmp_path / "a", callbacks=[CoapCallback(update_interval=2), ckpt], max_steps=2, enable_checkpointing=True
    )
    first.fit(make_model(make_optim=optim), loader(digits))
    # Lightning saved the wrapper's state_dict: its own (empty) state, none of CoapAdamW's
    assert not torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["optimizer_states"][0]["state"]
    second = make_trainer(tmp_path / "b", callbacks=[CoapCallback(update_interval=2)], max_steps=4)
    with pytest.raises(
        MisconfigurationException,
        match=r"written after 2 COAP step\(s\) but Lightning restored no state "
        r"into CoapAdamW: the optimizer Lightning saves is SkipStepOptimizer",
    ):
        second.fit(make_model(make_optim=optim), loader(digits), ckpt_path=tmp_path / "ckpt" / "last.ckpt")


# -- distributed -----------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_parameters_and_projectors_identical(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "ddp_lightning.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    expected = [(2, "correlation"), (4, "svd"), (6, "correlation"), (8, "svd")]
    assert [tuple(r) for r in r0["refreshes"]] == [tuple(r) for r in r1["refreshes"]] == expected
    assert len(r0["projectors"]) >= 4 and r0["projectors"].keys() == r1["projectors"].keys()
    for k in r0["projectors"]:
        assert torch.equal(r0["projectors"][k], r1["projectors"][k]), k
    start = params(make_model(0))
    assert r0["params"].keys() == start.keys()
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
        assert not torch.equal(r0["params"][k], start[k]), k  # every parameter trained


# -- LightningCLI ----------------------------------------------------------------------------
def test_lightning_cli_yaml_recipe(tmp_path):
    pytest.importorskip("jsonargparse")
    from coap_plugins.examples.lightning_cli import DigitsClassifier, cli_main
    from coap_plugins.recipes import RECIPES_DIR

    yaml_path = RECIPES_DIR / "lightningcli" / "small_cnn_digits.yaml"
    cli = cli_main(
        [
            "fit",
            "--config",
            str(yaml_path),
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.train_samples=128",
        ]
    )  # 2 batches per epoch
    trainer = cli.trainer
    [cb] = [c for c in trainer.callbacks if isinstance(c, CoapCallback)]
    assert (cb.settings.interval, cb.settings.reproject_factor, cb.settings.rank_ratio_conv) == (8, 5, 4)
    assert isinstance(cli.model, DigitsClassifier) and trainer.global_step == 4 and cb.steps == 4
    opt = trainer.optimizers[0]
    assert type(opt) is CoapAdamW and opt.param_groups[0]["weight_decay"] == 0.05
    routing = {r["name"]: r["projector"] for r in opt.routing()}
    assert routing["net.fc.weight"] is None and routing["net.fc1.weight"].kind == "matrix"
    assert routing["net.features.4.weight"].kind == "tucker2"
    # LightningCLI's scheduler (stepped per epoch) drives the COAP optimizer: the lr of cosine annealing
    # after 2 epochs, exactly
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.optimizer is opt and trainer.lr_scheduler_configs[0].interval == "epoch"
    ref_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=0.002)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=5)
    for _ in range(2):
        ref_opt.step()
        ref.step()
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] < 0.002
    # LightningCLI sets configure_optimizers on the instance: the callback put that one back
    assert getattr(cli.model.__dict__.get("configure_optimizers"), "_coap_callback", None) is None
    assert "configure_optimizers" in cli.model.__dict__


@pytest.mark.slow
def test_fsdp2_model_parallel_strategy_trains_checkpoints_and_resumes_bit_exactly(tmp_path):
    """ModelParallelStrategy with fully_shard in configure_model, on 2 gloo processes: the COAP
    optimizer built over the sharded parameters keeps DTensor state, refreshes on schedule, and
    fit(ckpt_path=...) from the step-4 distributed checkpoint (restored after setup, so after
    on_fit_start) continues the schedule and ends bit for bit where the uninterrupted run does."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "fsdp2_lightning.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    for args in (
        [str(tmp_path / "full"), "--save", str(tmp_path / "ckpt")],
        [str(tmp_path / "resumed"), "--load", str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt")],
    ):
        Path(args[0]).mkdir()
        proc = subprocess.run([*head, *args], capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
    full = [torch.load(tmp_path / "full" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    resumed = [torch.load(tmp_path / "resumed" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [tuple(r) for r in full[0]["refreshes"]] == [(2, "correlation"), (4, "svd"), (6, "correlation"), (8, "svd")]
    assert [tuple(r) for r in resumed[0]["refreshes"]] == [(6, "correlation"), (8, "svd")]
    assert full[0]["state_types"] == ["DTensor", "Tensor"] and len(full[0]["projectors"]) >= 4
    for run in (full[1], *resumed):
        for k, v in full[0]["params"].items():
            assert torch.equal(run["params"][k], v), k
        for k, v in full[0]["projectors"].items():
            assert torch.equal(run["projectors"][k], v), k
