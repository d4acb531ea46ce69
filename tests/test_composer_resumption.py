"""Resuming a Composer run with CoapAlgorithm from a mid-run checkpoint ends exactly where the
uninterrupted run ends: the two final checkpoints are equal, key for key (model weights, optimizer
state with the projectors, param groups, LR scheduler, algorithm state, timestamp, rng).

The same check Composer runs on its own algorithms (its ``test_algorithm_resumption``), here in
fp32 on CPU, with a refresh schedule short enough that a correlation update and an SVD
recalibration both run before and after the resume point.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("composer")
pytest.importorskip("sklearn")

from composer import Trainer  # noqa: E402
from composer.models import ComposerClassifier  # noqa: E402

from coap_plugins import CoapAdamW  # noqa: E402
from coap_plugins.algorithms import CoapAlgorithm  # noqa: E402
from coap_plugins.examples import SmallCNN  # noqa: E402

torch.set_num_threads(1)
BATCH = 32
BATCHES = 8  # one epoch; the checkpoint in the middle is at batch 4
REFRESHES = [(2, "correlation"), (4, "svd"), (6, "correlation"), (8, "svd")]


def _strided_net():
    # strided convs with 32+ input channels: BlurPool replaces them after the swap
    return nn.Sequential(
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


def _run(digits, case, folder, seed=0, **kw):
    """One Trainer of ``case``: a fresh model (initialised from ``seed``), AdamW, a cosine LR
    schedule stepped every batch, a fresh CoapAlgorithm; checkpoints every half run."""
    torch.manual_seed(seed)
    model = ComposerClassifier(SmallCNN() if case == "plain" else _strided_net(), num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    algorithms = [CoapAlgorithm(update_interval=2, reproject_factor=2)]
    if case == "blurpool_after":
        from composer.algorithms import BlurPool

        algorithms.append(BlurPool())  # its surgery runs after the swap, on the COAP optimizer's groups
    ds = torch.utils.data.TensorDataset(digits.x_train[: BATCH * BATCHES], digits.y_train[: BATCH * BATCHES])
    trainer = Trainer(
        model=model,
        optimizers=optimizer,
        schedulers=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=BATCHES),
        step_schedulers_every_batch=True,
        train_dataloader=torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False),
        algorithms=algorithms,
        max_duration=f"{BATCHES}ba",
        save_folder=str(folder),
        save_interval=f"{BATCHES // 2}ba",
        save_filename="ba{batch}.pt",
        device="cpu",
        precision="fp32",
        seed=0,
        progress_bar=False,
        log_to_console=False,
        **kw,
    )
    trainer.fit()
    trainer.close()
    return trainer


def _load(path):
    # a Composer checkpoint (wall-clock timedeltas, the torch version): not weights-only; written here
    ck = torch.load(path, map_location="cpu", weights_only=False)
    stamp = ck["state"]["timestamp"]["Timestamp"]
    for key in [k for k in stamp if k.endswith("_wct")]:
        del stamp[key]  # wall-clock durations always differ
    del ck["state"]["run_name"]  # time-dependent
    del ck["state"]["callbacks"]["CheckpointSaver"]["all_saved_checkpoints_to_timestamp"]  # paths of this run
    return ck


def _assert_same(a, b, path="checkpoint"):
    """``a`` and ``b`` equal all the way down: same keys, same types, tensors bit for bit."""
    if isinstance(a, dict):
        assert isinstance(b, dict), path
        assert sorted(map(str, a)) == sorted(map(str, b)), (
            f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        )
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert (a.dtype, a.shape) == (b.dtype, b.shape), (
            f"{path}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
        )
        assert torch.equal(a, b), f"{path}: max difference {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{path}: {a!r} vs {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"


def _coap_state(ck):
    [(name, opt)] = ck["state"]["optimizers"].items()
    assert name == "CoapAdamW"
    return opt


@pytest.mark.parametrize("case", ["plain", "blurpool_after"])
def test_resumed_run_ends_with_the_same_checkpoint(digits, tmp_path, case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BlurPool's notes; nothing here depends on a warning
        full = _run(digits, case, tmp_path / "full")
        # a fresh Trainer, a fresh model (other initial weights: the checkpoint must restore them), a
        # fresh CoapAlgorithm, resumed from the middle of the first run
        resumed = _run(digits, case, tmp_path / "resumed", seed=1, load_path=str(tmp_path / "full" / "ba4.pt"))
    assert isinstance(full.state.optimizers[0], CoapAdamW) and isinstance(resumed.state.optimizers[0], CoapAdamW)
    assert full.state.algorithms[0].refreshes == REFRESHES
    assert resumed.state.algorithms[0].refreshes == REFRESHES[2:]  # both kinds again after the resume point
    assert resumed.state.algorithms[0].steps == BATCHES

    end, end_resumed = _load(tmp_path / "full" / "ba8.pt"), _load(tmp_path / "resumed" / "ba8.pt")
    coap = _coap_state(end)
    projectors = [(pid, k) for pid, st in coap["state"].items() for k in st if k.startswith("proj")]
    assert len(projectors) >= 5  # the checkpoint carries the projectors of every projected layer
    assert "tucker2" in coap["param_groups"][0]["projection"]
    _assert_same(_coap_state(end), _coap_state(end_resumed), "state/optimizers/CoapAdamW")  # the precise message first
    _assert_same(end, end_resumed)

    # ... and the second half did train: weights and projectors moved after the checkpoint
    middle = _load(tmp_path / "full" / "ba4.pt")
    weights = [name for name, _ in full.state.model.named_parameters()]
    assert all(not torch.equal(end["state"]["model"][k], middle["state"]["model"][k]) for k in weights)
    before = _coap_state(middle)["state"]
    assert all(not torch.equal(coap["state"][pid][k], before[pid][k]) for pid, k in projectors)
