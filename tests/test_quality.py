"""Real-task quality: COAP at rank ratio 4 trains a small CNN on the 8x8 digits about as well as
its full-rank counterpart, while actually projecting, refreshing and saving state.

Each training run (cosine learning-rate decay, fixed seeds) takes a few seconds on one CPU
thread; the runs are shared by the tests through module-scoped fixtures.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("sklearn")

from _helpers import optimizer_state_bytes, train_classifier  # noqa: E402  (tests/ helper)

from coap_plugins import (  # noqa: E402
    CoapAdafactor,
    CoapAdafactor8bit,
    CoapAdamW,
    CoapAdamW8bit,
    CoapPolicy,
    demo,  # noqa: E402
)
from coap_plugins.examples import SmallCNN, SmallResNet, load_digits_tensors  # noqa: E402

SEED = 0
SIZE = 16
EPOCHS = 8
BATCH = 64
ADAMW_LR = 3e-3
ADAFACTOR_LR = 3e-2
# Small enough that correlation updates (every 8 steps) and SVD recalibrations (every 40)
# both happen several times in the 8 * 22 = 176 steps of a run.
UPDATE_INTERVAL = 8
MAX_GAP = 1.5  # accuracy points
SANE_ACCURACY = 90.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are too small to gain from intra-op threads; one thread keeps the runs
    fast and steady on a busy machine (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def fresh_model() -> SmallCNN:
    torch.manual_seed(SEED)
    return SmallCNN()


def coap_policy() -> CoapPolicy:
    # min_conv_numel=0: every conv, the 32x1x3x3 stem included, gets a Tucker-2 projector.
    return CoapPolicy(rank_ratio_matrix=4, rank_ratio_conv=4, min_conv_numel=0, exclude=["fc"])


class RefreshLog:
    """Records every refresh each projected layer reports, through a step post-hook."""

    def __init__(self, opt):
        self.seen: dict[str, set[tuple[str, int]]] = {}
        opt.register_step_post_hook(self)

    def __call__(self, opt, args, kwargs) -> None:
        for layer in opt.coap_report()["layers"]:
            if "last_refresh" in layer:
                self.seen.setdefault(layer["name"], set()).add((layer["last_refresh"], layer["last_refresh_step"]))

    def kinds(self, name: str) -> set[str]:
        return {kind for kind, _ in self.seen.get(name, set())}


def train(opt_factory):
    model = fresh_model()
    opt = opt_factory(model)
    log = RefreshLog(opt) if isinstance(opt, (CoapAdamW, CoapAdafactor)) else None  # 8-bit forms included
    return opt, log, model


@pytest.fixture(scope="module")
def adamw_runs(digits):
    out = {}
    factories = {
        "full": lambda m: torch.optim.AdamW(m.parameters(), lr=ADAMW_LR),
        "coap": lambda m: CoapAdamW(coap_policy().param_groups(m), lr=ADAMW_LR, update_interval=UPDATE_INTERVAL),
        "coap8": lambda m: CoapAdamW8bit(coap_policy().param_groups(m), lr=ADAMW_LR, update_interval=UPDATE_INTERVAL),
    }
    for key, factory in factories.items():
        opt, log, model = train(factory)
        result = train_classifier(model, opt, digits, EPOCHS, BATCH, SEED, lr_schedule="cosine")
        out[key] = {"opt": opt, "log": log, "result": result}
    return out


@pytest.fixture(scope="module")
def adafactor_runs(digits):
    out = {}
    common = dict(lr=ADAFACTOR_LR, relative_step=False, update_interval=UPDATE_INTERVAL)
    factories = {
        "full": lambda m: CoapAdafactor([{"params": list(m.parameters()), "projection": "none"}], **common),
        "coap": lambda m: CoapAdafactor(coap_policy().param_groups(m), **common),
        "coap8": lambda m: CoapAdafactor8bit(coap_policy().param_groups(m), **common),
    }
    for key, factory in factories.items():
        opt, log, model = train(factory)
        result = train_classifier(model, opt, digits, EPOCHS, BATCH, SEED, lr_schedule="cosine")
        out[key] = {"opt": opt, "log": log, "result": result}
    return out


RUNS = ["adamw_runs", "adafactor_runs"]


# -- the data and the models ------------------------------------------------------------------
def test_digits_split_is_deterministic_stratified_and_normalized(digits):
    x_train, y_train, x_test, y_test = digits
    assert x_train.shape == (1347, 1, SIZE, SIZE) and x_test.shape == (450, 1, SIZE, SIZE)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-4
    # stratified: every class holds about a quarter of its images out
    train_counts = torch.bincount(y_train, minlength=10).float()
    test_counts = torch.bincount(y_test, minlength=10).float()
    share = test_counts / (train_counts + test_counts)
    assert torch.all((share - 0.25).abs() < 0.01), share
    again = load_digits_tensors(size=SIZE, seed=SEED)
    assert all(torch.equal(a, b) for a, b in zip(digits, again))
    other = load_digits_tensors(size=SIZE, seed=SEED + 1)
    assert not torch.equal(other.y_test, y_test)
    small = load_digits_tensors(size=8, seed=SEED)
    assert small.x_train.shape[-2:] == (8, 8) and torch.equal(small.y_train, y_train)


def test_load_digits_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        load_digits_tensors(size=4)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_tensors(test_fraction=1.0)


def test_small_resnet_convs_are_projected_by_the_default_policy():
    model = SmallResNet()
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    routes = {r.name: r.kind for r in CoapPolicy(exclude=["fc"]).route(model)}
    tucker = [n for n, k in routes.items() if k == "tucker2"]
    assert len(tucker) == 4 and all(".conv" in n for n in tucker)
    assert routes["fc.weight"] == "none"


# -- quality ------------------------------------------------------------------------------------
@pytest.mark.parametrize("runs", RUNS)
def test_full_rank_baselines_are_sane(runs, request):
    res = request.getfixturevalue(runs)["full"]["result"]
    assert res["test_accuracy"] > SANE_ACCURACY, res
    assert res["nonfinite_steps"] == 0
    assert res["train_loss"][-1] < 0.5 * res["train_loss"][0], res["train_loss"]


@pytest.mark.parametrize("runs", RUNS)
def test_coap_accuracy_is_within_gap_of_full_rank(runs, request):
    pair = request.getfixturevalue(runs)
    full, coap = pair["full"]["result"], pair["coap"]["result"]
    assert coap["nonfinite_steps"] == 0
    assert coap["test_accuracy"] > SANE_ACCURACY, coap
    assert coap["test_accuracy"] >= full["test_accuracy"] - MAX_GAP, (
        f"COAP {coap['test_accuracy']:.2f}% vs full rank {full['test_accuracy']:.2f}%"
    )
    assert coap["train_loss"][-1] < 0.5 * coap["train_loss"][0], coap["train_loss"]


@pytest.mark.parametrize("runs", RUNS)
def test_eight_bit_accuracy_is_within_gap_of_its_32bit_form(runs, request):
    pair = request.getfixturevalue(runs)
    coap, coap8 = pair["coap"]["result"], pair["coap8"]["result"]
    assert coap8["nonfinite_steps"] == 0
    assert coap8["test_accuracy"] >= coap["test_accuracy"] - MAX_GAP, (
        f"8-bit {coap8['test_accuracy']:.2f}% vs 32-bit {coap['test_accuracy']:.2f}%"
    )
    opt8, opt32 = pair["coap8"]["opt"], pair["coap"]["opt"]
    by_name = {row["name"]: opt8.param_groups[row["group"]]["params"][row["index"]] for row in opt8.routing()}
    for name in ("fc1.weight", "features.8.weight"):  # moments of at least 4096 elements: 8 bits
        assert opt8.state[by_name[name]]["exp_avg"].dtype == torch.uint8, name
    assert opt8.state_bytes() < opt32.state_bytes()


@pytest.mark.parametrize("runs", RUNS)
def test_coap_runs_projected_and_refreshed(runs, request):
    pair = request.getfixturevalue(runs)
    opt, log = pair["coap"]["opt"], pair["coap"]["log"]
    steps = pair["coap"]["result"]["steps"]
    report = opt.coap_report()
    assert report["waiting"] == []
    layers = {layer["name"]: layer for layer in report["layers"]}
    expected = {
        "features.0.weight": "tucker2",
        "features.4.weight": "tucker2",
        "features.8.weight": "tucker2",
        "fc1.weight": "matrix",
        "fc.weight": "none",
    }
    for name, kind in expected.items():
        assert layers[name]["projector"] == kind, (name, layers[name])
    projected = [n for n, k in expected.items() if k != "none"]
    last_step = steps - steps % UPDATE_INTERVAL
    for name in projected:
        layer = layers[name]
        assert layer["last_refresh"] in ("correlation", "svd"), layer
        assert layer["last_refresh_step"] == last_step, layer
        assert math.isfinite(layer["recon_error"]) and math.isfinite(layer["cos"]), layer
        # Both kinds of refresh ran, on schedule, every time.
        assert log.kinds(name) == {"correlation", "svd"}, (name, log.seen.get(name))
        refresh_steps = sorted(step for _, step in log.seen[name])
        assert refresh_steps == list(range(UPDATE_INTERVAL, steps + 1, UPDATE_INTERVAL)), refresh_steps
        for kind, step in log.seen[name]:
            assert kind == ("svd" if step % (UPDATE_INTERVAL * 5) == 0 else "correlation"), (name, kind, step)
        if math.prod(layer["shape"]) >= 9216:
            # (the 32x1x3x3 stem is too small to save anything: its projector outweighs the
            # moments it shrinks, under Adafactor's factored second moment)
            assert layer["state_bytes"] < layer["full_rank_bytes"], layer
    assert "last_refresh" not in layers["fc.weight"]


@pytest.mark.parametrize("runs", RUNS)
def test_coap_state_is_smaller_than_full_rank(runs, request):
    pair = request.getfixturevalue(runs)
    full_opt, coap_opt = pair["full"]["opt"], pair["coap"]["opt"]
    coap_bytes = optimizer_state_bytes(coap_opt)
    full_bytes = optimizer_state_bytes(full_opt)
    assert coap_bytes == coap_opt.state_bytes()
    assert coap_bytes < coap_opt.full_rank_state_bytes()
    assert coap_bytes < 0.75 * full_bytes, (coap_bytes, full_bytes)
    # The full-rank figure COAP reports matches the moments the full-rank optimizer holds.
    moments = sum(
        v.nbytes for st in full_opt.state.values() for k, v in st.items() if isinstance(v, torch.Tensor) and k != "step"
    )
    assert coap_opt.full_rank_state_bytes() == moments


def test_optimizer_state_bytes_counts_torch_adamw_tensors():
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    assert optimizer_state_bytes(opt) == 0
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    moments = 2 * 4 * (8 * 4 + 4)
    steps = sum(st["step"].nbytes for st in opt.state.values())
    assert optimizer_state_bytes(opt) == moments + steps


def test_train_classifier_is_reproducible_and_validates(digits):
    small = tuple(t[:256] for t in digits)
    results = []
    for _ in range(2):
        model = fresh_model()
        opt = torch.optim.AdamW(model.parameters(), lr=ADAMW_LR)
        results.append(train_classifier(model, opt, small, 1, 64, SEED, lr_schedule="cosine"))
    assert results[0]["train_loss"] == results[1]["train_loss"]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]
    assert results[0]["steps"] == 4 and len(results[0]["train_loss"]) == 1
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(fresh_model(), opt, small, 0)
    with pytest.raises(ValueError, match="lr_schedule"):
        train_classifier(fresh_model(), opt, small, 1, lr_schedule="linear")  # type: ignore[arg-type]


# -- the demo -----------------------------------------------------------------------------------


def test_demo_trains_both_recipes_and_prints_the_comparison(tmp_path, tmp_path_factory, monkeypatch, capsys):
    pytest.importorskip("composer")
    pytest.importorskip("webdataset")
    monkeypatch.setenv("COAP_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "coap-data-cache"))
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--threads", "1", "max_duration=2ba", "eval_interval=2ba"]) == 0
    printed = capsys.readouterr().out
    rows = {}
    for line in printed.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| resnet18_digits"):
            rows[cells[0]] = cells
    assert set(rows) == {"resnet18_digits_adamw", "resnet18_digits"}, printed
    assert rows["resnet18_digits_adamw"][2] == "AdamW" and rows["resnet18_digits"][2] == "CoapAdamW"
    assert rows["resnet18_digits_adamw"][6] == "100.0 %"
    assert 0.2 < float(rows["resnet18_digits"][6].rstrip(" %")) / 100 < 0.4  # COAP's state / full rank
    assert f"comparison: {out / 'comparison.md'}" in printed and f"plot: {out / 'comparison.png'}" in printed
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in ("adamw", "coap"):
        summary = json.loads((out / label / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["trainer"] == "composer"


def test_demo_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--threads", "0"])
    assert "invalid value 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.parse_args(["--trainer", "keras"])
    assert demo.main(["--out", "/tmp/x", "optimizer.lrr=1"]) == 1
    assert "demo: error: Unknown key 'optimizer.lrr'" in capsys.readouterr().err
