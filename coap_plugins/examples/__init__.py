"""Examples: small networks for demos and tests, and the LightningCLI recipe's module.

Everything here runs on a CPU in seconds to minutes and downloads nothing.  The networks
(:mod:`coap_plugins.examples.nets`) need torch only; :mod:`coap_plugins.examples.lightning_cli`
(``DigitsClassifier`` and the ``python -m coap_plugins.examples.lightning_cli`` entry) needs the
``lightning`` extra and is not imported here.  The digits data set lives in
:mod:`coap_plugins.train.digits` and is re-exported for the examples' convenience.

Example:
    >>> import torch
    >>> from coap_plugins import CoapAdamW, CoapPolicy
    >>> from coap_plugins.examples import SmallResNet, load_digits_tensors
    >>> data = load_digits_tensors(size=16)  # doctest: +SKIP
    >>> model = SmallResNet()
    >>> policy = CoapPolicy(rank_ratio_conv=4, rank_ratio_matrix=4, exclude=["fc"])
    >>> opt = CoapAdamW(policy.param_groups(model), lr=2e-3)
"""

from __future__ import annotations

from ..train.digits import DigitsData, load_digits_tensors
from .nets import BasicBlock, SmallCNN, SmallResNet

__all__ = ["BasicBlock", "DigitsData", "SmallCNN", "SmallResNet", "load_digits_tensors"]
