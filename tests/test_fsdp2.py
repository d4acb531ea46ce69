"""COAP optimizers on parameters that FSDP2's ``fully_shard`` has sharded (DTensor, Shard(0)):
the same math as unsharded, state per rank, distributed checkpoints (same world size and
resharding 2 <-> 1), refusals.  Two CPU processes with gloo (tests/scripts/fsdp2_optim.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import launch_env

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_optim.py"
COAP = ("CoapAdamW", "CoapAdafactor", "CoapAdamW8bit")


def launch(out: Path, nproc: int | None, *args: str, script: str = "fsdp2_optim.py") -> None:
    """The script in one plain process (``nproc=None``) or under torch.distributed.run."""
    out.mkdir(parents=True, exist_ok=True)
    env = launch_env()
    head = [sys.executable]
    if nproc is not None:
        head += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    path = SCRIPT.parent / script
    proc = subprocess.run([*head, str(path), str(out), *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def result(out: Path, name: str, rank: int = 0) -> dict:
    return torch.load(out / f"{name}_rank{rank}.pt", weights_only=False)


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """20 steps (correlation updates every 2, a recalibration every 6) plain and on 2 ranks."""
    base = tmp_path_factory.mktemp("fsdp2")
    names = ",".join(COAP)
    launch(base / "plain", None, "--optimizers", names)
    launch(base / "sharded", 2, "--optimizers", names, "--twin")
    return base


@pytest.mark.slow
@pytest.mark.parametrize("name", COAP)
def test_sharded_step_is_the_unsharded_step(runs, name):
    """Every step against an unsharded twin given the same whole parameters, gradients and state.

    Ordinary and correlation steps: the updates agree to 5e-5 relative (measured: CoapAdamW about
    1e-6, CoapAdafactor up to 1e-5, whose RMS and factored statistics are sums over ranks; an
    update is about 1e-3 of its weight, so the weights agree to 1e-7 after every step).  The
    set-up: the gradient the first projectors capture (``G P P^T``, per mode for Tucker-2) agrees
    to 1e-5.  Recalibrations: to 5e-2 (measured up to 1.1e-2): on this model every one has layers
    whose ``G P_prev`` is rank-deficient (condition 1e8-1e10), and the Householder form completes
    their bases with directions the gradient does not determine, differently for other rounding.
    Their updates are not compared: with ``basis_alignment="none"`` a new column's sign is the
    decomposition's convention, and the moments stay in the old coordinates (the paper's rule)."""
    twin = result(runs / "sharded", name)["twin"]
    assert len(twin) == 20
    # the schedule: a correlation update every 2 steps, every third of them a recalibration
    assert twin[1]["refreshes"] == ["correlation"] and twin[5]["refreshes"] == ["svd"]
    new_basis = {1, 6, 12, 18}
    steady = [t["update"] for step, t in enumerate(twin, start=1) if step not in new_basis]
    assert len(steady) == 16 and max(steady) < 5e-5
    assert twin[0]["captured"] < 1e-5 and twin[0]["fallbacks"] == 0
    recalibrated = [twin[step - 1] for step in (6, 12, 18)]
    assert all(t["fallbacks"] > 0 for t in recalibrated)  # the rank-deficient layers named above
    assert max(t["captured"] for t in recalibrated) < 5e-2


@pytest.mark.slow
@pytest.mark.parametrize("name", COAP)
def test_replicated_state_is_identical_on_every_rank_and_sharded_state_splits(runs, name):
    r0, r1 = result(runs / "sharded", name, 0), result(runs / "sharded", name, 1)
    plain = result(runs / "plain", name)
    assert r0["replicated"].keys() == r1["replicated"].keys() and r0["replicated"]
    for k in r0["replicated"]:
        assert torch.equal(r0["replicated"][k], r1["replicated"][k]), k
    # the whole state has the unsharded shapes; the sharded part is split, the replicated part is not
    assert {k: tuple(v.shape) for k, v in r0["state"].items() if isinstance(v, torch.Tensor)} == {
        k: tuple(v.shape) for k, v in plain["state"].items() if isinstance(v, torch.Tensor)
    }
    sharded0 = r0["state_bytes"] - r0["replicated_bytes"]
    sharded1 = r1["state_bytes"] - r1["replicated_bytes"]
    assert r0["replicated_bytes"] == r1["replicated_bytes"]
    assert sharded0 + sharded1 + r0["replicated_bytes"] == plain["state_bytes"]
    assert abs(sharded0 - sharded1) <= 0.02 * sharded0  # 127 rows split 64/63


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("dcp")
    names = ",".join(COAP)
    ck2, ck1, full = base / "ck2", base / "ck1", base / "full"
    launch(base / "a", 2, "--optimizers", names, "--steps", "14", "--save-at", "10", str(ck2), "--snapshot", "11")
    launch(base / "b", 2, "--optimizers", names, "--steps", "14", "--from-step", "10", "--load", str(ck2))
    launch(base / "c", 1, "--optimizers", names, "--steps", "11", "--from-step", "10", "--load", str(ck2))
    launch(base / "d", 1, "--optimizers", names, "--steps", "11", "--save-at", "10", str(ck1), "--snapshot", "11")
    launch(base / "e", 2, "--optimizers", names, "--steps", "11", "--from-step", "10", "--load", str(ck1))
    launch(base / "f", 2, "--optimizers", names, "--steps", "14", "--save-at", "10", str(full), "--full")
    launch(base / "g", 2, "--optimizers", names, "--steps", "14", "--from-step", "10", "--load", str(full), "--full")
    return base


@pytest.mark.slow
@pytest.mark.parametrize("name", COAP)
def test_distributed_checkpoint_resumes_bit_exactly(checkpoints, name):
    """Sharded (torch.distributed.checkpoint) and full state dicts, saved after step 10 of 14
    (a recalibration at 12 on the way): the resumed run ends where the uninterrupted one does."""
    for run, resumed in (("a", "b"), ("f", "g")):
        a, b = result(checkpoints / run, name), result(checkpoints / resumed, name)
        assert equal(a["at_save"][0], b["at_load"][0]) and equal(a["at_save"][1], b["at_load"][1])
        assert equal(a["params"], b["params"]) and equal(a["state"], b["state"]), run


@pytest.mark.slow
@pytest.mark.parametrize("name", COAP)
def test_distributed_checkpoint_reshards_between_two_ranks_and_one(checkpoints, name):
    """A 2-rank checkpoint loads into 1 rank and a 1-rank one into 2, every tensor as saved; the
    next step then agrees with the run that saved it to 1e-5 of the step's update."""
    for saver, loader in (("a", "c"), ("d", "e")):
        a, c = result(checkpoints / saver, name), result(checkpoints / loader, name)
        assert c["world"] != a["world"]
        assert equal(a["at_save"][0], c["at_load"][0]) and equal(a["at_save"][1], c["at_load"][1]), saver
        before, after = a["at_save"][0], a["snapshot"]
        for k in before:
            step = (after[k] - before[k]).norm()
            assert float((c["params"][k] - after[k]).norm() / step) < 1e-5, (saver, k)


