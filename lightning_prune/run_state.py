"""A run directory is complete or clearly marked incomplete, and a killed run's leftovers are cleaned by the next one.

Every file and ``model/`` of a run is written under a temporary name (``.<name>.<random>``)
and renamed into place (:class:`~lightning_prune.results.RunDirectory`). A command brackets
its writes with :func:`guarded_output`: ``.incomplete`` is written before the command starts
and removed after it finished, so a directory holding the marker was left by a killed run.
The next run in that directory removes the marked run's results and every temporary of our
naming, then starts afresh: a run killed at any point and started again with the same
arguments works. A failed command leaves nothing: a directory it created is removed, and a
directory that existed keeps its previous state (or, if the failure came after a write,
the marker).
"""

import shutil
from contextlib import contextmanager
from pathlib import Path

from lightning_prune.results import RESULT_NAMES

__all__ = ["MARKER", "OUTPUT_NAMES", "clean_stale", "recover", "guarded_output"]

MARKER = ".incomplete"
OUTPUT_NAMES = (
    *RESULT_NAMES,
    "decisions.safetensors",
    "adapter",
    "scores.json",
    "scores.png",
    "relevance.json",
    "relevance.png",
    "layer_sparsity.png",
)
_TEMPORARY_PREFIXES = tuple(f".{name}." for name in OUTPUT_NAMES) + (".lightning-prune-probe.",)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(directory: Path) -> list[str]:
    """Remove the temporaries (``.model.x1y2``, ``.metrics.json.ab12``, …) a killed run left in ``directory``; their names."""
    if not directory.is_dir():
        return []
    stale = [entry for entry in directory.iterdir() if entry.name.startswith(_TEMPORARY_PREFIXES)]
    for entry in stale:
        _remove(entry)
    return [entry.name for entry in stale]


def recover(directory: Path) -> bool:
    """Clean a killed run's temporaries; if ``directory`` is marked incomplete, also its results. True if it was marked."""
    clean_stale(directory)
    marker = directory / MARKER
    if not marker.exists():
        return False
    for name in OUTPUT_NAMES:
        _remove(directory / name)
    marker.unlink()
    return True


def _snapshot(directory: Path) -> dict[str, tuple[int, int, int]]:
    if not directory.is_dir():
        return {}
    return {
        entry.name: (entry.stat().st_ino, entry.stat().st_mtime_ns, entry.stat().st_size)
        for entry in directory.iterdir()
        if entry.name != MARKER
    }


def _first_missing(directory: Path) -> Path | None:
    """The topmost directory on the way to ``directory`` that does not exist yet (what a failed run must remove)."""
    missing = None
    for path in [directory.absolute(), *directory.absolute().parents]:
        if path.exists():
            break
        missing = path
    return missing


@contextmanager
def guarded_output(path: str | None, overwrite: bool = False):
    """Bracket a command writing to ``path``: recover a killed run there, mark the directory incomplete while working."""
    if path is None:
        yield
        return
    directory = Path(path).expanduser()
    recover(directory)
    created = _first_missing(directory)
    before = _snapshot(directory)
    marked = overwrite or not any((directory / name).exists() for name in OUTPUT_NAMES)
    if marked:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MARKER).write_text("a lightning-prune run is writing here; if none is, the next run cleans it\n", encoding="utf-8")
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        elif marked and _snapshot(directory) == before:
            (directory / MARKER).unlink(missing_ok=True)
        raise
    if marked:
        (directory / MARKER).unlink(missing_ok=True)
