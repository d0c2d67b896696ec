"""Masks that fit: packed one bit per weight, selected without int64 copies of the matrix.

The selection functions must give exactly the masks of the sort-based versions they replace
(copied below as references), and the profiler must see no allocation as large as an int64
copy of the scored matrix (the references do allocate one, so the check can fail).
"""

import lightning as L
import pytest
import torch
from test_sparsity_training import _data, _trainer
from torch.profiler import ProfilerActivity, profile

from lightning_prune.callbacks import StageCallback
from lightning_prune.modules.causal_lm import CausalLMModule
from lightning_prune.sparsity import masks as mask_module
from lightning_prune.sparsity.masks import NMPattern, flat_keep_mask, nm_keep_mask, prunable_linears, row_counts, topk_keep_mask
from lightning_prune.sparsity.packing import PackedMasks, mask_checksum, pack_mask, unpack_mask
from lightning_prune.stages import SparsifyStage


def reference_topk(scores, counts):
    order = torch.sort(scores.float(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order))
    return ranks >= counts[:, None]


def reference_flat(scores, count):
    order = torch.sort(scores.float().flatten(), stable=True).indices
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[order[: int(count)]] = False
    return keep.reshape(scores.shape)


def reference_nm(scores, pattern):
    rows, cols = scores.shape
    groups = scores.float().reshape(rows, cols // pattern.m, pattern.m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(pattern.n, dim=2, sorted=False).indices, True)
    return keep.reshape(rows, cols)


def scores_of(kind: str, rows: int, cols: int, generator) -> torch.Tensor:
    """Scores with no ties, with many ties, with zeros and signed zeros, and with denormals."""
    values = torch.randn(rows, cols, generator=generator)
    if kind == "ties":
        return torch.randint(0, 4, (rows, cols), generator=generator).float()
    if kind == "zeros":
        return torch.where(torch.rand(rows, cols, generator=generator) < 0.5, torch.zeros(()), values.abs()) * 1e-39
    if kind == "signed_zeros":
        return torch.where(values > 0, torch.zeros(()), -torch.zeros(())) + torch.where(values.abs() > 1.5, values, torch.zeros(()))
    return values


@pytest.mark.parametrize("chunk", [1 << 22, 64, 7])
@pytest.mark.parametrize("kind", ["plain", "ties", "zeros", "signed_zeros"])
def test_selection_equals_the_sort_based_masks(monkeypatch, chunk, kind):
    monkeypatch.setattr(mask_module, "_CHUNK", chunk)
    generator = torch.Generator().manual_seed(chunk % 1000 + len(kind))
    for rows, cols in [(1, 1), (3, 8), (17, 24), (40, 64)]:
        scores = scores_of(kind, rows, cols, generator)
        for count in sorted({0, 1, rows * cols // 3, rows * cols // 2, rows * cols - 1, rows * cols}):
            assert torch.equal(flat_keep_mask(scores, count), reference_flat(scores, count)), (rows, cols, count)
        counts = torch.randint(0, cols + 1, (rows,), generator=generator)
        assert torch.equal(topk_keep_mask(scores, counts), reference_topk(scores, counts))
        if kind == "plain" and cols % 8 == 0:  # without ties: topk's choice among equals is unspecified
            for pattern in (NMPattern(2, 4), NMPattern(4, 8)):
                assert torch.equal(nm_keep_mask(scores, pattern), reference_nm(scores, pattern))


def largest_allocation(function) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    return max(event.self_cpu_memory_usage for event in profiler.events())


def test_selection_allocates_no_int64_copy_of_the_matrix(monkeypatch):
    monkeypatch.setattr(mask_module, "_CHUNK", 1 << 14)  # 16 rows of 1024 per step
    scores = torch.rand(256, 1024, generator=torch.Generator().manual_seed(0))
    int64_copy = scores.numel() * 8
    counts = row_counts(*scores.shape, 0.5)
    assert largest_allocation(lambda: reference_flat(scores, scores.numel() // 2)) >= int64_copy  # the check can fail
    assert largest_allocation(lambda: reference_topk(scores, counts)) >= int64_copy
    for select in (
        lambda: flat_keep_mask(scores, scores.numel() // 2),
        lambda: topk_keep_mask(scores, counts),
        lambda: nm_keep_mask(scores, NMPattern(2, 4)),
    ):
        assert largest_allocation(select) <= scores.numel() * 4  # at most one int32/fp32-sized temporary


def test_packing_round_trips_and_the_checksum_sees_one_bit():
    generator = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (3, 5), (64, 128), (2, 3, 9)]:
        mask = torch.rand(shape, generator=generator) < 0.5
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
        assert torch.equal(unpack_mask(packed, shape), mask)
    masks = PackedMasks({"a": torch.rand(16, 16, generator=generator) < 0.5, "b": torch.ones(4, 9, dtype=torch.bool)})
    assert masks.kept("b") == 36 and masks.numel("a") == 256
    flipped = PackedMasks(masks)
    changed = masks["a"].clone()
    changed[3, 7] = ~changed[3, 7]
    flipped["a"] = changed
    assert mask_checksum(masks) == mask_checksum(PackedMasks(dict(masks))) != mask_checksum(flipped)


def tensors_in(value, seen=None):
    """Every tensor reachable from ``value`` through attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item, seen)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
        yield from tensors_in(vars(value), seen)


class NoMaskBuffers(L.Callback):
    """During fit: no bool tensor as large as a projection weight on the module or in the decisions."""

    checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        smallest = min(linear.weight.numel() for _, linear in prunable_linears(pl_module.model))
        held = list(pl_module.state_dict(keep_vars=True).values()) + list(pl_module.buffers())
        for decision in pl_module.decisions:
            held += list(tensors_in(decision))
        large_bool = [t.shape for t in held if t.dtype == torch.bool and t.numel() >= smallest]
        assert not large_bool, large_bool
        NoMaskBuffers.checked += 1


def test_training_keeps_masks_packed_and_enforced(tiny_dir, tmp_path):
    module = CausalLMModule(model=str(tiny_dir), learning_rate=1e-2, weight_decay=0.1)
    callback = StageCallback([SparsifyStage(method="wanda", allocation="uniform", sparsity=0.5)], run_dir=str(tmp_path / "run"))
    trainer = _trainer(3, callback, tmp_path)
    trainer.callbacks.append(NoMaskBuffers())
    trainer.fit(module, datamodule=_data(tiny_dir))
    assert NoMaskBuffers.checked == 3
    (decision,) = callback.decisions
    linears = dict(prunable_linears(module.model))
    for name in decision.masks:  # one bit per weight, and the trained weights still obey the masks
        assert decision.masks.packed(name).numel() == linears[name].weight.numel() // 8
        assert (linears[name].weight[~decision.masks[name]] == 0).all(), name
        assert (linears[name].weight[decision.masks[name]] != 0).all(), name
