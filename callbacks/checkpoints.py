"""Checkpoints as plain data: safe reads and the plan a checkpoint carries.

Every read of a user-supplied checkpoint uses ``torch.load(weights_only=True)``: a file that
holds anything but tensors and plain containers is refused with one line, and no code in it
runs. ``"last"`` resolves through the public ``ModelCheckpoint.dirpath`` of the trainer's
checkpoint callbacks.
"""

import pickle
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_prune.errors import InputError, MissingInputError

__all__ = ["read_checkpoint", "resolve_checkpoint"]


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint's contents, loaded as data only (memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"--ckpt_path {str(path)!r} does not exist; pass a checkpoint file of this run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise InputError(
            f"--ckpt_path {str(path)!r} holds objects other than tensors and plain data; refusing to load it (loading could run code in it)"
        ) from error
    except (RuntimeError, EOFError, ValueError) as error:
        raise InputError(f"--ckpt_path {str(path)!r} is not a readable checkpoint ({str(error).splitlines()[0]})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise InputError(f"--ckpt_path {str(path)!r} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def resolve_checkpoint(trainer: L.Trainer, path: str | None) -> Path | None:
    """The file ``path`` names: ``"last"`` is the newest ``last.ckpt`` of the trainer's ModelCheckpoints."""
    if not path:
        return None
    if path != "last":
        return Path(path)
    candidates = [
        Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
        for cb in trainer.callbacks
        if isinstance(cb, ModelCheckpoint) and cb.dirpath
    ]
    existing = [c for c in candidates if c.is_file()]
    return max(existing, key=lambda c: c.stat().st_mtime) if existing else None
