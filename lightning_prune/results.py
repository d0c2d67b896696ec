"""Run directories: ``config.yaml``, ``metrics.json``, ``decisions.json`` and ``model/``.

Everything is written atomically (temporary path in the same directory, then rename), so an
interrupted run never leaves a half-written file or model behind.
"""

import json
import os
import platform
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import yaml
from torch import nn

from lightning_prune.errors import InputError

__all__ = [
    "RESULT_NAMES",
    "DEFAULT_SHARD_SIZE",
    "RunDirectory",
    "package_versions",
    "count_parameters",
    "weight_bytes",
    "model_summary",
    "shard_size_bytes",
    "size_bytes",
]

RESULT_NAMES = ("config.yaml", "metrics.json", "decisions.json", "model")
DEFAULT_SHARD_SIZE = "5GB"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
FILE_MODE, DIRECTORY_MODE = 0o644, 0o755
_PACKAGES = ("lightning-prune", "torch", "transformers", "lightning", "torchmetrics", "peft", "bitsandbytes", "lm_eval")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide a result (missing ones are left out)."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied matrices counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters (tied matrices once): what ``model.safetensors`` holds, less its header."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def model_summary(model: nn.Module) -> dict:
    """Layer, parameter and weight-byte counts of a model, as stored in ``metrics.json``."""
    return {"num_layers": model.config.num_hidden_layers, "num_parameters": count_parameters(model), "num_bytes": weight_bytes(model)}


def size_bytes(size: int | str, option: str = "max_shard_size") -> int:
    """A size option in bytes: a positive integer, or a number with a unit (``500MB``, ``5GB``, ``2GiB``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    unit = match.group(2).upper() if match else None
    if unit not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[unit] < 1:
        raise InputError(f"{option} {size!r} is not a size; give bytes or a number with a unit such as 500MB, 5GB or 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def shard_size_bytes(size: int | str) -> int:
    """``max_shard_size`` in bytes (see :func:`size_bytes`)."""
    return size_bytes(size, "max_shard_size")


def _readable(directory: Path) -> None:
    """Give a staged directory tree the usual modes (mkdtemp/mkstemp create 0700/0600)."""
    os.chmod(directory, DIRECTORY_MODE)
    for path in directory.rglob("*"):
        os.chmod(path, DIRECTORY_MODE if path.is_dir() else FILE_MODE)


class RunDirectory:
    """One run's output directory.

    Args:
        path: the directory (created on first write).
        overwrite: allow replacing results already there.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite

    def check(self) -> None:
        """Refuse (before any work) a directory that already holds results, unless overwriting."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"output_dir {str(self.path)!r} is a file; pass a directory")
        existing = [name for name in RESULT_NAMES if (self.path / name).exists()]
        if existing and not self.overwrite:
            raise InputError(
                f"output_dir {str(self.path)!r} already holds results ({', '.join(existing)}); choose another directory or pass --overwrite"
            )

    def _publish(self, temporary: Path, name: str) -> Path:
        target = self.path / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(temporary, target)
        return target

    def write_text(self, name: str, text: str) -> Path:
        """Write a text file atomically."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, FILE_MODE)
        return self._publish(Path(temporary), name)

    def write_json(self, name: str, data: dict) -> Path:
        """Write ``data`` as indented JSON atomically."""
        return self.write_text(name, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def write_config(self, config: dict) -> Path:
        """Write the settings of the run as ``config.yaml``."""
        return self.write_text("config.yaml", yaml.safe_dump(config, sort_keys=False))

    def save_model(
        self,
        model: nn.Module,
        tokenizer=None,
        name: str = "model",
        card: str | None = None,
        decisions=(),
        max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    ) -> Path:
        """``save_pretrained`` (safetensors, shards of at most ``max_shard_size``) into a temporary directory, then rename it to ``name``.

        A model larger than one shard is written as ``model-0000k-of-0000n.safetensors`` plus
        ``model.safetensors.index.json``, one shard file at a time; ``from_pretrained`` reads either.
        Inside the staged directory, each decision's ``on_save(model, directory)`` may rewrite the
        files (e.g. a compressed export) and ``card`` becomes ``README.md``, so the model and its
        card appear together or not at all.
        """
        shard_bytes = shard_size_bytes(max_shard_size)
        self.path.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.path))
        try:
            # a peft adapter: no full embedding copies (LoRA here never resizes the vocabulary); peft's "auto"
            # would look the base model up on the Hub to find out, a network call and two warnings offline
            adapter = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
            model.save_pretrained(temporary, safe_serialization=True, max_shard_size=shard_bytes, **adapter)
            if tokenizer is not None:
                tokenizer.save_pretrained(temporary)
            for decision in decisions:
                decision.on_save(model, temporary)
            if card is not None:
                (temporary / "README.md").write_text(card, encoding="utf-8")
            _readable(temporary)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        return self._publish(temporary, name)

    def write_tensors(self, name: str, tensors: dict) -> Path:
        """Write tensors as a safetensors file atomically."""
        from safetensors.torch import save_file

        self.path.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=self.path)
        os.close(handle)
        save_file(tensors, temporary)
        os.chmod(temporary, FILE_MODE)
        return self._publish(Path(temporary), name)

    def write_plan(self, body: dict, tensors: dict) -> Path:
        """``decisions.json`` and, when there are tensors, ``decisions.safetensors`` (tensors first)."""
        stale = self.path / "decisions.safetensors"
        if tensors:
            self.write_tensors(stale.name, tensors)
        elif stale.exists():
            stale.unlink()
        return self.write_json("decisions.json", body)
