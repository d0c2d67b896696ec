"""Multiple-choice tasks from local jsonl files (``query``, ``choices``, ``gold`` per line).

The bundled files (``arc_easy``, ``piqa``, ``boolq``) follow the lm-eval document format:
the context is ``query`` and each continuation is ``" " + choice`` (target delimiter),
so accuracies computed here follow the lm-eval loglikelihood protocol (002 App. C.1).
"""

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from lightning_prune.data.text import iter_jsonl
from lightning_prune.errors import InputError, MissingInputError

__all__ = [
    "TASK_NAMES",
    "MultipleChoiceItem",
    "EncodedItem",
    "task_file",
    "load_task",
    "encode_items",
    "chance_accuracy",
    "task_text",
    "is_task",
]

TASK_NAMES = ("arc_easy", "piqa", "boolq")
TARGET_DELIMITER = " "


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question: context ``query``, answer options ``choices``, index ``gold`` of the right one."""

    query: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class EncodedItem:
    """Token ids of one item: ``context`` (1-D), one continuation per choice, choice lengths in characters."""

    context: torch.Tensor
    continuations: tuple[torch.Tensor, ...]
    choice_chars: tuple[int, ...]
    gold: int


def task_file(name_or_path: str) -> Path:
    """Bundled file for a task name, or the given path (which must exist)."""
    if name_or_path in TASK_NAMES:
        return Path(str(resources.files("lightning_prune.data") / "corpora" / "tasks" / f"{name_or_path}.jsonl"))
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise MissingInputError(f"task {name_or_path!r} is neither a bundled task ({', '.join(TASK_NAMES)}) nor a jsonl file")
    return path


def _parse_item(record, where: str) -> MultipleChoiceItem:
    missing = [key for key in ("query", "choices", "gold") if key not in record]
    if missing:
        raise InputError(f"{where} lacks field {missing[0]!r}; each line needs 'query', 'choices' and 'gold'")
    choices = record["choices"]
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise InputError(f"{where} has empty or non-text 'choices'; give a non-empty list of strings")
    gold = record["gold"]
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise InputError(f"{where} has gold={gold!r}; it must be an index 0..{len(choices) - 1} into 'choices'")
    return MultipleChoiceItem(str(record["query"]), tuple(choices), gold)


def load_task(path_or_name: str, limit: int | None = None) -> list[MultipleChoiceItem]:
    """Read a task (bundled name or jsonl path); ``limit`` keeps the first items."""
    path = task_file(path_or_name)
    items = []
    for where, record in iter_jsonl(path):
        items.append(_parse_item(record, where))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise InputError(f"task file {str(path)!r} has no items; add lines with 'query', 'choices' and 'gold'")
    return items


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_items(tokenizer, items: list[MultipleChoiceItem]) -> list[EncodedItem]:
    """Tokenize as lm-eval does: continuation ids = ids(context + continuation)[len(ids(context)):]."""
    encoded = []
    for item in items:
        context = _ids(tokenizer, item.query)
        continuations = []
        for choice in item.choices:
            whole = _ids(tokenizer, item.query + TARGET_DELIMITER + choice)
            continuation = whole[len(context) :] or whole[-1:]
            continuations.append(torch.tensor(continuation, dtype=torch.long))
        encoded.append(
            EncodedItem(torch.tensor(context, dtype=torch.long), tuple(continuations), tuple(len(c) for c in item.choices), item.gold)
        )
    return encoded


def chance_accuracy(items: list[MultipleChoiceItem] | list[EncodedItem]) -> float:
    """Accuracy of a random predictor, r = mean over items of 1 / #choices (002 Eq. 3)."""
    counts = [len(item.choices) if isinstance(item, MultipleChoiceItem) else len(item.continuations) for item in items]
    return sum(1 / c for c in counts) / len(counts)


def task_text(items: list[MultipleChoiceItem]) -> str:
    """Plain text of a task (query and gold answer per item), for cosine metrics on the same data."""
    return "\n\n".join(item.query + TARGET_DELIMITER + item.choices[item.gold] for item in items)


def is_task(source: str) -> bool:
    """A bundled task name, or a jsonl file whose first record has a ``query`` field."""
    if source in TASK_NAMES:
        return True
    path = Path(source)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as handle:  # decoding is checked when the file is read
        first = next((line for line in handle if line.strip()), "")
    return '"query"' in first
