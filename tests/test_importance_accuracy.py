"""Accuracy relevance (002 Eq. 3) and multiple-choice task files."""

import dataclasses
import json

import pytest
import torch
from conftest import make_tiny_model, random_ids

from lightning_prune.data.tasks import TASK_NAMES, chance_accuracy, encode_items, load_task
from lightning_prune.errors import InputError, MissingInputError
from lightning_prune.importance import ScoringOptions, score_layers
from lightning_prune.importance.accuracy import (
    accuracy_data,
    break_ties,
    full_accuracy,
    largest_tie,
    relevance_from_accuracy,
)
from lightning_prune.importance.base import without_layers
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.pruning import prune_layers
from lightning_prune.selection import one_shot, protected_positions


def options(**kwargs) -> ScoringOptions:
    return ScoringOptions(**{"progress": False, "batch_size": 4, **kwargs})


def self_labelled_blocks(model, count: int = 8, length: int = 20) -> torch.Tensor:
    """Blocks whose last token is the full model's own top-1 guess: full accuracy is exactly 1."""
    blocks = random_ids(count, length, seed=5)
    with torch.no_grad():
        blocks[:, -1] = model(input_ids=blocks, use_cache=False).logits[:, -2].argmax(-1)
    return blocks


def self_labelled_items(model, tokenizer, count: int = 6):
    """The first ARC-Easy items with gold set to the full model's acc_norm pick."""
    encoded = encode_items(tokenizer, load_task("arc_easy", limit=count))
    picks = []
    for item in encoded:
        for gold in range(len(item.continuations)):
            candidate = accuracy_data([dataclasses.replace(item, gold=gold)], 1)
            with torch.no_grad():
                logits = candidate.select(model(input_ids=candidate.batches[0], use_cache=False).logits, 0).float()
            if candidate.correct(logits, 0) == 1.0:
                picks.append(dataclasses.replace(item, gold=gold))
                break
    return picks


def test_relevance_formula_and_refusal_at_chance():
    scores = relevance_from_accuracy(torch.tensor([0.5, 0.25, 0.8, 0.1]), 0.75, 0.25)
    assert torch.allclose(scores, torch.tensor([0.5, 1.0, -0.1, 1.0]))
    with pytest.raises(InputError, match="not above chance"):
        relevance_from_accuracy(torch.tensor([0.3]), 0.25, 0.25)


def test_last_token_relevance_is_one_minus_accuracy_without_the_layer():
    model = make_tiny_model("llama")
    blocks = self_labelled_blocks(model)
    assert full_accuracy(model, accuracy_data(blocks, 4), options()) == 1.0
    scores = score_layers(model, blocks, "accuracy", options(candidates=[1, 2, 3, 4]))
    with torch.no_grad(), without_layers(model, [2]):
        without = (model(input_ids=blocks, use_cache=False).logits[:, -2].argmax(-1) == blocks[:, -1]).float().mean()
    assert float(scores[2]) == pytest.approx(1 - float(without))
    assert torch.isnan(scores[[0, 5]]).all()


def test_accuracy_prefix_reuse_equals_naive_on_text_and_choices(tiny_tokenizer):
    model = make_tiny_model("qwen2_sliding")
    for data in (self_labelled_blocks(model), self_labelled_items(model, tiny_tokenizer)):
        fast = score_layers(model, data, "accuracy", options(candidates=[1, 2, 3, 4]))
        naive = score_layers(model, data, "accuracy", options(candidates=[1, 2, 3, 4], prefix_reuse=False))
        assert torch.equal(fast[1:5], naive[1:5])


def test_accuracy_iterative_picks_equal_naive(tiny_tokenizer):
    model = make_tiny_model("llama")
    blocks = self_labelled_blocks(model, count=12)
    picks = [
        prune_layers(
            make_tiny_model("llama"), blocks, metric="accuracy", selection="one_shot", num_layers=2, options=options(prefix_reuse=reuse)
        )["removed_layers"]
        for reuse in (True, False)
    ]
    assert picks[0] == picks[1]


def test_multiple_choice_accuracy_follows_acc_norm(tiny_tokenizer):
    model = make_tiny_model("llama")
    items = self_labelled_items(model, tiny_tokenizer)
    prepared = accuracy_data(items, 1)
    assert prepared.chance == pytest.approx(chance_accuracy(items))
    assert full_accuracy(model, prepared, options()) == 1.0
    item = items[0]
    with torch.no_grad():
        totals = []
        for continuation in item.continuations:
            ids = torch.cat([item.context, continuation])[None]
            logprobs = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
            positions = torch.arange(len(item.context) - 1, ids.shape[1] - 1)
            totals.append(float(logprobs[positions, ids[0, positions + 1]].sum()))
    normalised = [t / chars for t, chars in zip(totals, item.choice_chars)]
    assert max(range(len(normalised)), key=normalised.__getitem__) == item.gold


