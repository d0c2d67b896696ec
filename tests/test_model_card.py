"""``model/README.md``: a Hub model card written with every saved model."""

import json

import torch
import yaml
from conftest import random_ids, run_cli
from transformers import AutoModelForCausalLM

from lightning_prune.model_card import CardInfo, command_line, hub_base_model, model_card


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_prune_writes_a_card_naming_the_removed_layers_and_metrics(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "prune", "--model", tiny_dir, "--layers", "3,1", "--seq_len", 32, "--output_dir", out)
    assert code == 0, err
    card = (out / "model" / "README.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["lightning-prune", "pruned"]
    assert "base_model" not in meta  # a local directory is no Hub id
    assert "prune: remove layers [3, 1]" in card
    assert '"removed_layers": [\n  3,\n  1\n ]' in card
    before, after = metrics["before"]["perplexity"]["wikitext2"], metrics["after"]["perplexity"]["wikitext2"]
    assert f"| perplexity (wikitext2) | {before:.3f} | {after:.3f} |" in card
    assert "| decoder layers | 6 | 4 |" in card
    assert f"| parameters | {metrics['before']['num_parameters']:,} | {metrics['after']['num_parameters']:,} |" in card
    assert f"| weight bytes | {metrics['before']['num_bytes']:,} | {metrics['after']['num_bytes']:,} |" in card
    assert f"lightning-prune prune \\\n  --model {tiny_dir}" in card and "--layers 3,1" in card and "--seq_len 32" in card
    assert "wikitext2 (test split), 64 blocks of 32 tokens" in card
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")  # the card does not disturb loading
    assert reloaded.config.num_hidden_layers == 4
    assert torch.isfinite(reloaded(random_ids()).logits).all()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the staged directory was renamed


def test_card_front_matter_names_a_hub_base_model():
    assert hub_base_model("demo") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert hub_base_model("./models/x") is None and hub_base_model("/a/b") is None and hub_base_model("m.gguf") is None
    card = model_card(CardInfo(model="Qwen/Qwen3-0.6B", decisions=[]))
    assert _front_matter(card)["base_model"] == "Qwen/Qwen3-0.6B"
    assert "None (the base model's weights)." in card


def test_command_line_quotes_values_with_spaces_and_drops_unset_options():
    text = command_line("sparsify", {"model": "a b", "structure": None, "overwrite": False, "layers": [3, 1]})
    assert text == "lightning-prune sparsify \\\n  --model 'a b' \\\n  --overwrite false \\\n  --layers 3,1"
