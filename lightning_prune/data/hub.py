"""Hugging Face Hub datasets named as ``owner/name[:config][@split][#field]``.

``allenai/c4:en@validation#text`` is the ``validation`` split of the ``en`` configuration,
text column ``text``. Without ``@split`` a command reads the split it needs (``validation``
for calibration, ``test`` for evaluation); without ``#field`` the column is ``text``. The spec
is parsed (and a malformed one refused) before any weight loads; the dataset itself loads
through ``datasets.load_dataset``, so an offline machine reads it from the local cache.
"""

import difflib
import re
from dataclasses import dataclass

from lightning_prune.errors import InputError

__all__ = ["HubDataset", "parse_hub_spec", "read_hub_text", "closest_name"]

_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PART = re.compile(r"^[\w.\-]+$")


@dataclass(frozen=True)
class HubDataset:
    """A parsed Hub dataset spec."""

    name: str
    config: str | None = None
    split: str | None = None
    field: str = "text"

    def __str__(self) -> str:
        return self.name + (f":{self.config}" if self.config else "") + (f"@{self.split}" if self.split else "") + f"#{self.field}"


def closest_name(value: str, names: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``names``, or an empty string."""
    matches = difflib.get_close_matches(value.lower(), names, n=1, cutoff=0.5)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def parse_hub_spec(spec: str, bundled: list[str]) -> HubDataset:
    """Parse ``owner/name[:config][@split][#field]``; anything else is refused naming the closest bundled source."""
    rest, has_field, field = spec.partition("#")
    rest, has_split, split = rest.partition("@")
    name, has_config, config = rest.partition(":")
    parts = [part for part, separator in ((config, has_config), (split, has_split), (field, has_field)) if separator]
    if not _NAME.match(name) or not all(_PART.match(part) for part in parts):
        raise InputError(
            f"data {spec!r} is not a bundled source{closest_name(name, bundled)}, an existing file, "
            f"or a Hub dataset owner/name[:config][@split][#field]; bundled: {', '.join(bundled)}"
        )
    return HubDataset(name, config or None, split or None, field or "text")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_hub_text(dataset: HubDataset, split: str) -> str:
    """The ``field`` column of the dataset's split (the spec's ``@split`` wins over ``split``), joined by blank lines."""
    import datasets

    chosen = dataset.split or split
    try:
        rows = datasets.load_dataset(dataset.name, dataset.config, split=chosen)
    except Exception as error:
        raise InputError(f"could not load dataset {str(dataset)!r} (split {chosen!r}): {_first_line(error)}") from error
    if dataset.field not in rows.column_names:
        raise InputError(f"dataset {dataset.name!r} has no {dataset.field!r} column; columns: {', '.join(rows.column_names)}")
    texts = [text for text in rows[dataset.field] if isinstance(text, str)]
    if not texts:
        raise InputError(f"dataset {str(dataset)!r} has no text in column {dataset.field!r} of split {chosen!r}")
    return "\n\n".join(texts)
