"""Selection is a pure function of scores: one-shot, iterative driver, contiguous, protection, targets."""

import math

import pytest
import torch

from lightning_prune.errors import InputError
from lightning_prune.selection import (
    check_selection,
    contiguous_block,
    iterative,
    one_shot,
    protected_positions,
    removal_count,
)


def test_protected_positions_defaults_and_custom():
    assert protected_positions(6) == [0, 5]
    assert protected_positions(30, 4, 2) == [0, 1, 2, 3, 28, 29]
    assert protected_positions(6, 0, 0) == []


def test_one_shot_takes_lowest_unprotected_in_removal_order_with_nan_last():
    scores = torch.tensor([0.0, 0.5, 0.1, float("nan"), 0.3, 0.05])
    assert one_shot(scores, 2, [0, 5]) == [2, 4]
    assert one_shot(scores, 4, [0, 5]) == [2, 4, 1, 3]
    assert one_shot(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2, []) == [0, 1]


def test_contiguous_block_windows_and_block_starts():
    scores = torch.tensor([0.0, 0.9, 0.2, 0.1, 0.8, 0.0])
    assert contiguous_block(scores, 2, [0, 5]) == [2, 3]
    by_start = torch.tensor([0.0, 0.4, 0.6, 0.3, 0.2, float("nan")])
    assert contiguous_block(by_start, 2, [0, 5], by_start=True) == [3, 4]
    with pytest.raises(InputError, match="no block of 5"):
        contiguous_block(scores, 5, [0, 5])


def test_removal_count_from_count_or_ratio_and_its_limits():
    assert removal_count(30, count=7, protected=2) == 7
    assert removal_count(30, ratio=0.25, protected=2) == 8
    for kwargs, message in [
        ({"count": 28, "protected": 2}, "must be in 1..27"),
        ({"count": 0}, "must be in 1.."),
        ({"ratio": 1.0}, r"outside \(0, 1\)"),
        ({"ratio": 0.0}, r"outside \(0, 1\)"),
        ({"count": 3, "ratio": 0.1}, "exactly one"),
        ({}, "exactly one"),
    ]:
        with pytest.raises(InputError, match=message):
            removal_count(30, **kwargs)


def test_unknown_selection_lists_the_valid_ones():
    with pytest.raises(InputError, match="one_shot, iterative, contiguous"):
        check_selection("greedy")


def test_iterative_rescores_after_each_removal_and_reports_original_indices():
    """A fake model: the score of a layer is its original index, plus 10 if its left neighbour was removed."""
    alive = list(range(8))
    seen = []

    def score(candidates):
        seen.append(list(candidates))
        return torch.tensor([float(i) + (10.0 if i - 1 not in alive and i > 0 else 0.0) for i in alive])

    def remove(position):
        del alive[position]

    steps = iterative(score, remove, 3, 8, protect_first=2, protect_last=1)
    assert [step.removed for step in steps] == [[2], [4], [6]]
    assert alive == [0, 1, 3, 5, 7]
    assert seen[0] == [2, 3, 4, 5, 6] and seen[1] == [2, 3, 4, 5]
    assert steps[1].scores[3] == 13.0 and math.isclose(steps[1].scores[4], 4.0)
    assert steps[0].as_dict()["scores"]["0"] == 0.0
