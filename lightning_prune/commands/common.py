"""Pieces every command shares: checked model loading, evaluation blocks, run settings."""

from collections.abc import Iterable
from pathlib import Path

from lightning_prune.data.tasks import is_task
from lightning_prune.data.text import local_data_file
from lightning_prune.errors import InputError
from lightning_prune.evaluation.suite import EvaluationData, data_location, split_names
from lightning_prune.model.loading import (
    DTYPES,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_source,
    sparse_export,
)
from lightning_prune.onload import LayerOnloader, check_device_memory, check_onload
from lightning_prune.results import package_versions
from lightning_prune.stages.prune import parse_indices

__all__ = ["parse_indices", "split_names", "load_checked_model", "check_seq_len", "data_location", "EvaluationData", "run_record"]


def check_seq_len(seq_len: int, config) -> None:
    """``seq_len`` must be positive and within the model's context length."""
    limit = getattr(config, "max_position_embeddings", None)
    if seq_len <= 0:
        raise InputError(f"seq_len must be a positive number of tokens, got {seq_len}")
    if limit is not None and seq_len > limit:
        raise InputError(f"seq_len={seq_len} exceeds the model's maximum of {limit} positions; use 1..{limit}")


def load_checked_model(
    model: str,
    *,
    dtype: str,
    device: str,
    seq_len: int | None = None,
    data: Iterable[str] = (),
    onload: str = "none",
    offload_dir: str | None = None,
    max_device_memory: str | None = None,
):
    """Validate the model name, ``seq_len`` against it and the local ``data`` files before loading weights.

    ``data`` lists text sources (shortcuts, files, dataset names); bundled task names are skipped.
    With ``onload: layer`` the model comes back with a :class:`~lightning_prune.onload.LayerOnloader`
    attached (release it with :func:`~lightning_prune.onload.finish_onload`): a local safetensors
    checkpoint with an ``offload_dir`` is streamed (its layers never enter host memory); any other
    source is loaded into host memory first, then its layers are offloaded.
    """
    config = load_config(model)
    if seq_len is not None:
        check_seq_len(seq_len, config)
    for source in data:
        if not is_task(source):
            local_data_file(source)
    check_onload(onload, offload_dir)
    target = resolve_device(device)
    dtype = resolve_dtype(dtype, target)
    check_device_memory(config, DTYPES[dtype], onload, max_device_memory)
    if onload == "none":
        return load_model(model, dtype=dtype, device=target)
    source = resolve_model_source(model)
    if offload_dir and not source.gguf_file and Path(source.name_or_path).is_dir() and not sparse_export(config):
        from lightning_prune.model.streaming import load_streaming, safetensors_files

        if safetensors_files(source.name_or_path):
            lm, _ = load_streaming(source.name_or_path, config, DTYPES[dtype], target, offload_dir)
            return lm, load_tokenizer(model)
    lm, tokenizer = load_model(model, dtype=dtype, device="cpu")
    LayerOnloader(lm, target, offload_dir).attach()
    return lm, tokenizer


def run_record(settings: dict, **values) -> dict:
    """A ``metrics.json`` body: measured values, then every setting and package versions.

    ``seed`` is always recorded; ``None`` means the run drew nothing at random (evaluation
    takes the first blocks of a split).
    """
    return {**values, "settings": {"seed": None, **settings}, "versions": package_versions()}
