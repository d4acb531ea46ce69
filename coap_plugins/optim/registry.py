"""Optimizers by name: ``coap_adamw``, ``coap_adamw8bit``, ``coap_adafactor``, ``coap_adafactor8bit``.

Used by the YAML runner, and registered with timm's optimizer factory by :func:`register_timm`
(which ``import coap_plugins`` runs, at once or when ``timm.optim`` is imported later: Python has
no post-import callback, so :class:`_RegisterWhenImported` is the one import hook, removed once it
has run).
"""

from __future__ import annotations

import difflib
import importlib.abc
import sys
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


# timm's factory parses ``opt`` by its last underscore-separated word, so each optimizer is also
# registered under a spelling without the underscore, which the front below maps ``coap_`` names to.
_TIMM_PARSE_NAMES = {name: name.replace("_", "") for name in OPTIMIZERS}
_NO_BETAS = (CoapAdafactor, CoapAdafactor8bit)


def register_timm() -> None:
    """Make timm's optimizer factory build our optimizers by their ``coap_`` names.

    After it, ``timm.optim.create_optimizer_v2(model, "coap_adamw8bit", ...)`` (with timm's
    ``lookahead_`` prefix too), ``timm.optim.get_optimizer_class("coap_adamw")``,
    ``get_optimizer_info(...)`` and ``list_optimizers()`` know the four names.  ``betas`` given
    for an optimizer without them (``coap_adafactor`` has ``beta1``) is refused rather than
    dropped.  Calling it twice is harmless.

    It does two things, and only these:

    1. registers each optimizer with timm's public ``register`` call, under its name
       (``coap_adamw``, which ``get_optimizer_class``/``get_optimizer_info`` look up as given)
       and under ``coapadamw``, ...;
    2. puts a front on ``default_registry.create_optimizer`` (an attribute of that one registry
       object; timm's classes and module functions are left as they are).  A front is needed
       because timm's ``create_optimizer`` parses ``opt`` by its last underscore-separated word
       (``"lookahead_adamw"`` -> ``"adamw"``), so ``"coap_adamw8bit"`` would silently build
       bitsandbytes' ``"adamw8bit"`` and ``"coap_adafactor"`` timm's own Adafactor; no
       registration can prevent that.  The front rewrites a ``coap_`` name to its one-word
       spelling (``lookahead_coap_adamw`` -> ``lookahead_coapadamw``), refuses an unknown
       ``coap_`` name, and passes every other name to timm unchanged.

    ``import coap_plugins`` calls this when ``timm.optim`` is already imported, and otherwise
    arranges for it to run as soon as ``timm.optim`` is imported (:func:`install_timm_hook`), so
    the ``coap_`` names resolve whatever the import order.
    """
    from timm.optim import _optim_factory as factory

    registry = factory.default_registry
    for name, cls in OPTIMIZERS.items():
        for spelling in (name, _TIMM_PARSE_NAMES[name]):
            if spelling in registry.list_optimizers() and registry.get_optimizer_info(spelling).opt_class is cls:
                continue  # registered already
            registry.register(
                factory.OptimInfo(
                    name=spelling,
                    opt_class=cls,
                    description=f"{cls.__name__} from coap-plugins",
                    has_eps=True,  # CoapAdamW: a float, CoapAdafactor: (eps1, eps2)
                    has_betas=cls not in _NO_BETAS,
                )
            )
    if not getattr(registry.create_optimizer, "_coap_front", False):
        registry.create_optimizer = _front_with_coap_names(registry.create_optimizer)


def _timm_spelling(opt: str, kwargs: dict[str, Any]) -> str:
    """``opt`` as timm's parser needs it: a ``coap_`` name in one word, anything else as given."""
    parts = opt.lower().split("_")
    if "coap" not in parts[:-1]:
        return opt
    i = parts.index("coap")
    name = "_".join(parts[i : i + 2])
    if name not in OPTIMIZERS or i + 2 != len(parts):
        raise ValueError(
            f"Unknown COAP optimizer in {opt!r} (expected one of {', '.join(OPTIMIZERS)}, optionally after "
            "'lookahead_')"
        )
    if OPTIMIZERS[name] in _NO_BETAS and kwargs.get("betas") is not None:
        raise ValueError(
            f"{name} has no betas (got betas={kwargs['betas']!r}): pass beta1=... for its first moment "
            "(None for none); its second moment follows decay_rate"
        )
    return "_".join(parts[:i] + [_TIMM_PARSE_NAMES[name]])


def _front_with_coap_names(create: Any) -> Any:
    """``create`` (a registry's bound ``create_optimizer``) behind :func:`_timm_spelling`."""

    def create_optimizer_with_coap_names(model_or_params: Any, opt: str = "sgd", *args: Any, **kwargs: Any):
        return create(model_or_params, _timm_spelling(opt, kwargs), *args, **kwargs)

    create_optimizer_with_coap_names._coap_front = True  # type: ignore[attr-defined]
    return create_optimizer_with_coap_names


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Runs :func:`register_timm` right after ``timm.optim`` is imported (once), so that
    ``import coap_plugins`` before or after ``import timm`` gives the same factory."""

    target = "timm.optim"

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.target:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        real_exec = loader.exec_module

        def exec_module(module: Any) -> None:
            real_exec(module)
            uninstall_timm_hook()
            register_timm()

        loader.exec_module = exec_module  # this spec's own loader instance
        return spec


_HOOK = _RegisterWhenImported()


def install_timm_hook() -> None:
    """Register with timm now if ``timm.optim`` is loaded, else as soon as it is imported."""
    if "timm.optim" in sys.modules:
        register_timm()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall_timm_hook() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
