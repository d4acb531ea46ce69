"""The step inside backward (coap_plugins.optim.StepInBackward): the same results as the normal
mode (bit for bit where the arithmetic is the same, to float tolerance where micro-batches are
accumulated in the projected space), gradients freed, the checkpoint format shared by both modes,
DDP on two CPU processes, and what is refused."""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import launch_env
from torch import nn

from coap_plugins.optim import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit, StepInBackward

FORMS = (CoapAdamW, CoapAdafactor, CoapAdamW8bit, CoapAdafactor8bit)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def build(model: nn.Module, cls=CoapAdamW, **kw) -> torch.optim.Optimizer:
    settings = dict(
        lr=1e-2, rank_ratio_matrix=4, rank_ratio_conv=2, min_conv_numel=0, update_interval=3, reproject_factor=2
    )
    return cls(model.parameters(), **{**settings, **kw})


def micro_batches(gen: torch.Generator, accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(accum)]


def one_step(model, opt, batches, hooks=None, mark_last=True) -> None:
    for k, (x, y) in enumerate(batches):
        last = k == len(batches) - 1 and mark_last
        with contextlib.nullcontext() if hooks is None or last else hooks.no_step():
            (nn.functional.cross_entropy(model(x), y) / len(batches)).backward()
    opt.step()
    opt.zero_grad()


