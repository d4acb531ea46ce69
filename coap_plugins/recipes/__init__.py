"""The shipped recipes, as package data: ``composer/``, ``lightning/`` (``coap-train``) and
``lightningcli/`` (LightningCLI).

A recipe is addressed by a path or by its name, ``<folder>/<stem>`` (``composer/resnet18_digits``;
``.yaml`` may be added), or by the stem alone when one folder has it.  Recipes start from each
other with ``base:`` paths relative to their own file, so they resolve inside the installed package
as in a source checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["RECIPES_DIR", "available_recipes", "recipe_path", "resolve_recipe"]

RECIPES_DIR = Path(__file__).resolve().parent


def available_recipes() -> list[str]:
    """The names of the packaged recipes (``folder/stem``), sorted."""
    return sorted(f"{p.parent.name}/{p.stem}" for p in RECIPES_DIR.glob("*/*.yaml"))


def recipe_path(name: str) -> Path:
    """The file of the packaged recipe ``name`` (``composer/resnet18_digits``, with or without
    ``.yaml``, or a stem that only one folder has).

    Raises:
        FileNotFoundError: no packaged recipe has that name; the message lists them (one line).
    """
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    names = available_recipes()
    matches = [n for n in names if n == stem]
    if not matches and "/" not in stem:
        matches = [n for n in names if n.split("/", 1)[1] == stem]
    if len(matches) == 1:
        return RECIPES_DIR / f"{matches[0]}.yaml"
    if matches:
        raise FileNotFoundError(f"Recipe {name!r} is ambiguous: give one of {', '.join(matches)}")
    raise FileNotFoundError(
        f"Recipe not found: {name} (no such file, and no packaged recipe of that name; "
        f"packaged recipes: {', '.join(names)})"
    )


def resolve_recipe(name_or_path: str | os.PathLike[str]) -> Path:
    """``name_or_path`` itself when it is an existing file, else the packaged recipe of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    return recipe_path(os.fspath(name_or_path))
