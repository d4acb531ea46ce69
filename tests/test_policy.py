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
    assert (
        routes["wide.weight"].kind == "tucker2"
        and routes["wide.weight"].reason == "tucker2, ranks (32, 32) of (64, 64)"
    )
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
        [
            {"params": decay, "weight_decay": 0.05, "tag": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "lr": 5e-4},
        ],
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
        (
            {"module_kinds": {nn.Linear: "svd"}},
            r"Invalid projector kind for Linear: 'svd' \(expected one of matrix, tucker2, none\)",
        ),
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


def test_the_policys_reason_reaches_the_optimizer_report():
    model = Net()
    policy = CoapPolicy(exclude=["fc*"])
    opt = CoapAdamW(policy.param_groups(model), lr=1e-3)
    explained = {r.name: r.reason for r in policy.route(model)}
    rows = {row["name"]: row for row in opt.routing()}
    report = {e["name"]: e for e in opt.coap_report()["layers"]}
    for name in ("fc.weight", "stem.weight", "body.weight", "norm.weight", "hidden.bias"):
        assert rows[name]["projector"] is None
        assert rows[name]["reason"] == report[name]["reason"] == explained[name]
    assert rows["fc.weight"]["reason"] == "excluded by pattern 'fc*'"
    # projected parameters report the optimizer's own decision (same function, same settings)
    assert rows["wide.weight"]["reason"] == explained["wide.weight"] == "tucker2, ranks (32, 32) of (64, 64)"
    assert all(isinstance(r, str) for r in opt.param_groups[0]["projection_reasons"])


def test_policy_reasons_survive_a_checkpoint_and_an_older_one_without_them(tmp_path):
    model = Net()
    policy = CoapPolicy(exclude=["fc*"])
    opt = CoapAdamW(policy.param_groups(model), lr=1e-3)
    sd = opt.state_dict()
    torch.save(sd, tmp_path / "opt.pt")
    fresh = CoapAdamW(policy.param_groups(model), lr=1e-3)
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert [r["reason"] for r in fresh.routing()] == [r["reason"] for r in opt.routing()]
    older = {
        **sd,
        "param_groups": [{k: v for k, v in g.items() if k != "projection_reasons"} for g in sd["param_groups"]],
    }
    fresh.load_state_dict(older)
    assert {r["name"]: r["reason"] for r in fresh.routing()}["fc.weight"] == "excluded by pattern 'fc*'"


def test_a_group_written_none_without_a_policy_says_so():
    lin = nn.Linear(32, 32)
    opt = CoapAdamW([{"params": [lin.weight], "projection": "none"}])
    assert opt.routing()[0]["reason"].startswith("full rank: the param group's projection says 'none'")


def test_projection_reasons_must_be_one_string_per_parameter():
    lin = nn.Linear(32, 32)
    with pytest.raises(ValueError, match="Invalid projection_reasons: 1 reasons for a group of 2 parameters"):
        CoapAdamW([{"params": list(lin.parameters()), "projection_reasons": ["x"]}])
    with pytest.raises(ValueError, match="Invalid projection_reasons: .* \\(expected a list of strings\\)"):
        CoapAdamW([{"params": [lin.weight], "projection_reasons": [None]}])


def test_policy_and_optimizer_share_one_conv_size_floor():
    # the floor lives in build_projector: the policy applies it to the convs it maps to Tucker-2
    small = nn.Conv2d(16, 64, 3)  # 9216 elements: at the floor
    routes = CoapPolicy(min_conv_numel=9216).route(nn.Sequential(small))
    assert routes[0].kind == "none" and routes[0].reason == "conv with 9216 <= min_conv_numel=9216 elements"
    assert CoapPolicy(min_conv_numel=0).route(nn.Sequential(small))[0].kind == "tucker2"
