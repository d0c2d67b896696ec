"""CoMe merge invariants on tiny models (paper 004 Alg. 1/2, spec (a)-(f))."""

import copy

import pytest
import torch
from conftest import make_tiny_model, random_ids

from lightning_prune.capture import capture_layer_inputs
from lightning_prune.errors import InputError
from lightning_prune.merging import (
    calibration_statistics,
    concat_merge,
    layer_mapping,
    merge_model,
    rebuild_merged_architecture,
    retention_ratios,
    sum_merge,
    unit_counts,
)
from lightning_prune.merging.posterior import candidate_ratios, window_losses
from lightning_prune.merging.statistics import attention_sensitivity, column_l1, token_cosine
from lightning_prune.model.anatomy import Anatomy

MERGE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen2_sliding"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Replaying identical float32 kernels in another grouping: round-off only.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def batches(count=2):
    return [random_ids(2, 16, seed) for seed in range(count)]


def test_retention_ratios_known_values():
    influence = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(retention_ratios(influence, p=1), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(retention_ratios(influence, p=2), torch.tensor([0.1, 0.9]))
    torch.testing.assert_close(retention_ratios(influence, p=1, rho=0.95), torch.tensor([0.05, 0.95]))
    torch.testing.assert_close(retention_ratios(influence, p=float("inf")), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(retention_ratios(torch.tensor([0.5, 0.5]), p=64), torch.tensor([0.5, 0.5]))
    assert unit_counts(torch.tensor([0.25, 0.75]), 2) == [0, 2]
    assert unit_counts(torch.tensor([0.25, 0.75]), 128) == [32, 96]
    assert unit_counts(torch.tensor([0.5, 0.5]), 3) == [1, 2] or unit_counts(torch.tensor([0.5, 0.5]), 3) == [2, 1]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dominant", [0, 1])
def test_ratio_one_zero_copies_dominant_layer(family, dominant):
    model = make_tiny_model(family)
    anatomy = Anatomy(model)
    stats = calibration_statistics(model, batches(), progress=False)
    window = [anatomy.layers[2], anatomy.layers[3]]
    ratios = torch.tensor([1.0, 0.0]) if dominant == 0 else torch.tensor([0.0, 1.0])
    merged = concat_merge(model, window, ratios, stats.attention[2:4], stats.ffn[2:4])
    source = window[dominant]
    for name in PROJECTIONS:
        for attribute in ("weight", "bias"):
            expected = getattr(anatomy.part(source, name), attribute)
            if expected is not None:
                torch.testing.assert_close(getattr(anatomy.part(merged, name), attribute), expected, rtol=0, atol=0)
    for path, norm in anatomy.norms(merged).items():
        if path in anatomy.spec.attention_norms:
            expected = anatomy.norms(source)[path].weight
        else:
            expected = (anatomy.norms(window[0])[path].weight + anatomy.norms(window[1])[path].weight) / 2
        torch.testing.assert_close(norm.weight, expected, **TOLERANCE)


@pytest.mark.parametrize("family", MERGE_FAMILIES)
def test_merge_keeps_shapes_and_mapping_fits_groups(family):
    model = make_tiny_model(family)
    shapes = {name: p.shape for name, p in Anatomy(model).layers[0].named_parameters()}
    record = merge_model(model, batches(), 3, progress=False)
    anatomy = Anatomy(model)
    assert anatomy.num_layers == model.config.num_hidden_layers == 3
    for layer in anatomy.layers:
        assert {name: p.shape for name, p in layer.named_parameters()} == shapes
    assert [i for group in record.groups for i in group] == list(range(6))
    assert len(record.groups) == 3 and len(record.steps) == 3
    mapping = record.mapping
    assert [m.student for m in mapping] == [b for b, g in enumerate(record.groups) if len(g) > 1]
    for entry in mapping:
        assert entry.teacher_last == max(record.groups[entry.student])
        assert entry.teacher_first == min(record.groups[entry.student])
    assert model(random_ids(), use_cache=False).logits.shape == (2, 16, 256)


def test_without_remerge_no_group_exceeds_two():
    model = make_tiny_model("llama")
    record = merge_model(model, batches(), 3, remerge=False, progress=False)
    assert sorted(len(g) for g in record.groups) == [2, 2, 2]
    assert layer_mapping(record.groups) == record.mapping
    with pytest.raises(InputError, match="remerge"):
        merge_model(make_tiny_model("llama"), batches(), 2, remerge=False, progress=False)


def _group_contribution(attention, kept_group, num_heads_per_group, head_dim, hidden, kwargs):
    """Attention output through o_proj of one KV group only (other heads' o_proj columns zeroed)."""
    module = copy.deepcopy(attention)
    width = num_heads_per_group * head_dim
    mask = torch.zeros(module.o_proj.weight.shape[1])
    mask[kept_group * width : (kept_group + 1) * width] = 1
    with torch.no_grad():
        module.o_proj.weight.mul_(mask)
    return module(hidden_states=hidden, **kwargs)[0]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gqa_gather_matches_per_head_reference(family):
    """g = 2 and a split KV allocation (one group from each layer, crossing): merged attention ==
    sum of the kept groups' per-head outputs of the source layers (query head h reads KV head h // g)."""
    model = make_tiny_model(family)
    anatomy = Anatomy(model)
    g, d_h = anatomy.num_heads // anatomy.num_kv_heads, anatomy.head_dim
    assert g == 2 and anatomy.num_kv_heads == 2
    window = [anatomy.layers[1], anatomy.layers[2]]
    attention_scores = [torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])]  # layer 1 keeps group 1, layer 2 keeps group 0
    ffn_scores = [torch.rand(anatomy.intermediate_size), torch.rand(anatomy.intermediate_size)]
    merged = concat_merge(model, window, torch.tensor([0.5, 0.5]), attention_scores, ffn_scores)
    inputs = capture_layer_inputs(model, [random_ids()], start=0)
    kwargs = {k: v for k, v in inputs.kwargs[0]["full_attention"].items() if k != "use_cache"}
    hidden = torch.randn(2, 16, anatomy.hidden_size)
    attention = anatomy.spec.attention
    with torch.no_grad():
        merged_attention = getattr(merged, attention)
        if family == "qwen3":  # same q/k norms in both layers isolate the gather from the norm average
            for layer in window:
                getattr(layer, attention).q_norm.weight.copy_(merged_attention.q_norm.weight)
                getattr(layer, attention).k_norm.weight.copy_(merged_attention.k_norm.weight)
        expected = _group_contribution(getattr(window[0], attention), 1, g, d_h, hidden, kwargs)
        expected = expected + _group_contribution(getattr(window[1], attention), 0, g, d_h, hidden, kwargs)
        actual = merged_attention(hidden_states=hidden, **kwargs)[0]
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def test_attention_sensitivity_groups_contiguous_query_heads():
    """Channels of query heads 2k, 2k+1 (g = 2) form KV group k, as in HF repeat_kv."""
    head_dim, num_heads, num_kv = 4, 4, 2
    means = torch.zeros(num_heads * head_dim)
    means[1 * head_dim : 2 * head_dim] = 1.0  # query head 1 -> group 0
    weight = torch.ones(8, num_heads * head_dim)
    scores = attention_sensitivity(means, column_l1(weight), num_kv)
    torch.testing.assert_close(scores, torch.tensor([4.0, 0.0]))  # |a| 1 * column L1 8, averaged over 8 channels


