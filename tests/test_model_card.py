"""``model/README.md``: a Hub model card written with every saved model."""

import json

import torch
import yaml
from conftest import random_ids, run_cli
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from lightning_prune.model_card import CardInfo, command_line, hub_base_model, model_card


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert ModelCard(card).data.to_dict() == meta  # huggingface_hub reads the same metadata
    return meta


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


def test_merge_and_apply_cards(tiny_dir, tmp_path, capsys):
    merged = tmp_path / "merge"
    options = ["--seq_len", 16, "--calibration_samples", 4, "--batch_size", 4]
    code, _, err = run_cli(capsys, "merge", "--model", tiny_dir, "--num_layers", 1, *options, "--output_dir", merged)
    assert code == 0, err
    card = (merged / "model" / "README.md").read_text()
    assert _front_matter(card)["tags"] == ["lightning-prune", "merged"]
    assert "1. merge: 6 -> 5 layers, merged groups" in card and "- calibration: wikitext2 (validation split), 4 blocks of 16 tokens" in card

    plan = tmp_path / "plan"
    code, _, err = run_cli(capsys, "prune", "--model", tiny_dir, "--layers", "4", "--output_dir", plan, "--dry_run", "true")
    assert code == 0, err
    assert not (plan / "model").exists()  # a dry run saves no model, so no card
    applied = tmp_path / "applied"
    code, _, err = run_cli(capsys, "apply", "--plan", plan / "decisions.json", "--model", tiny_dir, "--output_dir", applied)
    assert code == 0, err
    card = (applied / "model" / "README.md").read_text()
    assert "1. prune: remove layers [4]" in card and f"lightning-prune apply \\\n  --plan {plan / 'decisions.json'}" in card
    assert "| decoder layers | 6 | 5 |" in card
