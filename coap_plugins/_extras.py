"""The one ImportError for a missing optional dependency: it names the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["missing_extra", "require"]


def missing_extra(what: str, needs: str, extra: str) -> ImportError:
    """``ImportError("<what> needs <needs>: pip install 'coap-plugins[<extra>]'")``, to raise ``from`` the original."""
    return ImportError(f"{what} needs {needs}: pip install 'coap-plugins[{extra}]'")


def require(module: str, extra: str, *, what: str | None = None) -> ModuleType:
    """Import ``module`` or raise :func:`missing_extra` (``what`` defaults to "this feature")."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise missing_extra(what or "this feature", module, extra) from exc
