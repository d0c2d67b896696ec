"""Output locations checked before any work: the directory must be creatable and writable."""

import os
import tempfile
from pathlib import Path

from lightning_prune.errors import InputError

__all__ = ["check_output_location"]


def check_output_location(path: str | os.PathLike, option: str = "--output_dir") -> None:
    """Refuse an output directory that is a file, lies under a file, or cannot be written (tried with a probe that is removed at once)."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise InputError(f"{option} {str(path)!r} is a file; pass a directory")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{option} {str(path)!r} cannot be created: {str(existing)!r} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lightning-prune-probe.", dir=existing))
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise InputError(
            f"{option} {str(path)!r} cannot be written ({reason} in {str(existing)!r}); choose a writable directory"
        ) from error
