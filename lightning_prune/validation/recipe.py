"""Pre-flight checks of a parsed recipe, before any class is built: the same rules as the commands, by section.

Checked: ``run_dir`` (writable; a killed run's temporaries are removed), the ``model`` and
``data`` sections' numeric options, model source and data files, ``evaluation`` numbers and
data, the trainer's ``devices``, accelerator and strategy names, step and epoch counts, an
integer ``val_check_interval`` against the training batches it can see, and ``--ckpt_path``
(``last`` must find a ``last.ckpt``; a file must be a checkpoint that reads as data only).
"""

import math
import zipfile
from pathlib import Path

from lightning_prune.callbacks.checkpoints import read_checkpoint
from lightning_prune.errors import InputError
from lightning_prune.evaluation.suite import split_names
from lightning_prune.onload import check_onload
from lightning_prune.run_state import clean_stale
from lightning_prune.validation.locations import check_output_location
from lightning_prune.validation.numbers import check_numbers
from lightning_prune.validation.preflight import check_data_source, check_model

__all__ = ["check_recipe", "check_checkpoint_file"]


def _plain(value) -> dict:
    """A jsonargparse Namespace (or None) as a plain dict."""
    if value is None:
        return {}
    return value.as_dict() if hasattr(value, "as_dict") else dict(value)


def _device_number(devices) -> int | None:
    """The count in ``--trainer.devices`` as a number (the command line gives a string such as ``"2"``); None for auto or a list."""
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        return int(devices)
    return None


def _check_devices(devices) -> None:
    if isinstance(devices, bool):
        raise InputError(f"--trainer.devices {devices} is not a device count; use a positive number, -1 (all) or auto")
    number = _device_number(devices)
    if number is not None and (number == 0 or number < -1):
        raise InputError(f"--trainer.devices must be a positive number of devices, -1 (all) or auto, got {devices}")
    if isinstance(devices, (list, tuple)) and not devices:
        raise InputError("--trainer.devices [] names no device; use a positive number, -1 (all) or auto")


def _check_accelerator_and_strategy(trainer: dict) -> None:
    """A named accelerator must be registered and available here; a named strategy registered."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    accelerator, strategy = trainer.get("accelerator", "auto"), trainer.get("strategy", "auto")
    if isinstance(accelerator, str) and accelerator not in ("auto", "gpu"):
        names = sorted(AcceleratorRegistry.available_accelerators())
        if accelerator not in names:
            raise InputError(f"--trainer.accelerator {accelerator!r} is not an accelerator; choose auto, gpu or one of {', '.join(names)}")
        try:
            available = AcceleratorRegistry[accelerator]["accelerator"].is_available()
        except Exception:  # an accelerator whose backend is not installed cannot say, and is not available
            available = False
        if not available:
            raise InputError(f"--trainer.accelerator {accelerator!r} is not available here; use auto or cpu")
    if isinstance(strategy, str) and strategy != "auto" and strategy not in StrategyRegistry.available_strategies():
        raise InputError(f"--trainer.strategy {strategy!r} is not a strategy; use auto, ddp, ddp_spawn, fsdp, deepspeed, ...")


def _check_steps(trainer: dict) -> None:
    for name in ("max_steps", "max_epochs"):
        value = trainer.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and (value == 0 or value < -1):
            raise InputError(f"--trainer.{name} must be a positive number (or -1 for no limit), got {value}")
    accumulate = trainer.get("accumulate_grad_batches")
    if isinstance(accumulate, int) and accumulate < 1:
        raise InputError(f"--trainer.accumulate_grad_batches must be >= 1, got {accumulate}")


def _training_batches(trainer: dict, data: dict) -> int | None:
    """Training batches per rank and epoch, when the recipe fixes them (``num_train_samples`` set)."""
    samples, batch_size, devices = data.get("num_train_samples"), data.get("batch_size"), trainer.get("devices", 1)
    if not isinstance(samples, int) or not isinstance(batch_size, int) or batch_size < 1:
        return None
    number = _device_number(devices)
    per_node = number if number is not None and number > 0 else len(devices) if isinstance(devices, (list, tuple)) else 1
    nodes = trainer.get("num_nodes", 1)
    world = per_node * (nodes if isinstance(nodes, int) and nodes > 0 else 1)
    batches = math.ceil(math.ceil(samples / world) / batch_size)
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(batches, limit)
    return batches if limit in (None, 1.0) else None


def _check_val_interval(trainer: dict, data: dict) -> None:
    interval = trainer.get("val_check_interval")
    if isinstance(interval, bool) or interval is None:
        return
    if isinstance(interval, float) and not 0 < interval <= 1:
        raise InputError(f"--trainer.val_check_interval must be a fraction of the epoch in (0, 1] or a batch count, got {interval}")
    if isinstance(interval, int) and interval < 1:
        raise InputError(f"--trainer.val_check_interval must be >= 1 batches, got {interval}")
    batches = _training_batches(trainer, data)
    if isinstance(interval, int) and batches is not None and trainer.get("check_val_every_n_epoch", 1) is not None and interval > batches:
        raise InputError(
            f"--trainer.val_check_interval {interval} is more than the {batches} training batches of an epoch; "
            f"use at most {batches}, or set --trainer.check_val_every_n_epoch null to count across epochs"
        )


def _checkpoint_dirs(config, trainer: dict) -> list[Path]:
    """Where the recipe's ModelCheckpoints write (``run_dir/checkpoints`` when they name no ``dirpath``)."""
    dirs = []
    for callback in trainer.get("callbacks") or []:
        entry = _plain(callback)
        if str(entry.get("class_path", "")).endswith("ModelCheckpoint"):
            dirpath = _plain(entry.get("init_args")).get("dirpath")
            dirs.append(Path(dirpath) if dirpath else Path(config.get("run_dir") or ".") / "checkpoints")
    return dirs


