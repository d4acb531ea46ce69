"""The behaviours torch's optimizer test-suite checks, run on the four COAP optimizers.

Built on PyTorch's own conformance machinery (``OptimizerInfo``/``OptimizerInput`` and the
``@optims`` parametrizer of ``torch.testing._internal.common_optimizers``, instantiated per device
type), with tests written here.  Every input makes both refresh kinds happen within the steps a
test takes (``update_interval=2, reproject_factor=2``: a correlation update at step 2, an SVD
recalibration at step 4) and routes the model's layers to all three treatments: a Tucker-2 3x3
conv, a Tucker-2 1x1 conv (output mode only), a matrix-projected linear layer, and full-rank
biases.

Where an upstream test's assumption does not hold for a low-rank optimizer, the test here says
why (for example, torch compares foreach/fused/differentiable implementations: COAP has one
implementation, so ``supported_impls`` is empty).
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn
from torch.testing._internal.common_device_type import instantiate_device_type_tests
from torch.testing._internal.common_optimizers import OptimizerInfo, OptimizerInput, optims
from torch.testing._internal.common_utils import TestCase

from coap_plugins import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit

pytest.importorskip("bitsandbytes")

# both refresh kinds within 4 steps; small convs projected too
_BASE = dict(update_interval=2, reproject_factor=2, min_conv_numel=0)
_STEPS = 6


def _adam_inputs(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs=dict(_BASE), desc="default"),
        OptimizerInput(params=None, kwargs=dict(_BASE, lr=1e-2, weight_decay=0.1), desc="weight decay"),
        OptimizerInput(params=None, kwargs=dict(_BASE, lr=torch.tensor(1e-2)), desc="tensor lr"),
        OptimizerInput(params=None, kwargs=dict(_BASE, betas=(0.8, 0.99), eps=1e-6), desc="betas and eps"),
        OptimizerInput(params=None, kwargs=dict(_BASE, restore_state=True), desc="restore_state"),
        OptimizerInput(params=None, kwargs=dict(_BASE, rank_ratio_matrix=2, rank_ratio_conv=2), desc="ratio 2"),
    ]


def _adafactor_inputs(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs=dict(_BASE), desc="relative step"),
        OptimizerInput(params=None, kwargs=dict(_BASE, lr=1e-2, weight_decay=0.1), desc="lr and weight decay"),
        OptimizerInput(params=None, kwargs=dict(_BASE, lr=torch.tensor(1e-2)), desc="tensor lr"),
        OptimizerInput(params=None, kwargs=dict(_BASE, lr=1e-2, beta1=None), desc="no first moment"),
        OptimizerInput(params=None, kwargs=dict(_BASE, lr=1e-2, scale_parameter=False), desc="no parameter scaling"),
        OptimizerInput(params=None, kwargs=dict(_BASE, restore_state=True), desc="restore_state"),
    ]


def _info(cls, inputs):
    # One implementation: no foreach/fused/differentiable variants to compare; no complex or
    # sparse parameters (refused with an error, tested below); one device per parameter is
    # all a projector needs, so mixed devices in one group are not claimed either.
    return OptimizerInfo(
        cls,
        optim_inputs_func=inputs,
        supported_impls=(),
        supports_complex=False,
        supports_sparse=False,
        supports_multiple_devices=False,
    )


coap_optim_db = [
    _info(CoapAdamW, _adam_inputs),
    _info(CoapAdamW8bit, _adam_inputs),
    _info(CoapAdafactor, _adafactor_inputs),
    _info(CoapAdafactor8bit, _adafactor_inputs),
]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)  # Tucker-2, both modes
        self.pointwise = nn.Conv2d(16, 32, 1)  # Tucker-2, output mode only
        self.fc = nn.Linear(32 * 4 * 4, 10)  # matrix projector
        # biases: full rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.pointwise(torch.relu(self.conv(x)))).flatten(1))


def _setup(device, dtype, seed: int = 0):
    torch.manual_seed(seed)
    net = _Net().to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(16, 8, 4, 4, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, 10, (16,), generator=gen).to(device)
    return net, x, y


def _loss(net, x, y):
    return nn.functional.cross_entropy(net(x).float(), y)


def _train(net, opt, x, y, steps, scheduler=None):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(net, x, y)
        loss.backward()
        opt.step()
        if scheduler is not None:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(loss)
            else:
                scheduler.step()
        losses.append(float(loss))
    return losses


def _kwargs(optim_input):
    return copy.deepcopy(optim_input.kwargs)


def _refresh_kinds(opt) -> set[str]:
    return {r["refresh"] for p in opt._telemetry if (r := opt.last_refresh(p))}


class TestCoapOptimizers(TestCase):
    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_both_refresh_kinds_and_all_routes_happen(self, device, dtype, optim_info):
        # the premise of every other test here
        net, x, y = _setup(device, dtype)
        opt = optim_info.optim_cls(net.named_parameters(), **_kwargs(optim_info.optim_inputs_func(device)[0]))
        kinds = {row["name"]: row["projector"].kind if row["projector"] else "none" for row in opt.routing()}
        self.assertEqual(
            kinds,
            {
                "conv.weight": "tucker2",
                "conv.bias": "none",
                "pointwise.weight": "tucker2",
                "pointwise.bias": "none",
                "fc.weight": "matrix",
                "fc.bias": "none",
            },
        )
        seen = set()
        for _ in range(4):
            _train(net, opt, x, y, 1)
            seen |= _refresh_kinds(opt)
        self.assertEqual(seen, {"correlation", "svd"})

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_forloop_goes_right_direction(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device):
            for make_sched in (
                None,
                lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.9),
                lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o),
            ):
                kwargs = _kwargs(optim_input)
                if make_sched is not None and kwargs.get("lr") is None:
                    continue  # Adafactor's relative step has no lr for a scheduler to set
                net, x, y = _setup(device, dtype)
                opt = optim_info.optim_cls(net.parameters(), **kwargs)
                sched = make_sched(opt) if make_sched else None
                losses = _train(net, opt, x, y, 12, sched)
                self.assertLess(losses[-1], losses[0], msg=optim_input.desc)

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_state_dict_deterministic(self, device, dtype, optim_info):
        """Load a state into a fresh optimizer: its state_dict is the loaded one, and both
        continue bit for bit the same (through refreshes of both kinds)."""
        for optim_input in optim_info.optim_inputs_func(device):
            net, x, y = _setup(device, dtype)
            opt = optim_info.optim_cls(net.parameters(), **_kwargs(optim_input))
            _train(net, opt, x, y, 3)
            twin = copy.deepcopy(net)
            twin_opt = optim_info.optim_cls(twin.parameters(), **_kwargs(optim_input))
            saved = copy.deepcopy(opt.state_dict())
            twin_opt.load_state_dict(saved)
            after = twin_opt.state_dict()
            self.assertEqual([sorted(g) for g in after["param_groups"]], [sorted(g) for g in saved["param_groups"]])
            self.assertEqual(after, saved)
            a = _train(net, opt, x, y, _STEPS)
            b = _train(twin, twin_opt, x, y, _STEPS)
            self.assertEqual(a, b, msg=optim_input.desc)
            for p, q in zip(net.parameters(), twin.parameters()):
                self.assertEqual(p, q, atol=0, rtol=0)

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_state_dict_survives_weights_only_torch_load(self, device, dtype, optim_info):
        net, x, y = _setup(device, dtype)
        opt = optim_info.optim_cls(net.parameters(), **_kwargs(optim_info.optim_inputs_func(device)[1]))
        _train(net, opt, x, y, 5)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        self.assertEqual(loaded, opt.state_dict())

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_deepcopy_pickle_and_save_of_the_optimizer_keep_stepping(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device)[:2]:
            net, x, y = _setup(device, dtype)
            opt = optim_info.optim_cls(net.parameters(), **_kwargs(optim_input))
            _train(net, opt, x, y, 3)
            expected_net, expected_opt = copy.deepcopy((net, opt))  # model and optimizer together
            ref = _train(net, opt, x, y, _STEPS)
            # the three ways a whole optimizer gets copied; each copy must continue like the original
            for how in ("deepcopy", "pickle", "torch.save"):
                pair = (expected_net, expected_opt)
                if how == "deepcopy":
                    net2, opt2 = copy.deepcopy(pair)
                elif how == "pickle":
                    net2, opt2 = pickle.loads(pickle.dumps(pair))
                else:
                    buf = io.BytesIO()
                    torch.save(pair, buf)
                    buf.seek(0)
                    net2, opt2 = torch.load(buf, weights_only=False)
                self.assertEqual(_train(net2, opt2, x, y, _STEPS), ref, msg=f"{how}, {optim_input.desc}")

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_step_is_noop_when_params_have_no_grad(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device):
            net, x, y = _setup(device, dtype)
            before = [p.detach().clone() for p in net.parameters()]
            opt = optim_info.optim_cls(net.parameters(), **_kwargs(optim_input))
            for _ in range(3):
                opt.step()
            for p, q in zip(net.parameters(), before):
                self.assertEqual(p, q, atol=0, rtol=0)
            self.assertEqual(len(opt.state), 0)

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_step_is_noop_for_zero_grads(self, device, dtype, optim_info):
        # as upstream: without weight decay a zero gradient moves nothing.  For a projected layer
        # it is not even a usable first gradient: its projector waits for one (telemetry says so).
        for optim_input in optim_info.optim_inputs_func(device):
            kwargs = dict(_kwargs(optim_input), weight_decay=0.0)
            net, x, y = _setup(device, dtype)
            before = [p.detach().clone() for p in net.parameters()]
            opt = optim_info.optim_cls(net.parameters(), **kwargs)
            for _ in range(3):
                for p in net.parameters():
                    p.grad = torch.zeros_like(p)
                opt.step()
            for p, q in zip(net.parameters(), before):
                self.assertEqual(p, q, atol=0, rtol=0)
            projected = [r for r in opt.routing() if r["projector"] is not None]
            self.assertGreaterEqual(len(projected), 2, msg=optim_input.desc)
            self.assertEqual(len(opt.waiting_parameters()), len(projected), msg=optim_input.desc)

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_param_groups_lr_and_weight_decay_are_per_group(self, device, dtype, optim_info):
        # a group with lr 0 moves nothing (weight decay is scaled by lr, as torch's AdamW does)
        net, x, y = _setup(device, dtype)
        frozen = list(net.fc.parameters())
        rest = [p for n, p in net.named_parameters() if not n.startswith("fc.")]
        kwargs = dict(_BASE, lr=1e-2)
        opt = optim_info.optim_cls(
            [{"params": rest, "lr": 1e-2}, {"params": frozen, "lr": 0.0, "weight_decay": 0.5}], **kwargs
        )
        before = [p.detach().clone() for p in frozen]
        losses = _train(net, opt, x, y, 8)
        self.assertLess(losses[-1], losses[0])
        for p, q in zip(frozen, before):
            self.assertEqual(p, q, atol=0, rtol=0)

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_param_group_independent(self, device, dtype, optim_info):
        """A parameter's trajectory does not depend on other param groups (timm checks this):
        the same layers alone, or after an unrelated group, end bit for bit the same."""
        net, x, y = _setup(device, dtype)
        alone = optim_info.optim_cls(net.parameters(), **_kwargs(optim_info.optim_inputs_func(device)[1]))
        _train(net, alone, x, y, _STEPS)
        other = nn.Linear(64, 48).to(device=device, dtype=dtype)
        net2, _, _ = _setup(device, dtype)
        groups = [{"params": list(other.parameters())}, {"params": list(net2.parameters())}]
        after = optim_info.optim_cls(groups, **_kwargs(optim_info.optim_inputs_func(device)[1]))
        for _ in range(_STEPS):
            after.zero_grad()
            _loss(net2, x, y).backward()
            other(torch.ones(2, 64, device=device, dtype=dtype)).square().sum().backward()
            after.step()
        for p, q in zip(net.parameters(), net2.parameters()):
            self.assertEqual(p, q, atol=0, rtol=0)

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_tensor_lr_matches_float_lr(self, device, dtype, optim_info):
        results = []
        for lr in (1e-2, torch.tensor(1e-2)):
            net, x, y = _setup(device, dtype)
            opt = optim_info.optim_cls(net.parameters(), lr=lr, weight_decay=0.1, **_BASE)
            results.append(_train(net, opt, x, y, _STEPS))
            if isinstance(lr, torch.Tensor):
                self.assertIs(opt.param_groups[0]["lr"], lr)
        self.assertEqual(results[0], results[1], atol=1e-5, rtol=1e-5)

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_tensor_lr_is_not_read_back_in_the_step(self, device, dtype, optim_info):
        net, x, y = _setup(device, dtype)
        lr = torch.tensor(1e-2)
        opt = optim_info.optim_cls(net.parameters(), lr=lr, weight_decay=0.1, **_BASE)
        _train(net, opt, x, y, 1)  # set-up
        calls = []
        real_item, real_float = torch.Tensor.item, torch.Tensor.__float__

        def item(t):
            if t is lr:
                calls.append("item")
            return real_item(t)

        def as_float(t):
            if t is lr:
                calls.append("float")
            return real_float(t)

        torch.Tensor.item, torch.Tensor.__float__ = item, as_float
        try:
            _train(net, opt, x, y, 4)
        finally:
            torch.Tensor.item, torch.Tensor.__float__ = real_item, real_float
        self.assertEqual(calls, [])

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_tensor_lr_errors_use_torch_wording(self, device, dtype, optim_info):
        net, _, _ = _setup(device, dtype)
        with self.assertRaisesRegex(ValueError, "^Tensor lr must be 1-element$"):
            optim_info.optim_cls(net.parameters(), lr=torch.tensor([1e-3, 1e-3]))
        with self.assertRaisesRegex(ValueError, "Invalid learning rate: -0.5"):
            optim_info.optim_cls(net.parameters(), lr=torch.tensor(-0.5))

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_non_finite_hyperparameters_are_refused(self, device, dtype, optim_info):
        net, _, _ = _setup(device, dtype)
        cls = optim_info.optim_cls
        cases = [
            ({"lr": math.nan}, "Invalid learning rate: nan"),
            ({"lr": math.inf}, "Invalid learning rate: inf"),
            ({"weight_decay": math.inf}, "Invalid weight_decay value: inf"),
            ({"rank_ratio_matrix": math.inf}, "Invalid rank_ratio_matrix: inf"),
        ]
        if issubclass(cls, CoapAdamW):
            cases.append(({"eps": math.nan}, "Invalid epsilon value: nan"))
        for kwargs, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                cls(net.parameters(), **kwargs)

    @optims(coap_optim_db, dtypes=[torch.float32, torch.float64, torch.bfloat16, torch.float16])
    def test_every_floating_dtype_steps(self, device, dtype, optim_info):
        for optim_input in optim_info.optim_inputs_func(device):
            net, x, y = _setup(device, dtype)
            before = [p.detach().clone() for p in net.parameters()]
            opt = optim_info.optim_cls(net.parameters(), **_kwargs(optim_input))
            seen = set()
            for _ in range(5):
                _train(net, opt, x, y, 1)
                seen |= _refresh_kinds(opt)
            self.assertEqual(seen, {"correlation", "svd"}, msg=optim_input.desc)
            for p, q in zip(net.parameters(), before):
                self.assertEqual(p.dtype, dtype)
                self.assertTrue(bool(torch.isfinite(p).all()), msg=optim_input.desc)
                self.assertFalse(torch.equal(p, q), msg=optim_input.desc)
            for st in opt.state.values():
                for key in ("proj", "proj_out", "proj_in"):
                    if key in st:
                        self.assertEqual(st[key].dtype, torch.float32)

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_complex_and_sparse_are_refused(self, device, dtype, optim_info):
        w = torch.zeros(8, 8, dtype=torch.complex64, requires_grad=True)
        opt = optim_info.optim_cls([w])
        w.grad = torch.ones_like(w)
        with self.assertRaisesRegex(RuntimeError, "does not support complex parameters"):
            opt.step()
        e = nn.Embedding(10, 4, sparse=True)
        opt = optim_info.optim_cls(e.parameters())
        e(torch.tensor([1, 2])).sum().backward()
        with self.assertRaisesRegex(RuntimeError, "does not support sparse gradients"):
            opt.step()

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_step_and_state_dict_hooks_run(self, device, dtype, optim_info):
        net, x, y = _setup(device, dtype)
        opt = optim_info.optim_cls(net.parameters(), **_BASE)
        calls = []
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
        opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post"))
        opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre"))
        opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
        _train(net, opt, x, y, 1)
        opt.load_state_dict(opt.state_dict())
        self.assertEqual(calls, ["pre", "post", "sd-pre", "sd-post", "load-pre", "load-post"])

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_closure_is_called_and_its_loss_returned(self, device, dtype, optim_info):
        net, x, y = _setup(device, dtype)
        opt = optim_info.optim_cls(net.parameters(), **_BASE)

        def closure():
            opt.zero_grad()
            loss = _loss(net, x, y)
            loss.backward()
            return loss

        first = float(opt.step(closure))
        for _ in range(8):
            last = float(opt.step(closure))
        self.assertLess(last, first)

    @optims(coap_optim_db, dtypes=[torch.float32])
    def test_add_param_group_after_steps(self, device, dtype, optim_info):
        net, x, y = _setup(device, dtype)
        head = list(net.fc.parameters())
        opt = optim_info.optim_cls([p for n, p in net.named_parameters() if not n.startswith("fc.")], **_BASE)
        _train(net, opt, x, y, 2)
        opt.add_param_group({"params": head})
        self.assertEqual(opt.param_groups[1]["update_interval"], 2)
        before = head[0].detach().clone()
        _train(net, opt, x, y, 4)
        self.assertFalse(torch.equal(head[0], before))
        self.assertIsNotNone(opt.routing()[-2]["projector"])  # fc.weight: matrix


instantiate_device_type_tests(TestCoapOptimizers, globals(), only_for="cpu")
