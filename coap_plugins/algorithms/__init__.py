"""Framework adapters.  Nothing here imports a framework until it is used:
``from coap_plugins.algorithms import CoapAlgorithm`` imports Composer at that moment,
``from coap_plugins.algorithms import CoapCallback`` imports Lightning."""

from __future__ import annotations

from typing import Any

# framework-free pieces, re-exported where earlier versions documented them
from ..settings import CoapSettings
from ..translate import build_optimizer, rebind_lr_scheduler, translate_optimizer

__all__ = [
    "CoapAlgorithm",
    "CoapCallback",
    "CoapSettings",
    "apply_coap",
    "build_optimizer",
    "rebind_lr_scheduler",
    "translate_optimizer",
]

_COMPOSER_NAMES = ("CoapAlgorithm", "apply_coap")
_LIGHTNING_NAMES = ("CoapCallback",)


def __getattr__(name: str) -> Any:
    if name in _COMPOSER_NAMES:
        from . import composer

        return getattr(composer, name)
    if name in _LIGHTNING_NAMES:
        from . import lightning

        return getattr(lightning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