def check_checkpoint_file(path: str) -> None:
    """``--ckpt_path FILE``: it exists, is a ``torch.save`` archive and reads as data only with a ``state_dict``."""
    if not Path(path).is_file():
        raise InputError(f"--ckpt_path {path!r} does not exist; pass a checkpoint file of this run, or last")
    if not zipfile.is_zipfile(path):
        raise InputError(f"--ckpt_path {path!r} is not a checkpoint (not a torch.save archive); pass a .ckpt file a recipe wrote")
    read_checkpoint(path)


def _check_ckpt_option(config, trainer: dict) -> None:
    path = config.get("ckpt_path")
    if not path:
        return
    if path != "last":
        check_checkpoint_file(str(path))
        return
    dirs = _checkpoint_dirs(config, trainer)
    if not any((directory / "last.ckpt").is_file() for directory in dirs):
        where = ", ".join(str(directory) for directory in dirs) or "this recipe (it has no ModelCheckpoint)"
        raise InputError(f"--ckpt_path last: no last.ckpt in {where}; nothing to resume, drop --ckpt_path to start a new run")


def check_recipe(config) -> None:
    """Check a parsed recipe (the subcommand's namespace) before any class is instantiated."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    run_dir = config.get("run_dir")
    if run_dir:
        check_output_location(run_dir, "--run_dir")
        if rank_zero_only.rank == 0:
            clean_stale(Path(run_dir))  # a killed run's temporaries, before any rank writes
    check_onload(config.get("onload", "none"), config.get("offload_dir"))
    if config.get("offload_dir"):
        check_output_location(config["offload_dir"], "--offload_dir")
    trainer = _plain(config.get("trainer"))
    model, data = (_plain(_plain(config.get(name)).get("init_args")) for name in ("model", "data"))
    check_numbers(model, "--model.init_args.")
    check_numbers(data, "--data.init_args.")
    evaluation = _plain(config.get("evaluation"))
    check_numbers(evaluation, "--evaluation.")
    _check_devices(trainer.get("devices", "auto"))
    _check_accelerator_and_strategy(trainer)
    _check_steps(trainer)
    _check_val_interval(trainer, data)
    _check_ckpt_option(config, trainer)
    if isinstance(model.get("model"), str):
        check_model(model["model"])
    for option in ("train_data", "val_data"):
        if isinstance(data.get(option), str):
            check_data_source(data[option], f"data.init_args.{option}")
    for source in split_names(evaluation.get("data") or "") if config.get("evaluate", True) else []:
        check_data_source(source, "evaluation.data")
