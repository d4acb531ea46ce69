"""step_in_backward=True in Composer's CoapAlgorithm and Lightning's CoapCallback: the same
training as the normal mode (with micro-batches / accumulate_grad_batches 1 and 4, through
refreshes, with an LR scheduler), gradients freed, checkpoints resumed across modes, and the
settings that cannot step inside backward refused at fit start."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("composer")
pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
from composer import Trainer  # noqa: E402
from composer.algorithms import SAM, GradientClipping  # noqa: E402
from composer.models import ComposerClassifier  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

from coap_plugins.algorithms import CoapAlgorithm, CoapCallback  # noqa: E402
from coap_plugins.examples import SmallCNN  # noqa: E402

torch.set_num_threads(1)
BATCH = 32
SETTINGS = dict(update_interval=2, reproject_factor=2)


def loader(data, n=BATCH * 8, batch=BATCH):
    ds = torch.utils.data.TensorDataset(data.x_train[:n], data.y_train[:n])
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# -- Composer --------------------------------------------------------------------------------
def composer_trainer(data, backward, microbatch=BATCH, algorithms=(), **kw):
    torch.manual_seed(0)
    model = ComposerClassifier(SmallCNN(), num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    return Trainer(
        model=model,
        optimizers=opt,
        schedulers=kw.pop("schedulers", None) or torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
        algorithms=[CoapAlgorithm(step_in_backward=backward, **SETTINGS), *algorithms],
        train_dataloader=loader(data),
        max_duration=kw.pop("max_duration", "8ba"),
        device_train_microbatch_size=microbatch,
        device="cpu",
        seed=0,
        progress_bar=False,
        log_to_console=False,
        **kw,
    )


class _GradsAtStep:
    """Whether any parameter still has a .grad when the optimizer step is called."""

    def __init__(self, optimizer):
        self.seen = []
        optimizer.register_step_pre_hook(
            lambda opt, *_: self.seen.append(any(p.grad is not None for g in opt.param_groups for p in g["params"]))
        )


@pytest.mark.parametrize("microbatch", [BATCH, BATCH // 4])
def test_composer_trains_as_the_normal_mode(digits, microbatch):
    normal = composer_trainer(digits, False, microbatch)
    normal.fit()
    backward = composer_trainer(digits, True, microbatch)
    seen = _GradsAtStep(backward.state.optimizers[0])
    backward.fit()
    assert_same(normal.state.model, backward.state.model)
    assert seen.seen == [False] * 8  # every layer stepped (and freed) inside the last backward pass
    assert backward.state.algorithms[0].refreshes == normal.state.algorithms[0].refreshes
    assert len(normal.state.algorithms[0].refreshes) == 4


@pytest.mark.parametrize("first", [False, True])
def test_composer_resumes_across_modes(digits, tmp_path, first):
    ref = composer_trainer(digits, False, BATCH // 2)
    ref.fit()
    a = composer_trainer(digits, first, BATCH // 2, max_duration="4ba", save_folder=str(tmp_path), save_interval="4ba")
    a.fit()
    b = composer_trainer(digits, not first, BATCH // 2, load_path=str(tmp_path / "ep0-ba4-rank0.pt"))
    b.fit()
    assert_same(ref.state.model, b.state.model)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(algorithms=[GradientClipping(clipping_type="norm", clipping_threshold=1.0)]), "GradientClipping"),
        (
            dict(algorithms=[SAM()]),
            "an optimizer is not a COAP optimizer \\(a wrapper, or another optimizer: SAMOptimizer\\)",
        ),
    ],
)
def test_composer_refuses_what_needs_every_gradient(digits, kw, match):
    trainer = composer_trainer(digits, True, **kw)
    with pytest.raises(ValueError, match=f"CoapAlgorithm\\(step_in_backward=True\\): .*{match}"):
        trainer.fit()


# -- Lightning -------------------------------------------------------------------------------
class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = SmallCNN()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=2e-3, weight_decay=0.05)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


def lightning_fit(data, tmp_path, backward, accumulate=1, n=BATCH * 8, max_steps=-1, ckpt_path=None, **kw):
    module = Classifier()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=kw.pop("max_epochs", 1),
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        callbacks=[CoapCallback(step_in_backward=backward, **SETTINGS), *kw.pop("callbacks", [])],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )
    trainer.fit(module, loader(data, n=n, batch=BATCH // accumulate), ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.parametrize("accumulate", [1, 4])
def test_lightning_trains_as_the_normal_mode(digits, tmp_path, accumulate):
    """8 optimizer steps; with accumulate 4 the epoch's 34 batches end in a shorter window of 2,
    which Lightning steps on the epoch's last batch: the same in both modes."""
    n = BATCH * 8 + (BATCH // accumulate) * 2 * (accumulate > 1)
    a, ta = lightning_fit(digits, tmp_path, False, accumulate, n=n)
    b, tb = lightning_fit(digits, tmp_path, True, accumulate, n=n)
    assert ta.global_step == tb.global_step == (9 if accumulate > 1 else 8)
    assert_same(a, b)
    assert all(p.grad is None for p in b.parameters())
    assert tb.callbacks[0].refreshes == ta.callbacks[0].refreshes


@pytest.mark.parametrize("first", [False, True])
def test_lightning_resumes_across_modes(digits, tmp_path, first):
    ref, _ = lightning_fit(digits, tmp_path / "ref", False, 2, max_epochs=2)
    _, t = lightning_fit(digits, tmp_path / "a", first, 2, max_epochs=1)
    ckpt = tmp_path / "a.ckpt"
    t.save_checkpoint(ckpt)
    b, _ = lightning_fit(digits, tmp_path / "b", not first, 2, max_epochs=2, ckpt_path=str(ckpt))
    assert_same(ref, b)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(gradient_clip_val=1.0), "gradient_clip_val=1.0"),
        ("scaler", "precision='16-mixed' scales the loss with a GradScaler"),
    ],
)
def test_lightning_refuses_what_needs_every_gradient(digits, tmp_path, kw, match):
    if kw == "scaler":  # Lightning turns precision="16-mixed" into bf16 on the CPU: give the plugin itself
        from lightning.pytorch.plugins.precision import MixedPrecision

        kw = dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    with pytest.raises(MisconfigurationException, match=f"CoapCallback\\(step_in_backward=True\\): {match}"):
        lightning_fit(digits, tmp_path, True, max_steps=1, **kw)


