"""Framework adapters.  Nothing here imports a framework until it is used:
``from coap_plugins.algorithms import CoapAlgorithm`` imports Composer at that moment."""

from __future__ import annotations

from typing import Any

from ._swap import CoapSettings, build_optimizer, rebind_lr_scheduler, translate_optimizer

__all__ = ["CoapAlgorithm", "CoapSettings", "apply_coap", "build_optimizer", "rebind_lr_scheduler", "translate_optimizer"]

_COMPOSER_NAMES = ("CoapAlgorithm", "apply_coap")


def __getattr__(name: str) -> Any:
    if name in _COMPOSER_NAMES:
        from . import composer

        return getattr(composer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
