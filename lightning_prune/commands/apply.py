"""``lightning-prune apply``: replay a saved plan on the original model, without calibration data.

The plan is a run's ``decisions.json`` (with its ``decisions.safetensors`` beside it). Every
decision is applied in order (layers removed with their compensation, merged layers, sparsity
masks), so the result has the logits of the model the run saved right after its stages
(training, if the run had any, is not replayed).
"""

from lightning_prune.commands.common import load_checked_model
from lightning_prune.hub import check_push, push_model
from lightning_prune.model.loading import load_config
from lightning_prune.model_card import CardInfo, command_line, compressed, model_card
from lightning_prune.results import RunDirectory, model_summary
from lightning_prune.sparsity.compressed import check_export_format
from lightning_prune.stages.plan import apply_decisions, check_fingerprint, fingerprint, plan_json, plan_tensors, read_plan

__all__ = ["apply"]


def apply(
    plan: str,
    model: str = "demo",
    dtype: str = "auto",
    device: str = "auto",
    output_dir: str = "runs/apply",
    overwrite: bool = False,
    push_to_hub: str | None = None,
) -> dict:
    """Replay a saved decisions.json on the original model and save the smaller model.

    Args:
        plan: a run's decisions.json (or its run directory).
        model: the model the plan was made for: 'demo', a Hub id, a local directory or a .gguf file.
        dtype: auto (bfloat16 on a CUDA device that supports it, else float32), float32, bfloat16 or float16.
        device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.
        output_dir: run directory for model/ and decisions.json.
        overwrite: replace results already in output_dir.
        push_to_hub: upload model/ (with its model card) to this Hub repo (needs HF_TOKEN or `hf auth login`).
    """
    check_push(push_to_hub)
    run = RunDirectory(output_dir, overwrite)
    run.check()
    decisions, info = read_plan(plan)
    if compressed(decisions):
        check_export_format("compressed")
    config = load_config(model)
    check_fingerprint(info.get("fingerprint") or {}, config, f"--plan {plan!r}")
    lm, tokenizer = load_checked_model(model, dtype=dtype, device=device)
    before = model_summary(lm)
    apply_decisions(lm, decisions)
    after = model_summary(lm)
    options = {"plan": plan, "model": model, "dtype": dtype, "device": device, "output_dir": output_dir}
    card = model_card(CardInfo(model, decisions, {"before": before, "after": after}, {}, command_line("apply", options)))
    run.save_model(lm, tokenizer, card=card, decisions=decisions)
    run.write_plan(plan_json(decisions, fingerprint(config), model), plan_tensors(decisions))
    result = {
        "plan": str(plan),
        "model": model,
        "output_dir": output_dir,
        "before": before,
        "after": after,
        "decisions": [d.summary() for d in decisions],
    }
    if push_to_hub:
        result["hub_commit"] = push_model(run.path / "model", push_to_hub)
    return result
