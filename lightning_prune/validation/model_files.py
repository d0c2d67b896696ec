"""A model source checked without loading weights: config, weight files and their headers, the Hub reachable.

A local directory needs a ``config.json`` holding a JSON object and weights in a known format:
safetensors (one file or shards named by ``model.safetensors.index.json``; every header is
parsed and the tensors it promises must fit in the file) or PyTorch ``.bin`` files (a zip
archive). A ``.gguf`` file must start with the GGUF magic. A Hub id that is not cached is
refused at once when the Hub cannot be reached, instead of after minutes of retries.
"""

import json
import os
import socket
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from lightning_prune.errors import InputError

__all__ = ["check_model_files", "check_safetensors", "check_hub_model"]

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
HUB_TIMEOUT_S = 3.0


def check_safetensors(path: Path, label: str) -> None:
    """Parse a safetensors header (8-byte little-endian length, then JSON) and check the file holds every tensor it lists."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise InputError(f"{label} {path.name} is truncated ({size} bytes, shorter than a safetensors header)")
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise InputError(f"{label} {path.name} is truncated or corrupt: its header claims {length} bytes, the file has {size}")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{label} {path.name} has a corrupt safetensors header ({error}); re-download or re-save the model") from error
    if not isinstance(header, dict):
        raise InputError(f"{label} {path.name} has a corrupt safetensors header (not a JSON object)")
    try:
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError) as error:
        raise InputError(f"{label} {path.name} has a corrupt safetensors header (bad data_offsets)") from error
    if 8 + length + end > size:
        raise InputError(f"{label} {path.name} is truncated: its tensors need {8 + length + end} bytes, the file has {size}")


def _shards(directory: Path, index_name: str, label: str) -> list[Path]:
    try:
        weight_map = json.loads((directory / index_name).read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{label} {index_name} is not a valid shard index (no weight_map)") from error
    missing = [name for name in names if not (directory / name).is_file()]
    if missing:
        raise InputError(f"{label} is missing the shard {missing[0]} named by {index_name}")
    return [directory / name for name in names]


def _check_directory(directory: Path, label: str) -> None:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{label} config.json is not valid JSON ({error}); pass a Hugging Face model directory") from error
    if not isinstance(config, dict):
        raise InputError(f"{label} config.json is not a JSON object; pass a Hugging Face model directory")
    if (directory / SAFETENSORS_INDEX).is_file():
        files = _shards(directory, SAFETENSORS_INDEX, label)
    elif (directory / SAFETENSORS).is_file():
        files = [directory / SAFETENSORS]
    elif (directory / BIN_INDEX).is_file() or (directory / BIN).is_file():
        files = _shards(directory, BIN_INDEX, label) if (directory / BIN_INDEX).is_file() else [directory / BIN]
        for path in files:
            if not zipfile.is_zipfile(path):
                raise InputError(f"{label} {path.name} is not a PyTorch weight archive (truncated or corrupt); re-save the model")
        return
    else:
        raise InputError(f"{label} has a config.json but no weights ({SAFETENSORS} or {BIN}); save the model with save_pretrained")
    for path in files:
        check_safetensors(path, label)


def _hub_reachable() -> bool:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def check_hub_model(name: str) -> None:
    """A Hub id must be cached or the Hub reachable; offline, a cached model loads without network retries."""
    from huggingface_hub import constants, try_to_load_from_cache

    if _hub_reachable():
        return
    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise InputError(
            f"model {name!r} is not a local path, not in the Hugging Face cache, and the Hub cannot be reached; "
            "pass a local model directory or connect"
        )
    os.environ["HF_HUB_OFFLINE"] = "1"  # the cached files load at once instead of after retries
    constants.HF_HUB_OFFLINE = True


def check_model_files(name: str) -> None:
    """Check what ``from_pretrained`` will read for ``name`` ('demo', a directory, a .gguf file or a Hub id), without loading it."""
    from lightning_prune.model.loading import resolve_model_source

    source = resolve_model_source(name)
    label = f"model {name!r}:"
    if name == "demo":
        return
    if source.gguf_file:
        with (Path(source.name_or_path) / source.gguf_file).open("rb") as handle:
            if handle.read(4) != b"GGUF":
                raise InputError(f"model {name!r} is not a GGUF file (no GGUF magic); pass a .gguf model file")
        return
    if Path(source.name_or_path).expanduser().is_dir():
        _check_directory(Path(source.name_or_path).expanduser(), label)
        return
    check_hub_model(name)
