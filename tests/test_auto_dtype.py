"""Recipes' modules default to dtype auto: bf16 weights on a CUDA device that supports it, fp32 on the CPU."""

import torch

from lightning_prune.modules.causal_lm import CausalLMModule


def test_auto_is_float32_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = CausalLMModule(model="demo")
    assert module.hparams.dtype == "auto" and module.resolved_dtype("auto") == "float32"
    assert module.resolved_dtype("float16") == "float16"


def test_auto_is_bfloat16_on_a_cuda_device_that_supports_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert CausalLMModule(model="demo").resolved_dtype("auto") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert CausalLMModule(model="demo").resolved_dtype("auto") == "float32"


def test_bfloat16_on_a_gpu_without_it_is_one_line_before_loading(capsys, monkeypatch, tiny_dir, tmp_path):
    from conftest import assert_one_line_error, run_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    code, _, err = run_cli(
        capsys, "evaluate", "--model", tiny_dir, "--device", "cuda", "--dtype", "bfloat16", "--output_dir", tmp_path / "e"
    )
    assert_one_line_error(code, err, "--dtype bfloat16 is not supported by cuda; use --dtype float16 or auto")
    assert not (tmp_path / "e").exists()
