"""Predicted optimizer-state bytes (``CoapOptimizer.predicted_state_bytes``) and ``coap-train --dry-run``."""

import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from coap_plugins import CoapPolicy
from coap_plugins.optim import CoapAdafactor, CoapAdafactor8bit, CoapAdamW, CoapAdamW8bit

EIGHT_BIT = pytest.mark.skipif(
    __import__("importlib").util.find_spec("bitsandbytes") is None, reason="the 8-bit optimizers need bitsandbytes"
)
OPTIMIZERS = [
    pytest.param(CoapAdamW, {}, id="CoapAdamW"),
    pytest.param(CoapAdafactor, {}, id="CoapAdafactor"),
    pytest.param(CoapAdafactor, {"beta1": None}, id="CoapAdafactor-no-first-moment"),
    pytest.param(CoapAdamW8bit, {}, id="CoapAdamW8bit", marks=EIGHT_BIT),
    pytest.param(CoapAdafactor8bit, {}, id="CoapAdafactor8bit", marks=EIGHT_BIT),
]


class Mixed(nn.Module):
    """A Linear (matrix), a big conv (Tucker-2, 8-bit cores), a 1x1 conv (output mode only), a
    conv below the floor, an excluded head, biases and a norm (full rank, 1-D)."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Conv2d(64, 96, 3, padding=1)
        self.point = nn.Conv2d(96, 160, 1)
        self.small = nn.Conv2d(4, 8, 3, padding=1)  # 288 elements <= min_conv_numel
        self.fc = nn.Linear(160, 300)
        self.norm = nn.LayerNorm(300)
        self.head = nn.Linear(300, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.point(self.big(x)).mean((2, 3)) + self.small(x[:, :4]).mean()
        return self.head(self.norm(self.fc(y)))


def _optimizer(cls, extra):
    torch.manual_seed(0)
    model = Mixed()
    policy = CoapPolicy(exclude=["head"], rank_ratio_matrix=4, rank_ratio_conv=4)
    return model, cls(policy.param_groups(model), lr=1e-3, **extra)


def _step(model, opt):
    model(torch.randn(2, 64, 6, 6)).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("cls, extra", OPTIMIZERS)
def test_predicted_equals_measured_after_the_first_step(cls, extra):
    model, opt = _optimizer(cls, extra)
    kinds = {r["name"]: r["projector"].kind if r["projector"] is not None else "none" for r in opt.routing()}
    assert kinds["big.weight"] == kinds["point.weight"] == "tucker2" and kinds["fc.weight"] == "matrix"
    assert kinds["small.weight"] == kinds["head.weight"] == kinds["fc.bias"] == kinds["norm.weight"] == "none"
    predicted = {n: opt.predicted_state_bytes(p) for n, p in model.named_parameters()}
    total = opt.predicted_state_bytes()
    _step(model, opt)
    measured = {n: opt.state_bytes(p) for n, p in model.named_parameters()}
    assert predicted == measured and all(v > 0 for v in measured.values())
    if "8bit" in cls.__name__:  # some moments are held as uint8 codes plus absmax
        assert any(v.dtype == torch.uint8 for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert total == opt.state_bytes() == sum(measured.values())
    _step(model, opt)  # later steps hold the same bytes
    assert opt.predicted_state_bytes() == opt.state_bytes() == total


@pytest.mark.parametrize("cls, extra", OPTIMIZERS)
def test_predicting_creates_and_changes_no_state(cls, extra):
    model, opt = _optimizer(cls, extra)
    groups = opt.state_dict()["param_groups"]
    opt.predicted_state_bytes()
    for p in model.parameters():
        opt.predicted_state_bytes(p)
    assert len(opt.state) == 0 and opt.state_dict()["param_groups"] == groups
    assert opt.waiting_parameters() == ["big.weight", "point.weight", "fc.weight"]
    _step(model, opt)
    before = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}
    opt.predicted_state_bytes()
    assert opt.state.keys() == before.keys()
    for p, state in opt.state.items():
        assert state.keys() == before[p].keys()
        for key, value in state.items():
            assert torch.equal(value, before[p][key]) if torch.is_tensor(value) else value == before[p][key]
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.predicted_state_bytes(torch.zeros(3))


# -- coap-train --dry-run ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "coap-data-cache"
    monkeypatch.setenv("COAP_DATA_CACHE", str(cache))
    return cache


def _bytes(text, label):
    return int(re.search(rf"^{label}: +([\d,]+) bytes", text, re.M).group(1).replace(",", ""))


def _routing_rows(text):
    lines = text.split("\n== routing: ", 1)[1].split("\n\n", 1)[0].splitlines()
    assert lines[1].split() == ["parameter", "shape", "projector", "ranks", "state", "bytes", "reason"]
    return [re.split(r"\s{2,}", line, maxsplit=5) for line in lines[2:]]


RUNS = [
    # timm's ResNet zero-initialises the last norm of each block: its convs get their first usable
    # gradient (so their state) at step 2
    ("composer/resnet18_digits", ["max_duration=2ba", "eval_interval=2ba"], "CoapAdamW"),
    (
        "lightning/unet_ddpm_digits",
        ["task.timesteps=20", "task.eval_timesteps=[2,10]", "task.num_samples=0"],
        "CoapAdamW",
    ),
    ("lightning/resnet18_digits_adafactor", ["coap=null"], "Adafactor"),
]


@pytest.mark.parametrize("recipe, overrides, optimizer", RUNS, ids=[r[0] for r in RUNS])
def test_dry_run_predicts_what_a_run_holds(tmp_path, recipe, overrides, optimizer):
    pytest.importorskip("omegaconf")
    pytest.importorskip("webdataset")
    pytest.importorskip("composer" if recipe.startswith("composer") else "lightning")
    from coap_plugins.recipes import RECIPES_DIR
    from coap_plugins.train.cli import run
    from coap_plugins.train.config import load_config, to_yaml
    from coap_plugins.train.dryrun import dry_run
    from coap_plugins.train.tasks import build_model

    out = tmp_path / "run"
    quick = ["max_duration=1ba", "eval_interval=1ba", "checkpoint.interval=null", "progress_bar=false", "threads=1"]
    cfg = load_config(RECIPES_DIR / f"{recipe}.yaml", [*quick, *overrides, f"output_dir={out}"])
    text = dry_run(cfg)
    assert not out.exists()
    assert to_yaml(cfg).strip() in text.split("== resolved config ==", 1)[1]

    rows = _routing_rows(text)
    net = build_model(cfg, 1, 10)  # the digits: one channel, ten classes
    shapes = {f"task.net.{n}": "x".join(map(str, p.shape)) for n, p in net.named_parameters()}
    assert sorted(r[0] for r in rows) == sorted(shapes)  # every parameter, once, named as in a run
    for name, shape, kind, ranks, held, reason in rows:
        assert shape == shapes[name] and reason and int(held.replace(",", "")) > 0
        assert kind in ("matrix", "tucker2", "none")
        assert (ranks == "-") == (kind == "none")
        assert re.fullmatch({"matrix": r"rank=\d+", "tucker2": r"rank_out=\d+(, rank_in=\d+)?"}.get(kind, "-"), ranks)
    if optimizer.startswith("Coap"):
        assert {r[2] for r in rows} == {"matrix", "tucker2", "none"}
    predicted, full = _bytes(text, "predicted state"), _bytes(text, "full-rank equivalent")
    assert predicted == sum(int(r[4].replace(",", "")) for r in rows)

    summary = run(cfg)
    assert summary["optimizer"] == optimizer and not summary["waiting_layers"]
    assert summary["state_bytes"] == predicted and summary["full_rank_state_bytes"] == full
    ratio = re.search(r"^ratio: +([\d.]+) % of full rank", text, re.M).group(1)
    assert float(ratio) == pytest.approx(100 * predicted / full, abs=0.01)


def test_dry_run_says_where_the_shards_are_missing(tmp_path):
    pytest.importorskip("omegaconf")
    from coap_plugins.train.config import load_config
    from coap_plugins.train.dryrun import dry_run

    cfg = load_config(data={"data": {"name": "shards", "path": str(tmp_path / "nowhere")}})
    with pytest.raises(FileNotFoundError, match=r"no shards found .*nowhere.*meta\.json.*coap-data imagefolder"):
        dry_run(cfg)


def test_importing_dry_run_is_light():
    code = (
        "import sys, coap_plugins.train.dryrun\n"
        "print(sorted(m for m in ('timm', 'torchvision', 'composer', 'lightning', 'omegaconf') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
