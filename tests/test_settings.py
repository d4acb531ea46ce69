"""The settings are declared once (CoapSettings) and everything else is derived from them; the
refresh driver is the one control loop of both adapters."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

from coap_plugins import CoapAdamW, CoapSettings, RefreshDriver
from coap_plugins._checks import SettingError


def _fields():
    return {f.name: f.default for f in dataclasses.fields(CoapSettings) if f.init}


@pytest.mark.parametrize("adapter", ["CoapAlgorithm", "CoapCallback"])
def test_adapters_take_every_setting_with_its_default(adapter):
    import coap_plugins.algorithms as algorithms

    cls = getattr(algorithms, adapter)
    params = inspect.signature(cls).parameters
    for name, default in _fields().items():
        assert params[name].default == default, name
    with pytest.raises(TypeError, match=rf"{adapter}\(\) got an unexpected keyword argument 'update_intervall'"):
        cls(update_intervall=4)


def test_yaml_schema_is_a_subset_of_the_settings_with_the_same_defaults():
    from coap_plugins.train.config import CoapConfig

    settings = _fields()
    for f in dataclasses.fields(CoapConfig):
        assert f.name in settings, f.name
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert default == settings[f.name] or (f.name == "exclude" and tuple(default) == settings[f.name]), f.name


def test_settings_errors_carry_the_key():
    with pytest.raises(SettingError) as info:
        CoapSettings(reproject_factor=0)
    assert (info.value.key, info.value.reason) == ("reproject_factor", "0 (must be an integer >= 1)")
    assert str(info.value) == "Invalid reproject_factor: 0 (must be an integer >= 1)"
    assert isinstance(info.value, ValueError)


def test_refresh_driver_requests_what_is_due_and_records_what_ran():
    layer = nn.Linear(32, 16)
    opt = CoapAdamW(layer.parameters(), lr=1e-3)
    driver = RefreshDriver(CoapSettings(update_interval=2, reproject_factor=2))
    driver.bind([opt])
    assert opt.param_groups[0]["schedule"] == "external"
    kinds = []
    for step in range(1, 5):
        layer(torch.randn(4, 32)).sum().backward()
        kinds.append(driver.before_step(0))
        if step != 4:  # step 4's optimizer step is skipped: its svd request must not be recorded
            opt.step()
        opt.zero_grad()
        ran, withdrawn = driver.after_batch()
        assert (len(withdrawn) == 1) == (step == 4)
    assert kinds == ["none", "correlation", "none", "svd"]
    assert driver.refreshes == [(2, "correlation")] and driver.step == 4
    assert opt.param_groups[0]["pending_refresh"] == "none"  # withdrawn, not left to run later
    state = driver.state_dict()
    assert state == {"steps": [4], "update_interval": 2, "reproject_factor": 2, "optimizer_classes": ["CoapAdamW"]}
    other = RefreshDriver(CoapSettings(update_interval=3), adapter="CoapCallback")
    other.load_state_dict(state)
    other.bind([opt])
    with pytest.raises(ValueError, match="written with update_interval=2 but this CoapCallback has update_interval=3"):
        other.check_compatible()