def train(cls, backward: bool, accum: int, steps: int = 12, mark_last: bool = True, **kw):
    model = net()
    opt = build(model, cls, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    hooks = StepInBackward(opt) if backward else None
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        one_step(model, opt, micro_batches(gen, accum), hooks, mark_last)
        sched.step()
    return model, opt


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("cls", FORMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("accum", [1, 4])
def test_bit_identical_to_the_normal_mode(cls, accum):
    """residual="scaled" (the default) keeps whole gradients, so the arithmetic is the normal
    mode's, parameter by parameter: bit-equal weights and state after 12 steps through
    correlation updates and recalibrations, with an LR scheduler."""
    a, oa = train(cls, False, accum)
    b, ob = train(cls, True, accum)
    assert_same(a, b)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, st in sa["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][i][k])), (i, k)


@pytest.mark.parametrize("cls", FORMS, ids=lambda c: c.__name__)
def test_residual_none_without_accumulation_is_bit_identical(cls):
    a, _ = train(cls, False, 1, residual="none")
    b, _ = train(cls, True, 1, residual="none")
    assert_same(a, b)


def test_full_accumulation_is_bit_identical_with_residual_none():
    """accumulate="full": the micro-batches before the last keep .grad, as the normal mode."""
    a, _ = train(CoapAdamW, False, 4, residual="none")
    model = net()
    opt = build(model, residual="none")
    hooks = StepInBackward(opt, accumulate="full")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        one_step(model, opt, micro_batches(gen, 4), hooks)
        sched.step()
        assert not opt._accumulated
    assert_same(a, model)


def test_an_unmarked_last_micro_batch_steps_in_step():
    """Every micro-batch under no_step (e.g. the shorter last window of an epoch): optimizer.step()
    steps what was accumulated; the same weights as the normal mode."""
    a, _ = train(CoapAdamW, False, 3, steps=6)
    b, _ = train(CoapAdamW, True, 3, steps=6, mark_last=False)
    assert_same(a, b)


@pytest.mark.parametrize("cls", FORMS, ids=lambda c: c.__name__)
def test_projected_accumulation_equals_the_normal_step(cls):
    """residual="none", 4 micro-batches: the ordinary steps accumulate G P.  Each step starts both
    modes from the same weights and state (the normal run's), and the backward mode's update
    agrees with the normal one to 1e-5 of the update's size on every step (float rounding of a
    sum taken in another order: measured 1.3e-6 CoapAdamW, 4.1e-6 CoapAdafactor, 4.5e-6
    CoapAdafactor8bit; CoapAdamW8bit 4.0e-5, a quantization code can move by one: 1e-3 for the
    8-bit forms); refresh steps, which keep the whole gradient, agree bit for bit."""
    model = net()
    opt = build(model, cls, residual="none")
    gen = torch.Generator().manual_seed(3)
    tol = 1e-3 if "8bit" in cls.__name__ else 1e-5
    refresh_steps = {3, 6, 9}
    for step in range(1, 11):
        batches = micro_batches(gen, 4)
        twin = copy.deepcopy(model)
        twin_opt = build(twin, cls, residual="none")
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch loads without copying
        hooks = StepInBackward(twin_opt)
        before = [p.detach().clone() for p in model.parameters()]
        one_step(model, opt, batches)
        one_step(twin, twin_opt, batches, hooks)
        for p0, p, q in zip(before, model.parameters(), twin.parameters()):
            update = (p - p0).norm()
            if step == 1 or step in refresh_steps:
                assert torch.equal(p, q), step
            else:
                assert (p - q).norm() <= tol * update, (step, float((p - q).norm() / update))


def test_gradients_are_freed_and_accumulated_in_the_projected_space():
    model = net()
    opt = build(model, residual="none")
    hooks = StepInBackward(opt)
    gen = torch.Generator().manual_seed(0)
    one_step(model, opt, micro_batches(gen, 1), hooks)  # sets the projectors up
    assert all(p.grad is None for p in model.parameters())
    (x, y), _ = micro_batches(gen, 2)
    with hooks.no_step():
        nn.functional.cross_entropy(model(x), y).backward()
    routes = {row["index"]: row["projector"] for row in opt.routing()}
    for i, p in enumerate(model.parameters()):
        if routes[i] is None:  # full rank: the whole gradient accumulates as usual
            assert p.grad is not None and i not in [id(q) for q in opt._accumulated]
        else:
            assert p.grad is None
            assert tuple(opt._accumulated[p].shape) == tuple(routes[i].moment_shape)
    held = sum(t.numel() for t in opt._accumulated.values())
    whole = sum(p.numel() for i, p in enumerate(model.parameters()) if routes[i] is not None)
    assert held < whole / 2
    opt.zero_grad()  # drops the accumulated cores with the gradients
    assert not opt._accumulated


def test_a_refresh_due_keeps_the_whole_gradient():
    """Step 3 is a correlation update (update_interval=3): its micro-batches keep .grad."""
    model = net()
    opt = build(model, residual="none")
    hooks = StepInBackward(opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        one_step(model, opt, micro_batches(gen, 1), hooks)
    (x, y), _ = micro_batches(gen, 2)
    with hooks.no_step():
        nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters()) and not opt._accumulated


def test_a_refresh_requested_after_projected_accumulation_is_refused():
    model = net()
    opt = build(model, residual="none")
    opt.drive_refreshes_externally()
    hooks = StepInBackward(opt)
    gen = torch.Generator().manual_seed(0)
    one_step(model, opt, micro_batches(gen, 1), hooks)
    (x, y), _ = micro_batches(gen, 2)
    with hooks.no_step():
        nn.functional.cross_entropy(model(x), y).backward()
    opt.request_refresh("correlation")
    with pytest.raises(RuntimeError, match="call request_refresh before the step's first backward"):
        opt.step()


@pytest.mark.parametrize("first", ["normal", "backward"])
def test_a_checkpoint_resumes_in_the_other_mode(first):
    """6 steps with 2 micro-batches in one mode, the state dict saved and loaded into a new
    optimizer in the other mode, 6 more: bit-equal to 12 steps in one mode."""
    gen = torch.Generator().manual_seed(5)
    batches = [micro_batches(gen, 2) for _ in range(12)]
    ref = net()
    ref_opt = build(ref)
    for k, b in enumerate(batches):
        if k == 3:  # a changed lr, which the resumed optimizer takes from the checkpoint
            ref_opt.param_groups[0]["lr"] = 4e-3
        one_step(ref, ref_opt, b)
    model = net()
    opt = build(model)
    hooks = StepInBackward(opt) if first == "backward" else None
    for k, b in enumerate(batches[:6]):
        if k == 3:
            opt.param_groups[0]["lr"] = 4e-3
        one_step(model, opt, b, hooks)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    resumed = net()
    resumed.load_state_dict(saved[0])
    opt2 = build(resumed)
    # hooked before the load, which replaces the param groups (lr, schedule, pending refresh)
    hooks2 = StepInBackward(opt2) if first == "normal" else None
    opt2.load_state_dict(saved[1])
    for b in batches[6:]:
        one_step(resumed, opt2, b, hooks2)
    assert_same(ref, resumed)


def test_remove_returns_to_the_normal_mode():
    model = net()
    opt = build(model)
    hooks = StepInBackward(opt)
    hooks.remove()
    x, y = micro_batches(torch.Generator().manual_seed(0), 1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    StepInBackward(opt).remove()  # attachable again once removed


def test_refusals():
    model = net()
    with pytest.raises(TypeError, match="needs a COAP optimizer.*got AdamW"):
        StepInBackward(torch.optim.AdamW(model.parameters()))
    opt = build(model)
    with pytest.raises(ValueError, match=r"Invalid reduce: 'half' \(expected one of 'projected', 'full'\)"):
        StepInBackward(opt, reduce="half")
    with pytest.raises(ValueError, match=r"Invalid accumulate: 'some' \(expected one of 'projected', 'full'\)"):
        StepInBackward(opt, accumulate="some")
    StepInBackward(opt)
    with pytest.raises(RuntimeError, match="already steps inside backward"):
        StepInBackward(opt)
    with pytest.raises(TypeError, match="ddp must be a DistributedDataParallel module, got Sequential"):
        StepInBackward(build(model), ddp=model)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("backward_ddp")
    script = Path(__file__).parent / "scripts" / "backward_ddp.py"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, str(script), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=launch_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _ddp(out: Path, name: str, rank: int) -> dict:
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["CoapAdamW", "CoapAdafactor"])
@pytest.mark.parametrize("residual", ["none", "scaled"])
@pytest.mark.parametrize("accum", [1, 4])
def test_ddp_ranks_identical_and_equal_to_the_normal_mode(ddp_runs, optimizer, residual, accum):
    """Two gloo processes, 7 steps (correlation updates at 3 and 6, a recalibration at 6), the
    micro-batches before the last under no_sync.  Every mode's ranks end bit-identical with their
    gradients freed.  reduce="full" averages each bucket as DDP does, then steps it: bit-equal to
    the normal mode.  reduce="projected" averages ``G P`` where a layer needs only that: with
    residual="scaled" every layer needs its whole gradient, so the same as "full"; with
    residual="none" the weights agree with the normal mode to 1e-5 up to step 5 (the sums of the
    projections are rounded in another order; the recalibration at step 6 of this model has
    rank-deficient layers whose basis completion follows rounding, as under FSDP2)."""
    base = f"{optimizer}_{residual}_acc{accum}"
    normal = _ddp(ddp_runs, base + "_normal", 0)
    for mode in ("normal", "full", "projected", "unmarked"):
        r0, r1 = _ddp(ddp_runs, f"{base}_{mode}", 0), _ddp(ddp_runs, f"{base}_{mode}", 1)
        for a, b in zip(r0["params"], r1["params"]):
            assert torch.equal(a, b), mode
        assert r0["grads_freed"]
    full = _ddp(ddp_runs, base + "_full", 0)
    for a, b in zip(full["params"], normal["params"]):
        assert torch.equal(a, b)
    # no pass marked as the last (an adapter that could not count the batch): step() steps, and
    # the cores accumulated under no_sync are averaged there
    unmarked = _ddp(ddp_runs, base + "_unmarked", 0)
    for step in range(5 if residual == "none" else 7):
        for a, b in zip(unmarked["history"][step], normal["history"][step]):
            assert (a - b).abs().max() < 1e-5 if residual == "none" else torch.equal(a, b), step
    projected = _ddp(ddp_runs, base + "_projected", 0)
    if residual == "scaled":
        for a, b in zip(projected["params"], normal["params"]):
            assert torch.equal(a, b)
        assert projected["reduced"][0] == projected["reduced"][1]
    else:
        for step in range(5):
            for a, b in zip(projected["history"][step], normal["history"][step]):
                assert (a - b).abs().max() < 1e-5, step
        sent, whole = projected["reduced"]
        assert sent < 0.3 * whole  # measured 35394 of 136874 elements on an ordinary step


def test_the_step_ignores_the_callers_autocast():
    """backward() called inside a bf16 autocast region: the update is the fp32 one the normal
    mode takes after the same backward pass."""
    a, b = net(), net()
    oa, ob = build(a), build(b)
    StepInBackward(ob)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = micro_batches(gen, 1)[0]
        loss = nn.functional.cross_entropy(a(x), y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss.backward()  # the normal mode steps outside it
        oa.step()
        oa.zero_grad()
        loss = nn.functional.cross_entropy(b(x), y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss.backward()  # the hooks step inside this region
        ob.step()
        ob.zero_grad()
    assert_same(a, b)


def test_a_compiled_model_steps_in_backward_as_the_normal_mode():
    """torch.compile'd forward (AOT autograd, backend aot_eager): the leaf gradients still
    accumulate eagerly, so the hooks fire; 5 steps of 2 micro-batches, bit-equal."""

    def fit(backward: bool) -> nn.Module:
        model = net()
        opt = build(model)
        hooks = StepInBackward(opt) if backward else None
        compiled = torch.compile(model, backend="aot_eager")
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            one_step(compiled, opt, micro_batches(gen, 2), hooks)
        return model

    b = fit(True)
    assert all(p.grad is None for p in b.parameters())
    assert_same(fit(False), b)


def test_a_second_backward_pass_before_step_is_refused():
    model = net()
    opt = build(model)
    StepInBackward(opt)
    x, y = micro_batches(torch.Generator().manual_seed(0), 1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="stepped by an earlier backward pass of this step"):
        nn.functional.cross_entropy(model(x), y).backward()