@pytest.mark.slow
def test_plain_whole_state_dict_loads_into_a_sharded_optimizer(tmp_path):
    """``load_state_dict`` of whole tensors (an unsharded run's ``torch.save``) on 2 ranks: each
    takes its rows of every sharded tensor by that tensor's own split, and the next two steps
    (an ordinary one and a recalibration) equal the original optimizer's bit for bit."""
    import json

    launch(tmp_path, 2, script="fsdp2_whole_load.py")
    assert json.loads((tmp_path / "whole_load.json").read_text()) == dict.fromkeys(COAP, True)


# -- refusals (one process, a 1-rank gloo group) --------------------------------------------
@pytest.fixture(scope="module")
def one_rank_group():
    import torch.distributed as dist

    if dist.is_initialized():  # an earlier test's group: use it as it is
        yield
        return
    # a store in this process: no rendezvous, no environment variables left behind
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_other_placements_are_refused_naming_the_supported_one(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from coap_plugins import CoapAdamW

    mesh = init_device_mesh("cpu", (1,))
    for placement in (Replicate(), Shard(1)):
        p = torch.nn.Parameter(distribute_tensor(torch.randn(32, 16), mesh, [placement]))
        with pytest.raises(ValueError, match=r"CoapAdamW supports DTensor parameters sharded on their first dimension"):
            CoapAdamW([p])


def test_sharded_parameter_on_one_rank_steps_like_a_plain_one(one_rank_group):
    """A 1-rank FSDP2 model: the same numbers as the plain model, and its state as DTensors where
    sharded (so distributed checkpoints reshard it: every moment) and plain tensors where
    replicated (the projector of a tall weight)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from coap_plugins import CoapAdamW

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    sharded = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    sharded.load_state_dict(plain.state_dict())
    fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
    opts = [
        CoapAdamW(list(m.named_parameters()), lr=1e-2, rank=4, update_interval=2, reproject_factor=2)
        for m in (plain, sharded)
    ]
    for step in range(5):
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(step))
        for model, opt in zip((plain, sharded), opts):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for (k, a), b in zip(plain.named_parameters(), sharded.parameters()):
        assert float((a - b.full_tensor()).norm() / a.norm()) < 1e-5, k
    state = opts[1].state[sharded[0].weight]  # 64 x 16, tall: moments sharded, projector replicated
    assert isinstance(state["exp_avg"], DTensor) and not isinstance(state["proj"], DTensor)
    state = opts[1].state[sharded[2].weight]  # 8 x 64, wide: projector sharded (rows), moments sharded along n
    assert isinstance(state["proj"], DTensor) and isinstance(state["exp_avg"], DTensor)
    assert tuple(state["exp_avg"].shape) == (64, 4) and tuple(state["proj"].shape) == (8, 4)
