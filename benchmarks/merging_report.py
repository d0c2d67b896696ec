"""Shared by the merging benchmarks: replace one marked section of ``docs/results/merging.md``."""

from pathlib import Path

__all__ = ["MERGING_DOC", "write_section"]

MERGING_DOC = Path(__file__).resolve().parents[1] / "docs" / "results" / "merging.md"


def write_section(name: str, markdown: str, path: Path = MERGING_DOC) -> None:
    """Put ``markdown`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended if absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Layer merging (CoMe) and merged-layer distillation\n"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