def test_bundled_tasks_load_and_encode(tiny_tokenizer):
    for name in TASK_NAMES:
        items = load_task(name, limit=5)
        assert len(items) == 5 and all(0 <= item.gold < len(item.choices) for item in items)
    assert len(load_task("piqa")) == 1838
    item = load_task("boolq", limit=1)[0]
    encoded = encode_items(tiny_tokenizer, [item])[0]
    whole = tiny_tokenizer(item.query + " " + item.choices[0], add_special_tokens=False)["input_ids"]
    assert torch.cat([encoded.context, encoded.continuations[0]]).tolist() == whole
    assert chance_accuracy([item]) == pytest.approx(1 / len(item.choices))


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"query": "q", "choices": ["a"]}], "lacks field 'gold'"),
        ([{"choices": ["a"], "gold": 0}], "lacks field 'query'"),
        ([{"query": "q", "choices": [], "gold": 0}], "empty or non-text 'choices'"),
        ([{"query": "q", "choices": ["a", "b"], "gold": 2}], "gold=2"),
        ([], "has no items"),
    ],
)
def test_bad_task_files_are_refused(tmp_path, lines, message):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(InputError, match=message):
        load_task(str(path))


def test_missing_task_names_the_bundled_ones():
    with pytest.raises(MissingInputError, match="arc_easy, piqa, boolq"):
        load_task("hellaswag")


def test_accuracy_refuses_items_without_choices():
    with pytest.raises(InputError, match="token blocks"):
        score_layers(make_tiny_model("llama"), [], "accuracy", options())


def test_break_ties_keeps_distinct_values_in_order_and_orders_ties_by_the_secondary_score():
    relevance = torch.tensor([0.0, 0.0, 0.5, 0.0, 1.0])
    secondary = torch.tensor([0.3, 0.1, 0.0, 0.2, 0.9])
    scores = break_ties(relevance, secondary)
    assert scores.argsort().tolist() == [1, 3, 0, 2, 4]
    assert float((scores - relevance).abs().max()) <= 0.1 * 0.5 + 1e-7
    assert torch.equal(break_ties(relevance, torch.zeros(5)), relevance)
    assert largest_tie(relevance) == 3 and largest_tie(torch.tensor([])) == 0


def nearly_identity_model(scale: float = 0.1):
    """Layer 4 returns its input; layers 1-3 write ``scale`` times their usual update."""
    model = make_tiny_model("llama")
    anatomy = Anatomy(model)
    with torch.no_grad():
        for position, factor in ((1, scale), (2, scale), (3, scale), (4, 0.0)):
            for role in ("o_proj", "down_proj"):
                anatomy.part(anatomy.layers[position], role).weight.mul_(factor)
    return model


def test_accuracy_ties_are_broken_by_block_influence_and_warned_about():
    model = nearly_identity_model()
    blocks = self_labelled_blocks(model, count=2)
    relevance = {}
    for layer in (1, 2, 3, 4):
        with torch.no_grad(), without_layers(model, [layer]):
            relevance[layer] = 1 - float(
                (model(input_ids=blocks, use_cache=False).logits[:, -2].argmax(-1) == blocks[:, -1]).float().mean()
            )
    assert relevance[3] == relevance[4] == 0.0  # two items: removing layer 3 or 4 changes no answer
    with pytest.warns(UserWarning, match="ties for 2 of 4 candidate layers on 2 items"):
        scores = score_layers(model, blocks, "accuracy", options(candidates=[1, 2, 3, 4]))
    assert one_shot(scores, 1, protected_positions(6)) == [4]  # lowest BI among the tied, not lowest index
    bi = score_layers(model, blocks, "bi", options())
    assert float(bi[4]) < float(bi[3])
    for layer, value in relevance.items():
        assert float(scores[layer]) == pytest.approx(value, abs=0.1)


def test_distinct_relevances_are_left_as_they_are_without_warning(recwarn):
    model = nearly_identity_model(scale=0.3)
    blocks = self_labelled_blocks(model, count=4)
    scores = score_layers(model, blocks, "accuracy", options(candidates=[1, 2, 3, 4]))
    assert scores[1:5].tolist() == [0.75, 0.5, 0.25, 0.0]  # no tie: plain Eq. 3, nothing added
    assert not [w for w in recwarn if "ties for" in str(w.message)]
