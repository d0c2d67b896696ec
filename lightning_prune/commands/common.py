"""Pieces every command shares: checked model loading, evaluation blocks, run settings."""

from collections.abc import Iterable

import torch

from lightning_prune.data.tasks import is_task
from lightning_prune.data.text import NAMED_CORPORA, corpus_file, data_key, load_blocks, local_data_file
from lightning_prune.errors import InputError
from lightning_prune.evaluation.perplexity import perplexity
from lightning_prune.model.loading import load_config, load_model
from lightning_prune.results import model_summary, package_versions

__all__ = ["parse_indices", "split_names", "load_checked_model", "check_seq_len", "data_location", "EvaluationData", "run_record"]


def split_names(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` → ``["a", "b"]`` (empty entries dropped)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if str(item).strip()]


def parse_indices(value: str | int | list[int] | tuple[int, ...], what: str = "layers") -> list[int]:
    """``"12,13"`` / ``12`` / ``[12, 13]`` → ``[12, 13]``; non-integers are an :class:`InputError`."""
    items = [value] if isinstance(value, int) else split_names(value) if isinstance(value, str) else list(value)
    try:
        return [int(item) for item in items]
    except (TypeError, ValueError) as error:
        raise InputError(f"--{what} takes comma-separated integers such as 12,13; got {value!r}") from error


def check_seq_len(seq_len: int, config) -> None:
    """``seq_len`` must be positive and within the model's context length."""
    limit = getattr(config, "max_position_embeddings", None)
    if seq_len <= 0:
        raise InputError(f"seq_len must be a positive number of tokens, got {seq_len}")
    if limit is not None and seq_len > limit:
        raise InputError(f"seq_len={seq_len} exceeds the model's maximum of {limit} positions; use 1..{limit}")


def load_checked_model(model: str, *, dtype: str, device: str, seq_len: int | None = None, data: Iterable[str] = ()):
    """Validate the model name, ``seq_len`` against it and the local ``data`` files before loading weights.

    ``data`` lists text sources (shortcuts, files, dataset names); bundled task names are skipped.
    """
    config = load_config(model)
    if seq_len is not None:
        check_seq_len(seq_len, config)
    for source in data:
        if not is_task(source):
            local_data_file(source)
    return load_model(model, dtype=dtype, device=torch.device(device))


def data_location(source: str, split: str) -> str:
    """What to record as the data file: the bundled file for a shortcut, else the name given."""
    return str(corpus_file(source, split).relative_to(corpus_file(source, split).parents[1])) if source in NAMED_CORPORA else source


class EvaluationData:
    """Evaluation blocks for one or more sources, tokenized once and reused before/after a change."""

    def __init__(self, tokenizer, sources: list[str], *, seq_len: int, num_samples: int, split: str = "test"):
        if not sources:
            raise InputError("--data names no data; pass wikitext2, c4 or a text/jsonl file")
        self.split = split
        self.blocks = {
            data_key(source): load_blocks(tokenizer, source, split=split, seq_len=seq_len, num_samples=num_samples)
            for source in sources
        }
        self.files = {data_key(source): data_location(source, split) for source in sources}

    def evaluate(self, model, *, batch_size: int) -> dict:
        """Perplexity per source plus layer and parameter counts."""
        scores = {key: perplexity(model, blocks, batch_size=batch_size, desc=f"perplexity {key}") for key, blocks in self.blocks.items()}
        return {"perplexity": scores, **model_summary(model)}


def run_record(settings: dict, **values) -> dict:
    """A ``metrics.json`` body: measured values, then every setting and package versions.

    ``seed`` is always recorded; ``None`` means the run drew nothing at random (evaluation
    takes the first blocks of a split).
    """
    return {**values, "settings": {"seed": None, **settings}, "versions": package_versions()}
