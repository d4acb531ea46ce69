import pytest
import torch
from torch import nn

from coap_plugins import CoapAdamW, CoapPolicy, ProjectionSchedule


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)  # 432 elements: below the conv floor
        self.body = nn.Conv2d(16, 64, 3)  # 9216: at the floor, full rank
        self.wide = nn.Conv2d(64, 64, 3)  # 36864: Tucker-2
        self.proj = nn.Conv2d(64, 256, 1)  # 16384: Tucker-2, output mode only
        self.norm = nn.BatchNorm2d(256)
        self.hidden = nn.Linear(256, 128)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = self.norm(self.proj(self.wide(self.body(self.stem(x)))))
        return self.fc(torch.relu(self.hidden(x.mean((2, 3)))))


def test_default_policy_routes_by_module_type_with_reasons():
    routes = {r.name: r for r in CoapPolicy().route(Net())}
    assert routes["stem.weight"].kind == "none" and "min_conv_numel" in routes["stem.weight"].reason
    assert routes["body.weight"].kind == "none"
    assert routes["wide.weight"].kind == "tucker2" and routes["wide.weight"].reason == "tucker2, ranks (32, 32) of (64, 64)"
    assert routes["proj.weight"].kind == "tucker2" and "output mode only" in routes["proj.weight"].reason
    assert routes["hidden.weight"].kind == "matrix" and routes["hidden.weight"].projector.rank == 32
    assert routes["norm.weight"].kind == "none" and "BatchNorm2d.weight is not mapped" in routes["norm.weight"].reason
    assert routes["hidden.bias"].kind == "none"


def test_excludes_min_numel_and_custom_kinds():
    policy = CoapPolicy(exclude=["fc*"], min_numel=40_000, module_kinds={nn.Linear: "matrix", nn.Conv2d: "none"})
    routes = {r.name: r for r in policy.route(Net())}
    assert routes["fc.weight"].kind == "none" and routes["fc.weight"].reason == "excluded by pattern 'fc*'"
    assert routes["wide.weight"].kind == "none" and "mapped to 'none'" in routes["wide.weight"].reason
    assert routes["hidden.weight"].kind == "none" and "min_numel=40000" in routes["hidden.weight"].reason


def test_explain_lists_every_parameter():
    model = Net()
    text = CoapPolicy(rank_ratio_conv=16).explain(model)
    lines = text.splitlines()
    assert len(lines) == 1 + len(list(model.parameters()))
    assert "wide.weight" in text and "tucker2, ranks (16, 16) of (64, 64)" in text


def test_param_groups_are_one_to_one_with_user_groups_and_keep_schedulers_working():
    model = Net()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    user = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05, "tag": "decay"}, {"params": no_decay, "weight_decay": 0.0, "lr": 5e-4}],
        lr=1e-3,
        betas=(0.8, 0.99),
    )
    groups = CoapPolicy(rank_ratio_conv=4).param_groups(model, user.param_groups)
    assert len(groups) == 2
    for new, old in zip(groups, user.param_groups):
        assert [p for _, p in new["params"]] == old["params"]  # same order
        for key in ("lr", "betas", "eps", "weight_decay"):
            assert new[key] == old[key]
        assert len(new["projection"]) == len(old["params"])
    assert groups[0]["tag"] == "decay" and groups[0]["rank_ratio_conv"] == 4
    assert set(groups[1]["projection"]) == {"none"}

    opt = CoapAdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5**s, lambda s: 0.1])
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 5e-5]
    opt.step()  # no gradients yet: a no-op, but the scheduler expects a step first
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [5e-4, pytest.approx(5e-5)]
    assert opt.param_groups[0]["param_names"][0] == "stem.weight"


def test_param_groups_from_plain_parameter_list_and_unknown_params():
    model = Net()
    stray = nn.Parameter(torch.randn(64, 64))
    groups = CoapPolicy().param_groups(model, list(model.parameters()) + [stray])
    assert len(groups) == 1 and groups[0]["projection"][-1] == "none"
    assert groups[0]["params"][-1][0] == f"group0.param{len(list(model.parameters()))}"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"module_kinds": {nn.Linear: "svd"}}, r"Invalid projector kind for Linear: 'svd' \(expected one of matrix, tucker2, none\)"),
        ({"module_kinds": {int: "matrix"}}, r"Invalid module type in module_kinds"),
        ({"exclude": [3]}, r"Invalid exclude pattern: 3"),
        ({"rank": 0}, r"Invalid rank: 0"),
        ({"rank_ratio_conv": 0.5}, r"Invalid rank_ratio_conv: 0.5"),
        ({"min_numel": -1}, r"Invalid min_numel: -1"),
    ],
)
def test_policy_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoapPolicy(**kwargs)


def test_schedule():
    s = ProjectionSchedule(update_interval=4, reproject_factor=3)
    due = {t: s.refresh_at(t) for t in range(0, 25) if s.refresh_at(t) != "none"}
    assert due == {4: "correlation", 8: "correlation", 12: "svd", 16: "correlation", 20: "correlation", 24: "svd"}
    assert [ProjectionSchedule(1, 1).refresh_at(t) for t in (1, 2)] == ["svd", "svd"]
    with pytest.raises(ValueError, match=r"Invalid update_interval: 0 \(must be an integer >= 1\)"):
        ProjectionSchedule(0, 5)
    with pytest.raises(ValueError, match=r"Invalid reproject_factor: 2.5"):
        ProjectionSchedule(4, 2.5)
