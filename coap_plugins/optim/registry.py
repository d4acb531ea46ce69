"""Optimizers by name: ``coap_adamw``, ``coap_adamw8bit``, ``coap_adafactor``, ``coap_adafactor8bit``.

Used by the YAML runner, and registered with timm's optimizer factory by :func:`register_timm`
(called automatically on ``import coap_plugins`` when timm is already imported).
"""

from __future__ import annotations

import difflib
from typing import Any

from ._base import CoapOptimizer
from .adafactor import CoapAdafactor
from .adafactor8bit import CoapAdafactor8bit
from .adamw import CoapAdamW
from .adamw8bit import CoapAdamW8bit

__all__ = ["OPTIMIZERS", "create_optimizer", "get_optimizer_class", "register_timm"]

OPTIMIZERS: dict[str, type[CoapOptimizer]] = {
    "coap_adamw": CoapAdamW,
    "coap_adamw8bit": CoapAdamW8bit,
    "coap_adafactor": CoapAdafactor,
    "coap_adafactor8bit": CoapAdafactor8bit,
}


def get_optimizer_class(name: str) -> type[CoapOptimizer]:
    """The optimizer class for ``name`` (case-insensitive); the error lists the known names."""
    key = name.lower()
    if key not in OPTIMIZERS:
        close = difflib.get_close_matches(key, OPTIMIZERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown COAP optimizer: {name!r} (expected one of {', '.join(OPTIMIZERS)}){hint}")
    return OPTIMIZERS[key]


def create_optimizer(name: str, params: Any, **kwargs: Any) -> CoapOptimizer:
    """``get_optimizer_class(name)(params, **kwargs)``."""
    return get_optimizer_class(name)(params, **kwargs)


def register_timm() -> None:
    """Make ``timm.optim.create_optimizer_v2(model, "coap_adamw8bit", ...)`` build our optimizers.

    timm looks optimizers up by the text after the last underscore (``"coap_adamw8bit"`` would
    silently become bitsandbytes' ``"adamw8bit"``), so the four are registered as ``coapadamw``,
    ``coapadamw8bit``, ``coapadafactor``, ``coapadafactor8bit``, and timm's registry is given a
    thin front that maps a ``coap_`` prefix to them.  Every other name goes to timm unchanged.
    Calling it twice is harmless.
    """
    from timm.optim import _optim_factory as factory

    registry = factory.default_registry
    for name, cls in OPTIMIZERS.items():
        adam_like = cls in (CoapAdamW, CoapAdamW8bit)
        registry.register(
            factory.OptimInfo(
                name=name.replace("_", ""),
                opt_class=cls,
                description=f"{cls.__name__} from coap-plugins",
                has_eps=adam_like,
                has_betas=adam_like,
            )
        )
    if getattr(registry.create_optimizer, "_coap_front", False):
        return
    create = registry.create_optimizer

    def create_optimizer_with_coap_names(model_or_params: Any, opt: str = "sgd", *args: Any, **kwargs: Any):
        parts = opt.lower().split("_")
        if "coap" in parts[:-1] and parts[parts.index("coap") + 1 :][:1]:
            i = parts.index("coap")
            opt = "_".join(parts[:i] + ["coap" + parts[i + 1]] + parts[i + 2 :])
        return create(model_or_params, opt, *args, **kwargs)

    create_optimizer_with_coap_names._coap_front = True  # type: ignore[attr-defined]
    registry.create_optimizer = create_optimizer_with_coap_names