def test_block_influence_matches_manual_cosine():
    model = make_tiny_model("llama")
    ids = random_ids()
    stats = calibration_statistics(model, [ids], progress=False)
    from lightning_prune.capture import capture

    with capture(model) as record, torch.no_grad():
        model(ids, use_cache=False)
    tokens = ids.numel()
    expected = 1 - token_cosine(record.inputs[3][0], record.outputs[3][0]) / tokens
    window = 1 - token_cosine(record.inputs[3][0], record.outputs[4][0]) / tokens
    torch.testing.assert_close(stats.block_influence[3], expected)
    torch.testing.assert_close(stats.window_influence[3], window)
    assert stats.attention[0].shape == (2,) and stats.ffn[0].shape == (128,)


def test_sum_merge_with_ratio_one_is_the_layer():
    model = make_tiny_model("qwen2")
    layers = Anatomy(model).layers
    merged = sum_merge(model, [layers[0], layers[1]], torch.tensor([0.0, 1.0]))
    for (name, p), q in zip(merged.named_parameters(), layers[1].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_posterior_picks_smallest_calibration_loss():
    model = make_tiny_model("llama")
    data = batches()
    stats = calibration_statistics(model, data, progress=False)
    candidates = candidate_ratios(4)
    losses = window_losses(model, data, 2, stats, candidates, progress=False)
    assert len(losses) == 5 and len(set(losses)) > 1
    record = merge_model(model, data, 5, method="come_p", grid=4, progress=False)
    assert record.steps[0]["window"] == [int(stats.window_influence.argmin()), int(stats.window_influence.argmin()) + 1]
    if record.steps[0]["window"][0] == 2:
        assert record.steps[0]["ratios"][0] == pytest.approx(float(candidates[losses.index(min(losses))][0]))


def test_posterior_window_loss_equals_full_model_loss():
    """Prefix reuse: the replayed suffix gives the same NLL as merging and running the whole model."""
    model = make_tiny_model("llama")
    data = batches(1)
    stats = calibration_statistics(model, data, progress=False)
    ratios = torch.tensor([0.25, 0.75])
    (loss,) = window_losses(model, data, 2, stats, [ratios], progress=False)
    layers = Anatomy(model).layers
    merged = concat_merge(model, [layers[2], layers[3]], ratios, stats.attention[2:4], stats.ffn[2:4])
    from lightning_prune.model.surgery import replace_layers

    replace_layers(model, 2, 4, merged)
    logits = model(data[0], use_cache=False).logits
    full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), data[0][:, 1:].flatten(), reduction="sum")
    assert loss == pytest.approx(float(full.detach()), rel=1e-5)


