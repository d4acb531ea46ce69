"""timm's optimizer factory hands out the COAP optimizers by name, whatever the import order."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("timm")

_CHECK = """
import json, torch
import timm.optim as o
model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
out = {name: type(o.create_optimizer_v2(model, name, lr=1e-3)).__name__
       for name in ("coap_adamw", "coap_adamw8bit", "coap_adafactor", "coap_adafactor8bit", "adamw")}
out["lookahead"] = type(o.create_optimizer_v2(model, "lookahead_coap_adamw", lr=1e-3)._base_optimizer).__name__
out["class"] = o.get_optimizer_class("coap_adamw", bind_defaults=False).__name__
out["info"] = o.get_optimizer_info("coap_adafactor").opt_class.__name__
out["listed"] = [n for n in o.list_optimizers() if n.startswith("coap_")]
print(json.dumps(out))
"""

_EXPECTED = {
    "coap_adamw": "CoapAdamW",
    "coap_adamw8bit": "CoapAdamW8bit",
    "coap_adafactor": "CoapAdafactor",
    "coap_adafactor8bit": "CoapAdafactor8bit",
    "adamw": "AdamW",
    "lookahead": "CoapAdamW",
    "class": "CoapAdamW",
    "info": "CoapAdafactor",
    "listed": ["coap_adafactor", "coap_adafactor8bit", "coap_adamw", "coap_adamw8bit"],
}


@pytest.mark.parametrize(
    "imports",
    [
        "import timm; import coap_plugins",  # the natural order, timm.optim not imported yet
        "import coap_plugins; import timm",
        "import timm.optim; import coap_plugins",
    ],
)
def test_coap_names_resolve_whatever_the_import_order(imports):
    run = subprocess.run([sys.executable, "-c", imports + "\n" + _CHECK], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == _EXPECTED


def test_timm_hyperparameters_reach_the_class_or_are_refused():
    import timm.optim
    import torch

    import coap_plugins  # noqa: F401

    model = torch.nn.Linear(16, 16)
    opt = timm.optim.create_optimizer_v2(model, "coap_adamw", lr=1e-3, betas=(0.8, 0.95), eps=1e-6)
    assert opt.param_groups[0]["betas"] == (0.8, 0.95) and opt.param_groups[0]["eps"] == 1e-6
    opt = timm.optim.create_optimizer_v2(model, "coap_adafactor", lr=1e-3, eps=(1e-30, 2e-3))
    assert opt.param_groups[0]["eps"] == (1e-30, 2e-3)
    with pytest.raises(ValueError, match=r"coap_adafactor has no betas \(got betas=\(0.9, 0.999\)\): pass beta1="):
        timm.optim.create_optimizer_v2(model, "coap_adafactor", lr=1e-3, betas=(0.9, 0.999))
    with pytest.raises(ValueError, match="Unknown COAP optimizer in 'coap_sgd'"):
        timm.optim.create_optimizer_v2(model, "coap_sgd", lr=1e-3)
