"""Text sources → fixed-length token blocks.

A source is a bundled corpus (``wikitext2``, ``c4``), a text/jsonl file, or a Hub dataset
``owner/name[:config][@split][#field]`` (:mod:`lightning_prune.data.hub`). The bundled C4
file holds 1,000 documents: the first 500 are its validation split (calibration), the last
500 its test split (evaluation), so calibration and evaluation text never overlap.

Convention (shared by evaluation and calibration): take the split's text as it is in the
file (jsonl: the ``text`` fields joined by blank lines), tokenize it once without special
tokens, cut non-overlapping ``seq_len`` blocks from the start. Evaluation uses the first
``num_samples`` blocks; calibration draws ``num_samples`` distinct blocks with a seeded
generator.
"""

import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch

from lightning_prune.data.hub import parse_hub_spec, read_hub_text
from lightning_prune.errors import InputError, MissingInputError

__all__ = ["NAMED_CORPORA", "SPLITS", "corpus_file", "data_key", "iter_jsonl", "read_text", "tokenize_text", "token_blocks", "load_blocks"]

SPLITS = ("test", "validation")
_C4 = "c4/c4-train.00000-of-01024.first1000.jsonl"
NAMED_CORPORA = {
    "wikitext2": {"test": "wikitext-2-raw/wiki.test.raw", "validation": "wikitext-2-raw/wiki.valid.raw"},
    "c4": {"test": _C4, "validation": _C4},
}
# Documents (jsonl lines) of a bundled file that form a split, where two splits share a file.
CORPUS_RECORDS = {("c4", "validation"): (0, 500), ("c4", "test"): (500, 1000)}
_FILE_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".md")


def corpus_file(name: str, split: str) -> Path:
    """Path of a bundled corpus file (``wikitext2`` or ``c4``) for ``split`` (test / validation)."""
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not known; choose one of {', '.join(SPLITS)}")
    return Path(str(resources.files("lightning_prune.data") / "corpora" / NAMED_CORPORA[name][split]))


def data_key(source: str) -> str:
    """The name results are reported under: the shortcut name, a file's stem, or a Hub dataset's name."""
    if source in NAMED_CORPORA:
        return source
    if not Path(source).expanduser().exists() and "/" in source and not source.startswith(("/", ".", "~")):
        return source.partition(":")[0].partition("@")[0].partition("#")[0].rsplit("/", 1)[-1]
    return Path(source).stem or source


def iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield ``("file:line", record)`` for each non-blank line of a jsonl file."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{number} is not valid JSON ({error.msg}); expected one object per line") from error
            if not isinstance(record, dict):
                raise InputError(f"{path}:{number} is not a JSON object; expected one object per line")
            yield f"{path}:{number}", record


def _read_jsonl(path: Path, field: str, records: tuple[int, int] | None = None) -> str:
    """The ``field`` strings of a jsonl file (only documents ``records[0]:records[1]`` if given), joined by blank lines."""
    texts = []
    for index, (where, record) in enumerate(iter_jsonl(path)):
        if records is not None and not records[0] <= index < records[1]:
            continue
        if field not in record:
            raise InputError(f"{where} has no {field!r} field; each line needs a {field!r} string")
        texts.append(str(record[field]))
    return "\n\n".join(texts)


def local_data_file(source: str, split: str = "test") -> Path | None:
    """The file behind a data source (``None`` for a Hub dataset spec).

    Raises at once for a path that does not exist, a directory, an empty file, or a name that
    is none of these nor a well-formed Hub spec, so a command can check its data before it
    loads any weights.
    """
    if source in NAMED_CORPORA:
        return corpus_file(source, split)
    path = Path(source).expanduser()
    if not path.exists():
        if source.startswith(("/", ".", "~")) or path.suffix in _FILE_SUFFIXES:
            raise MissingInputError(f"data file {source!r} does not exist; pass a text/jsonl file or one of {', '.join(NAMED_CORPORA)}")
        parse_hub_spec(source, list(NAMED_CORPORA))
        return None
    if path.is_dir():
        raise InputError(f"data path {source!r} is a directory; pass a text or jsonl file")
    if path.stat().st_size == 0:
        raise InputError(f"data file {source!r} is empty; pass a file with text in it")
    return path


def read_text(source: str, split: str = "test", *, text_field: str = "text") -> str:
    """Read the raw text of a shortcut, a text/jsonl file, or a Hugging Face dataset name."""
    path = local_data_file(source, split)
    if path is None:
        return read_hub_text(parse_hub_spec(source, list(NAMED_CORPORA)), split)
    records = CORPUS_RECORDS.get((source, split))
    text = _read_jsonl(path, text_field, records) if path.suffix == ".jsonl" else path.read_text(encoding="utf-8")
    if not text.strip():
        raise InputError(f"data file {source!r} is empty; pass a file with text in it")
    return text


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids (1-D) of the whole text, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(
    ids: torch.Tensor,
    seq_len: int,
    num_samples: int | None = None,
    *,
    seed: int | None = None,
    source: str = "data",
    option: str = "num_samples",
) -> torch.Tensor:
    """Cut ``ids`` into non-overlapping blocks, shape (num_samples, seq_len).

    Args:
        ids: 1-D token ids.
        seq_len: tokens per block.
        num_samples: blocks to return (default: all).
        seed: ``None`` takes the first blocks; an int draws distinct blocks at random with it.
        source: name used in error messages.
        option: the user's name for ``num_samples`` in error messages.
    """
    if seq_len <= 0:
        raise InputError(f"seq_len must be a positive number of tokens, got {seq_len}")
    available = ids.numel() // seq_len
    if available == 0:
        raise InputError(f"{source} has {ids.numel()} tokens, fewer than one block of seq_len={seq_len}")
    if num_samples is None:
        num_samples = available
    if num_samples <= 0:
        raise InputError(f"{option} must be positive, got {num_samples}")
    if num_samples > available:
        raise InputError(
            f"{option}={num_samples} is more than {source} yields: {available} blocks of {seq_len} tokens; "
            f"use {option} <= {available} or a shorter seq_len"
        )
    blocks = ids[: available * seq_len].view(available, seq_len)
    if seed is None:
        return blocks[:num_samples].clone()
    generator = torch.Generator().manual_seed(seed)
    return blocks[torch.randperm(available, generator=generator)[:num_samples]].clone()


def load_blocks(
    tokenizer,
    source: str,
    *,
    split: str,
    seq_len: int,
    num_samples: int | None,
    seed: int | None = None,
    option: str = "num_samples",
) -> torch.Tensor:
    """Read, tokenize and cut a data source in one call (see :func:`token_blocks`)."""
    ids = tokenize_text(tokenizer, read_text(source, split))
    return token_blocks(ids, seq_len, num_samples, seed=seed, source=repr(source), option=option)
