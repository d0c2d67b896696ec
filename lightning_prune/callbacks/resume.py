"""Which checkpoint a ``fit`` is about to restore, known already in ``setup``.

The stage callbacks (pruning, merging, sparsify) change the architecture or the weights in
``setup("fit")``. On resume they must rebuild the *stored* decision before Lightning loads the
state dict, instead of scoring again. Lightning 2.6.6 keeps the ``ckpt_path`` given to
``fit`` (already resolved: ``"last"`` is a file path by then) as a local of ``Trainer._run``
and publishes it as ``trainer.ckpt_path`` only after the setup hooks, when it restores the
state dict. :func:`pending_checkpoint_path` reads it from there, in one place for all callbacks.
"""

import inspect

import lightning as L

__all__ = ["pending_checkpoint_path"]


def pending_checkpoint_path(trainer: L.Trainer) -> str | None:
    """The checkpoint this ``fit`` will restore (``None`` for a fresh run)."""
    if trainer.ckpt_path:
        return str(trainer.ckpt_path)
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "_run" and frame.f_locals.get("self") is trainer:
            path = frame.f_locals.get("ckpt_path")
            return str(path) if path else None
        frame = frame.f_back
    return None
