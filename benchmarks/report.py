"""Shared by the benchmarks: marked sections of ``docs/results/<topic>.md``, assembled into ``docs/results.md``.

Each script owns named sections (``<!-- name -->`` … ``<!-- /name -->``) of one topic file and
rewrites only those, so hand-written findings around them survive a rerun. After every write the
topic files are joined, in ``TOPICS`` order under ``INTRO``, into ``docs/results.md``.
"""

import re
from pathlib import Path

__all__ = ["ROOT", "TOPICS", "topic_doc", "update_section", "remove_section", "write_topic", "assemble"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "docs" / "results"
RESULTS_DOC = ROOT / "docs" / "results.md"
TOPICS = {
    "pruning": "Layer pruning and compensation on SmolLM2-135M",
    "merging": "Layer merging (CoMe) and merged-layer distillation",
    "sparsity": "Non-uniform layerwise sparsity",
    "healing": "Healing after pruning",
    "usability": "Command-line start-up",
    "peers": "Against the tools users would pick instead",
    "scale": "Memory and scale (onloading)",
}
INTRO = """# Results

Measured on the embedded SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32) on a 2-core
CPU shared with other jobs, by the scripts in `benchmarks/` (JSON in `benchmarks/results/`;
each script rewrites its own sections in `docs/results/<topic>.md`, and `benchmarks/report.py`
assembles them here). Most grids run at reduced sizes to fit that CPU; each section states its
sizes and commands. Dense reference: `lightning-prune evaluate --model demo --eval_data wikitext2
--seq_len 128 --eval_samples 64` gives perplexity 63.28 (sections that evaluate on fewer blocks
report their own dense value). C4 figures recorded before 2026-12-02 evaluated on the whole
bundled C4 file, which calibration also drew from; since then C4 evaluation uses its last 500
documents and calibration its first 500.

Sections: [pruning and compensation](results/pruning.md) · [CoMe merging and distillation](results/merging.md) ·
[DLP/OWL sparsity](results/sparsity.md) · [LoRA/QLoRA healing](results/healing.md) · [start-up](results/usability.md) ·
[against peers](results/peers.md) · [memory and scale](results/scale.md)
"""


def topic_doc(topic: str) -> Path:
    """``docs/results/<topic>.md``; the topic must be one of ``TOPICS``."""
    if topic not in TOPICS:
        raise ValueError(f"unknown results topic {topic!r}; choose one of {', '.join(TOPICS)}")
    return RESULTS_DIR / f"{topic}.md"


def _pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(f"<!-- {name} -->") + r".*?" + re.escape(f"<!-- /{name} -->") + r"\n*", re.S)


def update_section(topic: str, name: str, text: str) -> None:
    """Replace (or append) the block between ``<!-- name -->`` markers in the topic's file."""
    path = topic_doc(topic)
    block = f"<!-- {name} -->\n{text.strip()}\n<!-- /{name} -->\n"
    current = path.read_text(encoding="utf-8") if path.exists() else f"# {TOPICS[topic]}\n\n"
    pattern = _pattern(name)
    updated = pattern.sub(lambda _: block + "\n", current) if pattern.search(current) else current.rstrip() + "\n\n" + block
    write_topic(topic, updated)


def remove_section(topic: str, name: str) -> None:
    """Delete the block between ``<!-- name -->`` markers, if present."""
    path = topic_doc(topic)
    if path.exists():
        write_topic(topic, _pattern(name).sub("", path.read_text(encoding="utf-8")))


def write_topic(topic: str, text: str) -> None:
    """Write a whole topic file, then reassemble ``docs/results.md``."""
    path = topic_doc(topic)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n", encoding="utf-8")
    assemble()


def assemble() -> None:
    """``docs/results.md`` = ``INTRO`` + every topic file that exists, separated by rules."""
    parts = [INTRO.strip()] + [topic_doc(t).read_text(encoding="utf-8").strip() for t in TOPICS if topic_doc(t).exists()]
    RESULTS_DOC.write_text("\n\n---\n\n".join(parts) + "\n", encoding="utf-8")


if __name__ == "__main__":
    assemble()
