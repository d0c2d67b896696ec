"""Data sources: Hub dataset specs, typos refused before any weight loads, disjoint bundled C4 splits."""

import datasets
import pytest
from conftest import assert_one_line_error, run_cli

from lightning_prune.data.hub import HubDataset, parse_hub_spec
from lightning_prune.data.text import corpus_file, data_key, iter_jsonl, read_text
from lightning_prune.errors import InputError

BUNDLED = ["wikitext2", "c4"]


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("allenai/c4", HubDataset("allenai/c4")),
        ("allenai/c4:en", HubDataset("allenai/c4", "en")),
        ("Salesforce/wikitext:wikitext-2-raw-v1@test", HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "test")),
        ("me/notes@train#content", HubDataset("me/notes", None, "train", "content")),
        ("me/notes#body", HubDataset("me/notes", field="body")),
    ],
)
def test_hub_specs_parse(spec, parsed):
    assert parse_hub_spec(spec, BUNDLED) == parsed


@pytest.mark.parametrize(
    "spec, hint",
    [
        ("wikitext", "did you mean 'wikitext2'?"),
        ("C4", "did you mean 'c4'?"),
        ("owner/name:", "owner/name[:config][@split][#field]"),
        ("owner/na me", "owner/name[:config][@split][#field]"),
        ("owner/name@", "owner/name[:config][@split][#field]"),
    ],
)
def test_malformed_specs_are_refused_with_the_closest_bundled_name(spec, hint):
    with pytest.raises(InputError, match="is not a bundled source") as error:
        parse_hub_spec(spec, BUNDLED)
    assert hint in str(error.value)


def test_a_data_typo_fails_in_one_line_before_the_model_loads(capsys, tmp_path):
    code, _, err = run_cli(capsys, "prune", "--layers", "1", "--calibration_data", "wikitxt2", "--output_dir", tmp_path / "p")
    assert_one_line_error(code, err, "did you mean 'wikitext2'?")
    assert not (tmp_path / "p").exists()


def test_hub_spec_reaches_load_dataset_with_config_split_and_field(monkeypatch):
    calls = []

    def load_dataset(name, config=None, *, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"body": ["first text", None, "second text"], "text": ["x", "y", "z"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert read_text("me/notes:en#body", "validation") == "first text\n\nsecond text"
    assert read_text("me/notes@train", "test") == "x\n\ny\n\nz"
    assert calls == [("me/notes", "en", "validation"), ("me/notes", None, "train")]
    assert data_key("me/notes:en@train#body") == "notes"
    with pytest.raises(InputError, match="has no 'missing' column; columns: body, text"):
        read_text("me/notes#missing", "test")


def test_a_bad_config_or_split_is_one_line_naming_what_datasets_offers(monkeypatch):
    def load_dataset(name, config=None, *, split):
        raise ValueError(f"Unknown split \"{split}\". Should be one of ['train', 'validation'].\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(InputError) as error:
        read_text("me/notes@tset", "test")
    assert str(error.value) == (
        "could not load dataset 'me/notes@tset#text' (split 'tset'): Unknown split \"tset\". Should be one of ['train', 'validation']."
    )


def test_bundled_c4_validation_and_test_are_disjoint_halves():
    documents = [record["text"] for _, record in iter_jsonl(corpus_file("c4", "test"))]
    assert len(documents) == 1000
    assert read_text("c4", "validation") == "\n\n".join(documents[:500])
    assert read_text("c4", "test") == "\n\n".join(documents[500:])
