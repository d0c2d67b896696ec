"""FSDP set-up that can be checked without GPUs: the wrap policy, the units' parameters, the refusals.

Lightning 2.6 runs FSDP on CUDA only (``accelerator: cpu`` is refused), and this machine has no
GPU, so no test here trains under FSDP: ``docs/healing.md`` states the launch lines as untested.
"""

import lightning as L
import pytest
import yaml
from conftest import run_cli
from lightning.pytorch.strategies import DDPStrategy

from lightning_prune.errors import InputError
from lightning_prune.fsdp import DecoderLayerFSDP, check_fsdp, decoder_layer_policy
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.modules.healing import HealingModule


def units(model):
    """The modules the policy wraps in their own FSDP unit."""
    return [module for module in model.modules() if decoder_layer_policy(module, recurse=False, nonwrapped_numel=0)]


def test_the_policy_wraps_exactly_the_decoder_layers_of_every_family(tiny_model):
    assert [id(m) for m in units(tiny_model)] == [id(layer) for layer in Anatomy(tiny_model).layers]
    assert decoder_layer_policy(tiny_model, recurse=True, nonwrapped_numel=0)  # FSDP descends into everything


def test_lora_units_hold_their_frozen_base_and_adapters_together(tiny_dir):
    module = HealingModule(model=str(tiny_dir), target_modules=["q_proj", "down_proj"])
    module.setup("fit")
    layers = units(module.model)
    assert len(layers) == 6
    for layer in layers:  # one unit mixes frozen and trainable parameters: use_orig_params is required
        flags = {p.requires_grad for p in layer.parameters()}
        assert flags == {True, False}
    inside = {id(p) for layer in layers for p in layer.parameters()}
    outside = [p for p in module.model.parameters() if id(p) not in inside]
    assert outside and not any(p.requires_grad for p in outside)  # embeddings, final norm, lm_head: frozen, in the root unit
    assert {id(p) for p in module.trainable_parameters()} == {id(p) for p in module.model.parameters() if p.requires_grad}
    strategy = DecoderLayerFSDP()
    assert strategy.kwargs == {"use_orig_params": True, "auto_wrap_policy": decoder_layer_policy}


def test_a_4bit_base_under_fsdp_is_refused_before_any_weight_loads(tiny_dir):
    with pytest.raises(InputError, match="quantize: nf4 cannot run under DecoderLayerFSDP: its 4-bit bitsandbytes"):
        check_fsdp(DecoderLayerFSDP(), "nf4")
    check_fsdp(DDPStrategy(), "nf4")
    check_fsdp(DecoderLayerFSDP(), None)
    module = HealingModule(model=str(tiny_dir), quantize="nf4")
    module.trainer = L.Trainer(accelerator="cpu", strategy=DecoderLayerFSDP(), logger=False)
    with pytest.raises(InputError, match="use strategy ddp for QLoRA"):
        module.configure_model()
    assert module.model is None


def test_fsdp_on_the_cpu_stops_with_one_line(tiny_dir, tmp_path, capsys):
    recipe = tmp_path / "fsdp.yaml"
    recipe.write_text(
        yaml.safe_dump({"trainer": {"accelerator": "cpu", "strategy": {"class_path": "lightning_prune.fsdp.DecoderLayerFSDP"}}})
    )
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        capsys,
        "fit",
        "--config",
        "prune_heal",
        "--config",
        recipe,
        "--run_dir",
        run_dir,
        "--model.init_args.model",
        tiny_dir,
        "--prune.num_layers",
        2,
    )
    assert code == 2 and "DecoderLayerFSDP needs CUDA GPUs" in err and "Traceback" not in err, err
    assert not run_dir.exists() or not any(run_dir.iterdir())  # nothing written
