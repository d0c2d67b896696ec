"""Slim training checkpoints: what trains (and the buffers), never the frozen base.

A LoRA / QLoRA or distillation checkpoint would otherwise hold the whole frozen model (and
the teacher) at every save: 32 GB for an 8B fp32 base. The frozen tensors are rebuilt on
resume from the model source plus the stage decisions (``StageCallback`` replays
``checkpoint["decisions"]`` before Lightning loads the state dict), so the checkpoint keeps
only the state-dict entries that can change: trainable parameters and buffers.
``checkpoint["slim"]`` records the model source and which keys were left out.
"""

from collections.abc import Iterable

from torch import nn

from lightning_prune.errors import InputError

__all__ = ["SLIM_KEY", "frozen_keys", "slim_record", "drop_frozen", "check_fits"]

SLIM_KEY = "slim"
_FSDP_UNIT = "_fsdp_wrapped_module."  # in parameter names under FSDP, not in its full state-dict keys


def frozen_keys(module: nn.Module) -> list[str]:
    """State-dict keys of the module's frozen parameters (every name of a shared one; FSDP unit prefixes removed)."""
    names = [name for name, parameter in module.named_parameters(remove_duplicate=False) if not parameter.requires_grad]
    return [name.replace(_FSDP_UNIT, "") for name in names]


def _distinct_bytes(tensors: list) -> int:
    """Bytes of the tensors, each shared storage (tied embeddings) once, as ``torch.save`` writes them."""
    storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors}
    return sum(size for _, size in storages)


def slim_record(checkpoint: dict) -> dict | None:
    """``checkpoint["slim"]``: ``{"source", "dropped", "dropped_bytes"}``, or ``None`` for a full checkpoint."""
    return checkpoint.get(SLIM_KEY)


def drop_frozen(checkpoint: dict, dropped: Iterable[str], source: str | None) -> None:
    """Leave the ``dropped`` keys out of ``checkpoint["state_dict"]`` and record them with the model source."""
    state = checkpoint["state_dict"]
    dropped = sorted(set(dropped) & set(state))
    left_out = set(dropped)
    checkpoint[SLIM_KEY] = {
        "source": source,
        "dropped": dropped,
        "dropped_bytes": _distinct_bytes([state[key] for key in dropped]),
    }
    checkpoint["state_dict"] = {key: value for key, value in state.items() if key not in left_out}


def check_fits(checkpoint: dict, live: dict, rebuilt: Iterable[str]) -> None:
    """Refuse a checkpoint that does not fit the live module, before any weight loads.

    Every live key that is not ``rebuilt`` must be in the checkpoint with the live shape; a
    rebuilt key may be there too (a full checkpoint) but nothing the module does not have.

    Args:
        checkpoint: the loaded checkpoint.
        live: the module's ``state_dict()``.
        rebuilt: keys the module rebuilds itself (frozen base, teacher, 4-bit weights).
    """
    stored = {key: tuple(value.shape) for key, value in checkpoint["state_dict"].items()}
    rebuilt = set(rebuilt)
    missing = sorted(key for key in live if key not in rebuilt and key not in stored)
    unknown = sorted(key for key in stored if key not in live)
    reshaped = sorted(key for key in stored if key in live and key not in rebuilt and stored[key] != tuple(live[key].shape))
    wrong = missing + unknown + reshaped
    if wrong:
        raise InputError(
            f"checkpoint does not fit this run's architecture ({len(wrong)} mismatched tensors, first "
            f"{wrong[0]!r}); it was written with other pruning/LoRA settings"
        )
