import torch
from conftest import make_tiny_model, random_ids

from lightning_prune.capture import capture, capture_layer_inputs, replay_logits, run_layers
from lightning_prune.model import Anatomy

# Replaying the very same layer modules on the same inputs runs the same kernels, so the
# logits agree to float32 round-off; 1e-5 absolute covers reduction-order differences.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def test_capture_records_each_layer_and_chains(tiny_model):
    ids = random_ids()
    with capture(tiny_model) as record:
        tiny_model(ids, use_cache=False)
    depth = Anatomy(tiny_model).num_layers
    assert sorted(record.inputs) == list(range(depth)) == sorted(record.outputs)
    for position in range(depth - 1):
        torch.testing.assert_close(record.outputs[position][0], record.inputs[position + 1][0], rtol=0, atol=0)
    assert record.inputs[0][0].shape == (2, 16, 64)


def test_capture_removes_hooks():
    model = make_tiny_model("llama")
    with capture(model) as record:
        model(random_ids(), use_cache=False)
    model(random_ids(), use_cache=False)
    assert len(record.inputs[0]) == 1
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in Anatomy(model).layers)


def test_replay_from_layer_zero_reproduces_logits(tiny_model):
    batches = [random_ids(seed=0), random_ids(seed=1)]
    inputs = capture_layer_inputs(tiny_model, batches, start=0)
    assert len(inputs) == 2
    for index, batch in enumerate(batches):
        expected = tiny_model(batch, use_cache=False).logits
        torch.testing.assert_close(replay_logits(tiny_model, inputs, index), expected, **TOLERANCE)


def test_replay_from_middle_layer_and_skip_matches_removed_model():
    model = make_tiny_model("qwen2_sliding")
    ids = random_ids()
    inputs = capture_layer_inputs(model, [ids], start=2)
    with capture(model, [2], outputs=False) as record:
        full = model(ids, use_cache=False).logits
    torch.testing.assert_close(inputs.hidden[0], record.inputs[2][0], rtol=0, atol=0)
    torch.testing.assert_close(replay_logits(model, inputs, 0), full, **TOLERANCE)
    skipped = replay_logits(model, inputs, 0, skip=[4])
    stack = Anatomy(model).layers
    hook = stack[4].register_forward_hook(lambda m, a, kw, out: a[0], with_kwargs=True)
    expected = model(ids, use_cache=False).logits
    hook.remove()
    torch.testing.assert_close(skipped, expected, **TOLERANCE)


def test_capture_layer_inputs_stops_early():
    model = make_tiny_model("llama")
    with capture(model, outputs=False) as record:
        capture_layer_inputs(model, [random_ids()], start=1)
    assert sorted(record.inputs) == [0, 1]


def test_run_layers_equals_stack():
    model = make_tiny_model("opt")
    ids = random_ids()
    inputs = capture_layer_inputs(model, [ids], start=0)
    with capture(model, [3], inputs=False) as record:
        model(ids, use_cache=False)
    hidden = run_layers(model, inputs.hidden[0], inputs.kwargs[0], range(4))
    torch.testing.assert_close(hidden, record.outputs[3][0], **TOLERANCE)