# -- DDP, 2 CPU processes ----------------------------------------------------------------------
def _launch(script: str, *args: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from _helpers import launch_env

    Path(args[0]).mkdir(parents=True, exist_ok=True)
    path = Path(__file__).parent / "scripts" / script
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(path), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=launch_env(NODE_RANK="0"))
    assert proc.returncode == 0, proc.stderr[-4000:]


def _ranks_equal_and_equal_to(normal, backward) -> None:
    runs = [torch.load(backward / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    ref = torch.load(normal / "rank0.pt", weights_only=True)
    assert [tuple(r) for r in runs[0]["refreshes"]] == [(2, "correlation"), (4, "svd"), (6, "correlation"), (8, "svd")]
    for run in runs:
        assert run["params"].keys() == ref["params"].keys()
        for k, v in ref["params"].items():
            assert torch.equal(run["params"][k], v), k
        for k, v in ref["projectors"].items():
            assert torch.equal(run["projectors"][k], v), k


@pytest.mark.slow
def test_composer_ddp_micro_batches_in_backward_equal_the_normal_mode(tmp_path):
    """8 batches of 16 per rank in micro-batches of 8 (the first under DDP's no_sync): the ranks
    end bit-identical, and bit-equal to the normal mode (the default residual needs whole
    gradients, so each bucket is averaged as DDP does, then stepped)."""
    _launch("ddp_composer.py", str(tmp_path / "normal"), "--microbatch", "8")
    _launch("ddp_composer.py", str(tmp_path / "backward"), "--microbatch", "8", "--step-in-backward")
    _ranks_equal_and_equal_to(tmp_path / "normal", tmp_path / "backward")


@pytest.mark.slow
def test_lightning_ddp_accumulation_in_backward_equals_the_normal_mode(tmp_path):
    _launch("ddp_lightning.py", str(tmp_path / "normal"), "2")
    _launch("ddp_lightning.py", str(tmp_path / "backward"), "2", "backward")
    _ranks_equal_and_equal_to(tmp_path / "normal", tmp_path / "backward")


def test_lightning_refuses_manual_optimization(digits, tmp_path):
    class Manual(Classifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        callbacks=[CoapCallback(step_in_backward=True)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(MisconfigurationException, match="manual optimization calls backward and step itself"):
        trainer.fit(Manual(), loader(digits))
