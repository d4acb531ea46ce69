"""The step's shape for accelerators: torch's foreach math, batched layers, no host syncs.

Counts of dispatched ops and syncs are properties of the code, not of the machine: they are
asserted here (timings never are)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from coap_plugins import CoapAdafactor, CoapAdamW, CoapAdamW8bit
from coap_plugins.profiling import DispatchCounter
from coap_plugins.projection import linalg

SHAPES = [(24,), (16, 12), (8, 6, 3, 3), (40, 24, 3, 3), (30,)]


def _params(shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _run(opt, params, steps, start=0):
    for i in range(start, start + steps):
        for p, g in zip(params, _grads(params, i)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("foreach", [True, False])
def test_full_rank_path_equals_torch_adamw_bit_for_bit(foreach):
    ours, ref = _params(), _params()
    opt = CoapAdamW(
        [{"params": ours, "projection": "none"}], lr=3e-2, weight_decay=0.1, betas=(0.8, 0.99), foreach=foreach
    )
    torch_opt = torch.optim.AdamW(ref, lr=3e-2, weight_decay=0.1, betas=(0.8, 0.99), foreach=foreach)
    _run(opt, ours, 6)
    _run(torch_opt, ref, 6)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    for a, b in zip(ours, ref):
        assert torch.equal(opt.state[a]["exp_avg_sq"], torch_opt.state[b]["exp_avg_sq"])


def test_tensor_lr_is_never_read_back_and_matches_the_float_lr():
    ours, ref = _params(), _params()
    lr = torch.tensor(2e-2)
    opt = CoapAdamW(ours, lr=lr, rank_ratio_matrix=2, rank_ratio_conv=4, min_conv_numel=100, update_interval=1000)
    same = CoapAdamW(ref, lr=2e-2, rank_ratio_matrix=2, rank_ratio_conv=4, min_conv_numel=100, update_interval=1000)
    _run(opt, ours, 2)
    _run(same, ref, 2)
    for p, g in zip(ours, _grads(ours, 2)):
        p.grad = g
    with DispatchCounter() as count:
        opt.step()
    assert count.syncs == 0
    _run(same, ref, 1, start=2)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _named(model):
    return list(model.named_parameters())


class _Twins(nn.Module):
    """Three convs of one shape, two of another, two linears of one shape: three batches."""

    def __init__(self):
        super().__init__()
        self.a = nn.ModuleList(nn.Conv2d(16, 16, 3, bias=False) for _ in range(3))
        self.b = nn.ModuleList(nn.Conv2d(16, 32, 3, bias=False) for _ in range(2))
        self.c = nn.ModuleList(nn.Linear(48, 40) for _ in range(2))


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("cls", [CoapAdamW, CoapAdafactor, CoapAdamW8bit])
def test_batched_layers_follow_the_same_trajectory_as_each_layer_alone(cls, batched):
    torch.manual_seed(0)
    model = _Twins()
    settings = dict(rank_ratio_conv=4, rank_ratio_matrix=4, min_conv_numel=100, update_interval=2, reproject_factor=2)
    lr = dict(lr=1e-2)
    together = cls(_named(model), **lr, **settings)
    together.batched_products = batched
    params = [p for p in model.parameters()]
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    alone = [cls([(name, q)], **lr, **settings) for (name, _), q in zip(model.named_parameters(), copies)]
    for step in range(6):  # set-up, correlation updates at 2 and 6, a recalibration at 4
        for p, q, g in zip(params, copies, _grads(params, step)):
            p.grad, q.grad = g, g.clone()
        together.step()
        for opt in alone:
            opt.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # batched: the stacked projectors are the layers' storage, views of one tensor per batch
    convs = [together.state[m.weight]["proj_out"] for m in model.a]
    assert len({t.untyped_storage().data_ptr() for t in convs}) == (1 if batched else 3)


def test_checkpoint_of_stacked_projectors_is_per_parameter_small_and_exact():
    torch.manual_seed(0)
    model = _Twins()
    settings = dict(rank_ratio_conv=4, min_conv_numel=100, update_interval=3, reproject_factor=2)
    opt = CoapAdamW(_named(model), lr=1e-2, **settings)
    opt.batched_products = True
    params = list(model.parameters())
    _run(opt, params, 4)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    # every state tensor once: the stacks are saved as the storage the per-layer views share
    assert buf.getbuffer().nbytes < opt.state_bytes() * 1.1 + 50_000
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    twin = _Twins()
    twin.load_state_dict(model.state_dict())
    resumed = CoapAdamW(_named(twin), lr=1e-2, **settings)
    resumed.batched_products = True
    resumed.load_state_dict(loaded)
    twin_params = list(twin.parameters())
    _run(opt, params, 5, start=4)
    _run(resumed, twin_params, 5, start=4)
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)


def _resnet18_params():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000, zero_init_last=False)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,))
    nn.functional.cross_entropy(model(x), y).backward()
    return list(model.parameters())


def _count(fn):
    with DispatchCounter() as count:
        fn()
    return count


def test_resnet18_ordinary_step_dispatches_at_most_250_ops_and_never_syncs():
    params = _resnet18_params()
    opt = CoapAdamW(params, lr=1e-3, rank_ratio_matrix=4, rank_ratio_conv=4, update_interval=10**9)
    opt.batched_products = True  # what runs on an accelerator
    setup = _count(opt.step)
    ordinary = _count(opt.step)
    opt.request_refresh("correlation")
    corr = _count(opt.step)
    opt.request_refresh("svd")
    svd = _count(opt.step)
    assert ordinary.ops <= 250 and ordinary.syncs == 0, (ordinary.ops, ordinary.by_op.most_common(8))
    assert corr.syncs == 0  # the correlation update decides everything on the device
    assert svd.syncs <= 2 and setup.syncs <= 2, (svd.syncs, setup.syncs)


def test_svd_fallbacks_of_many_layers_cost_one_sync_and_give_the_householder_result():
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(64, 32, generator=g) for _ in range(3)]
    hs[1] = torch.randn(64, 2, generator=g) @ torch.randn(2, 32, generator=g)  # rank 2 < r = 8: the fast path fails
    starts = [linalg.random_orthonormal(32, 8, seed=i) for i in range(3)]
    fallbacks = linalg.SvdFallbacks()
    with DispatchCounter() as count:
        outs = [linalg.recalibrate(None, h, h @ p, 8, fallbacks=fallbacks) for h, p in zip(hs, starts)]
        assert fallbacks.resolve() == 1
    assert count.syncs == 1  # bool(any fallback needed); the flags' copy to the host is no op on CPU
    for h, p, out in zip(hs, starts, outs):
        expected = linalg.low_cost_svd(h, h @ p, 8)[0]
        torch.testing.assert_close(out, expected)


def test_refresh_with_a_nonfinite_gradient_keeps_the_projector_without_reading_the_device():
    params = _params([(40, 24, 3, 3), (32, 48)])
    opt = CoapAdamW(params, lr=1e-2, rank_ratio_conv=4, rank_ratio_matrix=4, min_conv_numel=100, update_interval=1000)
    _run(opt, params, 2)
    before = {k: v.clone() for p in params for k, v in opt.state[p].items() if k.startswith("proj")}
    for p, grad in zip(params, _grads(params, 9)):
        p.grad = grad
    params[0].grad[0, 0, 0, 0] = float("nan")
    opt.request_refresh("svd")
    with DispatchCounter() as count:
        opt.step()
    assert count.syncs <= 1
    assert torch.equal(opt.state[params[0]]["proj_out"], before["proj_out"])
    assert not torch.equal(opt.state[params[1]]["proj"], before["proj"])
    assert opt.last_refresh(params[0])["refresh"] == "skipped (non-finite)"
    assert opt.last_refresh(params[1])["refresh"] == "svd"


def test_tensor_step_counts_give_the_int_step_results():
    from coap_plugins.optim._functional import adam_projected_updates

    shapes = [(12, 4), (6, 9, 3)]
    a = [[torch.zeros(s) for s in shapes] for _ in range(2)]
    b = [[torch.zeros(s) for s in shapes] for _ in range(2)]
    for step in range(1, 4):
        cores = [torch.randn(s) for s in shapes]
        x = adam_projected_updates(*a, cores, [step, step], lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8)
        steps = torch.full((2,), float(step))
        y = adam_projected_updates(*b, cores, steps, lr=torch.tensor(1e-2), beta1=0.9, beta2=0.99, eps=1e-8)
        for u, v in zip(x, y):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-9)  # fp32 bias corrections on the device


@pytest.mark.slow
def test_compiled_functional_core_is_one_graph_over_a_cosine_schedule():
    from torch._dynamo.utils import counters

    from coap_plugins.optim._functional import adam_projected_updates

    torch._dynamo.reset()
    counters.clear()
    shapes = [(64, 16), (32, 9, 16), (128, 32)]
    moments = [[torch.zeros(s) for s in shapes] for _ in range(2)]
    eager = [[torch.zeros(s) for s in shapes] for _ in range(2)]
    holder = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([holder], lr=torch.tensor(1e-3))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50)
    compiled = torch.compile(adam_projected_updates, fullgraph=True)
    steps = torch.zeros(len(shapes))
    for i in range(50):
        cores = [torch.randn(s) for s in shapes]
        steps += 1
        lr = opt.param_groups[0]["lr"]  # the scheduler writes the tensor in place
        got = compiled(*moments, cores, steps, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8)
        want = adam_projected_updates(*eager, cores, [i + 1] * 3, lr=float(lr), beta1=0.9, beta2=0.999, eps=1e-8)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-9)
        opt.step()
        sched.step()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_invalid_foreach_is_refused_with_its_value():
    with pytest.raises(ValueError, match=r"Invalid foreach: 'yes' \(expected True, False or None\)"):
        CoapAdamW(_params(), foreach="yes")


def test_invalid_batched_products_is_refused_before_any_work():
    params = _params()
    opt = CoapAdamW(params, rank_ratio_conv=4, min_conv_numel=100)
    opt.batched_products = "gpu"
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"Invalid batched_products: 'gpu' \(expected True, False or None\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and not opt.state