def test_rebuilt_architecture_loads_merged_weights():
    merged = make_tiny_model("llama")
    record = merge_model(merged, batches(), 4, progress=False)
    rebuilt = make_tiny_model("llama", seed=1)
    rebuild_merged_architecture(rebuilt, record.groups)
    rebuilt.load_state_dict(merged.state_dict(), strict=True)
    ids = random_ids()
    torch.testing.assert_close(rebuilt(ids).logits, merged(ids).logits, rtol=0, atol=0)
    with pytest.raises(InputError, match="8-layer original model"):
        rebuild_merged_architecture(make_tiny_model("llama"), [[0, 1], [2, 3], [4, 5, 6, 7]])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(target_depth=6), "target depth 6 is not a smaller depth of this 6-layer model; choose 1..5"),
        (dict(target_depth=0), "choose 1..5"),
        (dict(target_depth=3, p=0.0), "p 0.0 must be > 0"),
        (dict(target_depth=3, rho=1.0), r"rho 1.0 must be in \[0, 1\)"),
        (dict(target_depth=3, rho=-0.1), r"rho -0.1 must be in \[0, 1\)"),
        (dict(target_depth=3, method="laco"), "come, come_p, sum"),
    ],
)
def test_bad_merge_options(options, message):
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=message):
        merge_model(model, batches(), **options, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unsupported_family_lists_supported():
    with pytest.raises(InputError, match="supported: llama, mistral, qwen2, qwen3"):
        merge_model(make_tiny_model("opt"), batches(), 3, progress=False)


def _window_merge(family, ratios, **options):
    model = make_tiny_model(family)
    anatomy = Anatomy(model)
    stats = calibration_statistics(model, batches(), progress=False)
    window = [anatomy.layers[2], anatomy.layers[3]]
    return anatomy, window, concat_merge(model, window, ratios, stats.attention[2:4], stats.ffn[2:4], **options)


def _layer_norm_weights(anatomy, layer):
    return {path: norm.weight for path, norm in anatomy.norms(layer).items() if path not in anatomy.spec.attention_norms}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("ratios", [(0.45, 0.55), (0.7, 0.3)])
def test_norm_rules_give_dominant_weighted_and_mean_norms(family, ratios):
    """dominant: the largest-ratio layer's norms exactly; weighted: sum r_t w_t; mean: App. C."""
    ratios = torch.tensor(ratios)
    dominant = int(ratios.argmax())
    expected = {}
    for rule in ("mean", "weighted", "dominant"):
        anatomy, window, merged = _window_merge(family, ratios, norm_rule=rule)
        sources = [_layer_norm_weights(anatomy, layer) for layer in window]
        weights = {"mean": [0.5, 0.5], "weighted": ratios.tolist(), "dominant": [float(i == dominant) for i in range(2)]}[rule]
        expected[rule] = merged
        for path, value in _layer_norm_weights(anatomy, merged).items():
            torch.testing.assert_close(value, sum(w * s[path] for w, s in zip(weights, sources)), **TOLERANCE)
        if rule == "dominant":
            for path, value in _layer_norm_weights(anatomy, merged).items():
                torch.testing.assert_close(value, sources[dominant][path], rtol=0, atol=0)
    # the rule touches only the layer norms: projections and q/k norms are the same under every rule
    mean_state, dominant_state = expected["mean"].state_dict(), expected["dominant"].state_dict()
    layer_norms = {f"{path}.weight" for path in _layer_norm_weights(anatomy, expected["mean"])}
    for name, value in mean_state.items():
        if name not in layer_norms:
            torch.testing.assert_close(dominant_state[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dominant", [0, 1])
def test_dominant_norms_with_ratio_one_zero_is_the_layer(dominant):
    """With norm_rule dominant, r in {0, 1} is exactly the kept layer (layer removal, spec ambiguity 10)."""
    ratios = torch.tensor([1.0, 0.0]) if dominant == 0 else torch.tensor([0.0, 1.0])
    _, window, merged = _window_merge("qwen2", ratios, norm_rule="dominant")
    for (name, value), source in zip(merged.state_dict().items(), window[dominant].state_dict().values()):
        torch.testing.assert_close(value, source, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("parts", "copied"), [("attention", "mlp"), ("ffn", "self_attn")])
def test_single_part_merge_copies_the_other_from_dominant(parts, copied):
    """parts=attention: FFN and post_attention_layernorm are the dominant layer's; parts=ffn: attention and input_layernorm."""
    ratios = torch.tensor([0.4, 0.6])
    anatomy, window, merged = _window_merge("llama", ratios, parts=parts)
    _, _, both = _window_merge("llama", ratios)
    norm = "post_attention_layernorm" if parts == "attention" else "input_layernorm"
    source, reference = window[1].state_dict(), both.state_dict()
    for name, value in merged.state_dict().items():
        if name.startswith(copied) or name.startswith(norm):
            torch.testing.assert_close(value, source[name], rtol=0, atol=0, msg=name)
        else:  # the merged sublayer and its norm are as in the two-part merge
            torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)


def test_norm_options_thread_through_merge_model_and_come_p():
    """merge_model(norm_rule=dominant) == progressive loop with dominant norms; CoMe-P too; default unchanged."""
    default, explicit = make_tiny_model("llama"), make_tiny_model("llama")
    merge_model(default, batches(), 4, progress=False)
    merge_model(explicit, batches(), 4, norm_rule="mean", parts="both", progress=False)
    for name, value in default.state_dict().items():
        torch.testing.assert_close(explicit.state_dict()[name], value, rtol=0, atol=0)
    model = make_tiny_model("llama")
    record = merge_model(model, batches(), 4, norm_rule="dominant", progress=False)
    anatomy = Anatomy(model)
    original = Anatomy(make_tiny_model("llama"))
    for b, group in enumerate(record.groups):
        if len(group) == 2:  # a two-original-layer group: norms are one original layer's, exactly
            norm = anatomy.norms(anatomy.layers[b])["input_layernorm"].weight
            assert any(torch.equal(norm, original.norms(original.layers[i])["input_layernorm"].weight) for i in group)
    come_p = merge_model(make_tiny_model("llama"), batches(), 5, method="come_p", grid=2, norm_rule="dominant", progress=False)
    assert len(come_p.groups) == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(norm_rule="median"), "norm_rule 'median' is not known; choose one of mean, weighted, dominant"),
        (dict(parts="heads"), "parts 'heads' is not known; choose one of both, attention, ffn"),
        (dict(method="sum", norm_rule="dominant"), "norm_rule and parts apply to come and come_p only"),
    ],
)
def test_bad_norm_options(options, message):
    with pytest.raises(InputError, match=message):
        merge_model(make_tiny_model("llama"), batches(), 3, **options, progress=False)
