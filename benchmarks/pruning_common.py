"""Helpers shared by the pruning benchmarks: keep named sections of docs/results/pruning.md up to date."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results" / "pruning.md"


def _pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(f"<!-- {name} -->") + r".*?" + re.escape(f"<!-- /{name} -->") + r"\n*", re.S)


def remove_section(name: str, path: Path = DOC) -> None:
    """Delete the block between ``<!-- name -->`` markers, if present."""
    if path.exists():
        path.write_text(_pattern(name).sub("", path.read_text(encoding="utf-8")), encoding="utf-8")


def update_section(name: str, text: str, path: Path = DOC) -> None:
    """Replace (or append) the block between ``<!-- name -->`` markers in the markdown file."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{text.strip()}\n{end}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    current = path.read_text(encoding="utf-8") if path.exists() else "# Layer pruning and compensation on SmolLM2-135M\n\n"
    pattern = _pattern(name)
    updated = pattern.sub(lambda _: block + "\n", current) if pattern.search(current) else current.rstrip() + "\n\n" + block
    path.write_text(updated, encoding="utf-8")
