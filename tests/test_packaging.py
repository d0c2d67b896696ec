"""The wheel installs ``callbacks/`` and ``configs/`` inside the package, and no top-level ``callbacks``."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def source_files() -> set[str]:
    """Installed paths the repository's package sources should produce."""
    mapping = {
        "lightning_prune": ROOT / "lightning_prune",
        "lightning_prune/callbacks": ROOT / "callbacks",
        "lightning_prune/recipes": ROOT / "configs",
    }
    files = set()
    for target, source in mapping.items():
        pattern = "*.py" if target != "lightning_prune/recipes" else "*"
        for path in source.rglob(pattern):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".yaml"):
                files.add(f"{target}/{path.relative_to(source).as_posix()}")
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return zipfile.ZipFile(next(out.glob("lightning_prune-*.whl")))


def test_wheel_holds_every_module_recipe_and_corpus(wheel):
    names = set(wheel.namelist())
    missing = sorted(source_files() - names)
    assert not missing, f"not in the wheel: {missing[:5]}"
    assert "lightning_prune/callbacks/stage.py" in names and "lightning_prune/recipes/prune_heal.yaml" in names
    assert "lightning_prune/recipes/pieces/lora.yaml" in names
    corpora = {
        f"lightning_prune/{p.relative_to(ROOT / 'lightning_prune').as_posix()}"
        for p in (ROOT / "lightning_prune" / "data" / "corpora").rglob("*")
        if p.is_file()
    }
    assert corpora and corpora <= names
    assert not any(name.startswith(("callbacks/", "configs/", "tests/")) for name in names)


def test_editable_install_maps_callbacks_and_recipes():
    import lightning_prune.callbacks as callbacks
    import lightning_prune.recipes as recipes

    assert Path(callbacks.__file__).parent == ROOT / "callbacks"
    assert Path(recipes.__file__).parent == ROOT / "configs"
    assert "prune_heal" in recipes.recipe_names()
