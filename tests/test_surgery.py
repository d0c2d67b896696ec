import copy

import pytest
import torch
from conftest import make_tiny_model, random_ids
from transformers import AutoModelForCausalLM

from lightning_prune.errors import InputError
from lightning_prune.model import Anatomy, remove_layers, replace_layers, untie_embeddings
from lightning_prune.model.anatomy import family_spec


def _layer_indices(model):
    return [layer.self_attn.layer_idx for layer in Anatomy(model).layers]


def test_remove_layers_counts_and_renumbers(tiny_model):
    before = [id(layer) for layer in Anatomy(tiny_model).layers]
    kept = remove_layers(tiny_model, [4, 1])
    assert kept == [0, 2, 3, 5]
    assert [id(layer) for layer in Anatomy(tiny_model).layers] == [before[i] for i in kept]
    assert tiny_model.config.num_hidden_layers == 4
    assert _layer_indices(tiny_model) == [0, 1, 2, 3]
    assert tiny_model(random_ids()).logits.shape == (2, 16, 256)


def test_remove_zero_layers_changes_nothing():
    model = make_tiny_model("llama")
    reference = copy.deepcopy(model)
    with pytest.raises(InputError, match="no layers"):
        remove_layers(model, [])
    ids = random_ids()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_remove_layers_updates_layer_types():
    model = make_tiny_model("qwen2_sliding")
    remove_layers(model, [0, 4])
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]


@pytest.mark.parametrize(
    "indices, message", [([6], "out of range"), ([-1], "out of range"), ([1, 1], "more than once"), (list(range(6)), "all 6 layers")]
)
def test_remove_layers_rejects_bad_indices(indices, message):
    model = make_tiny_model("llama")
    with pytest.raises(InputError, match=message):
        remove_layers(model, indices)
    assert model.config.num_hidden_layers == 6


def test_remove_layers_equals_skipping_them_at_runtime():
    model = make_tiny_model("llama")
    ids = random_ids()
    skipped = [1, 3]
    stack = Anatomy(model).layers
    hooks = [stack[i].register_forward_hook(lambda m, a, kw, out: a[0], with_kwargs=True) for i in skipped]
    expected = model(ids, use_cache=False).logits
    for hook in hooks:
        hook.remove()
    remove_layers(model, skipped)
    torch.testing.assert_close(model(ids, use_cache=False).logits, expected)


def test_replace_layers_keeps_order_and_shapes():
    model = make_tiny_model("llama")
    layers = list(Anatomy(model).layers)
    replace_layers(model, 2, 4, layers[3])
    assert list(Anatomy(model).layers) == [layers[0], layers[1], layers[3], layers[4], layers[5]]
    assert model.config.num_hidden_layers == 5
    assert _layer_indices(model) == [0, 1, 2, 3, 4]
    with pytest.raises(InputError, match="span"):
        replace_layers(model, 3, 9, layers[0])


def test_replace_layers_refuses_mixed_attention_types():
    model = make_tiny_model("qwen2_sliding")
    with pytest.raises(InputError, match="mix attention types"):
        replace_layers(model, 2, 4, Anatomy(model).layers[2])


def test_tied_embeddings_stay_tied_and_untie_copies():
    model = make_tiny_model("llama_tied")
    anatomy = Anatomy(model)
    remove_layers(model, [2])
    assert anatomy.lm_head.weight is anatomy.embed_tokens.weight
    ids = random_ids()
    expected = model(ids).logits
    assert untie_embeddings(model) is True
    assert anatomy.lm_head.weight is not anatomy.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    assert untie_embeddings(model) is False


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2_sliding", "qwen3", "opt", "mistral"])
def test_save_reload_generate_equal(tmp_path, name):
    model = make_tiny_model(name)
    remove_layers(model, [1, 4])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert Anatomy(reloaded).num_layers == 4
    assert reloaded.config.num_hidden_layers == 4
    if name == "llama_tied":
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = random_ids(1, 12)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    kwargs = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    generated = model.generate(ids, output_logits=True, return_dict_in_generate=True, **kwargs)
    regenerated = reloaded.generate(ids, output_logits=True, return_dict_in_generate=True, **kwargs)
    assert torch.equal(generated.sequences, regenerated.sequences)
    torch.testing.assert_close(torch.stack(generated.logits), torch.stack(regenerated.logits))


def test_untied_model_saves_and_reloads_untied(tmp_path):
    model = make_tiny_model("llama_tied")
    untie_embeddings(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)


def test_unsupported_family_lists_supported():
    from transformers import GPT2Config

    with pytest.raises(InputError, match="supported model types: llama, mistral, qwen2, qwen3, opt"):
        family_spec(GPT2Config())
