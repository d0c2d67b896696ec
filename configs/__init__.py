"""Shipped recipes, installed as ``lightning_prune.recipes``: names, paths and the ``--config NAME`` lookup."""

import difflib
from pathlib import Path

from lightning_prune.errors import InputError

__all__ = ["RECIPE_DIR", "recipe_names", "recipe_path", "resolve_config_args"]

RECIPE_DIR = Path(__file__).parent


def recipe_names() -> list[str]:
    """Names of the shipped recipes (file stems of the YAML files beside this module)."""
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The shipped recipe ``name`` (with or without ``.yaml``), or an error listing the names."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = RECIPE_DIR / f"{stem}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(stem, recipe_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"--config {name!r} is neither a file nor a shipped recipe{hint}; recipes: {', '.join(recipe_names())}")
    return path


def resolve_config_args(args: list[str]) -> list[str]:
    """Replace ``--config NAME`` (a shipped recipe name that is not an existing file) by its path."""
    resolved = list(args)
    for index, arg in enumerate(resolved):
        value, prefix = None, ""
        if arg == "--config" and index + 1 < len(resolved):
            value, index = resolved[index + 1], index + 1
        elif arg.startswith("--config="):
            value, prefix = arg[len("--config=") :], "--config="
        if value is not None and not Path(value).exists():
            resolved[index] = prefix + str(recipe_path(value))
    return resolved
