"""Shipped recipes, installed as ``lightning_prune.recipes``: names, paths and the ``--config NAME`` lookup."""

import difflib
import re
import shutil
from pathlib import Path

from lightning_prune.errors import InputError

__all__ = ["RECIPE_DIR", "recipe_names", "recipe_path", "resolve_config_args", "describe", "copy_recipe"]

RECIPE_DIR = Path(__file__).parent


def recipe_names() -> list[str]:
    """Names of the shipped recipes (file stems of the YAML files beside this module)."""
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name: str, option: str = "--config") -> Path:
    """The shipped recipe ``name`` (with or without ``.yaml``), or an error listing the names."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = RECIPE_DIR / f"{stem}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(stem, recipe_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"{option} {name!r} is neither a file nor a shipped recipe{hint}; recipes: {', '.join(recipe_names())}")
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


def describe() -> str:
    """One line per shipped recipe: its name and the first line of its description."""
    lines = []
    for name in recipe_names():
        comments = [line[1:].strip() for line in recipe_path(name).read_text(encoding="utf-8").splitlines() if line.startswith("#")]
        summary = next((c for c in comments if c and not c.startswith(("lightning-prune", "python "))), "")
        lines.append(f"{name:<20} {summary}")
    return "\n".join(lines)


def copy_recipe(name: str, destination: str) -> Path:
    """Copy a shipped recipe (and the pieces it uses, into ``pieces/`` beside it) to ``destination``.

    ``destination`` is a ``.yaml`` path or a directory (the recipe keeps its file name there).
    Existing files are not replaced.
    """
    source = recipe_path(name, option="recipes copy")
    target = Path(destination)
    if target.suffix not in (".yaml", ".yml"):
        target = target / source.name
    pieces = sorted(set(re.findall(r"pieces/[\w.-]+\.yaml", source.read_text(encoding="utf-8"))))
    planned = [target, *(target.parent / piece for piece in pieces)]
    existing = [str(path) for path in planned if path.exists()]
    if existing:
        raise InputError(f"recipes copy would replace {existing[0]}; choose another destination")
    for path in planned:
        path.parent.mkdir(parents=True, exist_ok=True)
    for piece in pieces:
        shutil.copyfile(RECIPE_DIR / piece, target.parent / piece)
    shutil.copyfile(source, target)
    return target
