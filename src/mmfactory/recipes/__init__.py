"""Recipes shipped with the package: ``<method>/<size>.yaml``, addressed as ``method/size``."""

from __future__ import annotations

import difflib
from pathlib import Path

from mmfactory.config import ConfigError

RECIPE_DIR = Path(__file__).parent


def list_recipes() -> list[str]:
    """Names of the shipped recipes, e.g. ``['lm/tiny', ...]``."""
    return sorted(str(p.relative_to(RECIPE_DIR).with_suffix("")) for p in RECIPE_DIR.glob("*/*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A shipped recipe name (``lm/tiny``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return path
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = list_recipes()
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"no recipe {name_or_path!r}{hint}; shipped recipes: {', '.join(names)}")
