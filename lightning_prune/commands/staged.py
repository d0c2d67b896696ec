"""The one-shot driver behind ``prune``, ``merge`` and ``sparsify``: check -> load -> plan -> save.

Each command declares only its data and output options; its stage's options come from the
stage dataclass (:mod:`lightning_prune.stages`), the same one a recipe's section fills. The
driver validates everything before any weight loads, measures the model before and after,
and writes the run directory (``model/``, ``decisions.json`` (+ ``.safetensors``),
``metrics.json``, ``config.yaml``) — or, with ``dry_run``, only the plan.
"""

import time
from dataclasses import asdict, dataclass

from lightning_prune.commands.common import EvaluationData, check_seq_len, load_checked_model, run_record, split_names
from lightning_prune.data.tasks import is_task
from lightning_prune.data.text import load_blocks
from lightning_prune.errors import InputError
from lightning_prune.evaluation.suite import data_location
from lightning_prune.hub import check_push, push_model
from lightning_prune.model.loading import load_config
from lightning_prune.model_card import stage_card
from lightning_prune.onload import finish_onload
from lightning_prune.results import RunDirectory, model_summary
from lightning_prune.stages import Stage
from lightning_prune.stages.plan import check_stages, fingerprint, format_plan, plan_json, plan_tensors

__all__ = ["StageRun", "run_stage"]


@dataclass
class StageRun:
    """Data, evaluation and output options of a one-shot stage command.

    Args:
        model: 'demo', a Hugging Face Hub id, a local model directory or a .gguf file.
        calibration_data: wikitext2 / c4 (validation split), a text/jsonl file, or a task (arc_easy, piqa, boolq).
        calibration_samples: calibration blocks of seq_len tokens (or task items), drawn with seed.
        seed: seed of the calibration draw (and of the random metric).
        eval_data: comma-separated evaluation sources (wikitext2, c4, text/jsonl paths), test split.
        seq_len: tokens per calibration and evaluation block.
        eval_samples: evaluation blocks per source.
        batch_size: blocks per forward pass.
        dtype: auto (bfloat16 on a CUDA device that supports it, else float32), float32, bfloat16 or float16.
        device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.
        output_dir: run directory for model/, decisions.json and metrics.json (default: runs/<command>).
        overwrite: replace results already in output_dir.
        dry_run: plan, print the decision and write only decisions.json (no model, no evaluation).
        push_to_hub: upload model/ (with its model card) to this Hub repo (needs HF_TOKEN or `hf auth login`).
        onload: none (the whole model on the device) or layer (decoder layers stay in host memory, or in
            offload_dir, and run on the device one at a time: device memory ~ one layer + embeddings and head).
        offload_dir: with onload layer, keep the layers in memory-mapped safetensors files under this
            directory instead of host memory (a local safetensors checkpoint is read from its own files).
        max_device_memory: refuse to start when what goes on the device does not fit (e.g. 24GiB; default: unchecked).
    """

    model: str = "demo"
    calibration_data: str = "wikitext2"
    calibration_samples: int = 64
    seed: int = 0
    eval_data: str = "wikitext2"
    seq_len: int = 128
    eval_samples: int = 64
    batch_size: int = 8
    dtype: str = "auto"
    device: str = "auto"
    output_dir: str | None = None
    overwrite: bool = False
    dry_run: bool = False
    push_to_hub: str | None = None
    onload: str = "none"
    offload_dir: str | None = None
    max_device_memory: str | None = None

    def run(self, stage: Stage) -> dict:
        """Run ``stage`` with these options (output in ``runs/<stage name>`` unless given)."""
        return run_stage(
            stage,
            asdict(self),
            model=self.model,
            calibration_data=self.calibration_data,
            calibration_samples=self.calibration_samples,
            seed=self.seed,
            eval_data=self.eval_data,
            eval_samples=self.eval_samples,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            dtype=self.dtype,
            device=self.device,
            output_dir=self.output_dir or f"runs/{stage.name}",
            overwrite=self.overwrite,
            dry_run=self.dry_run,
            push_to_hub=self.push_to_hub,
            onload=self.onload,
            offload_dir=self.offload_dir,
            max_device_memory=self.max_device_memory,
        )


def _calibration(stage: Stage, tokenizer, source: str, *, seq_len: int, num_samples: int, seed: int):
    """(calibration blocks, scoring data): a text source's seeded validation blocks, or a task's items."""
    if not stage.needs_calibration():
        return None, None
    if is_task(source):
        from lightning_prune.commands.score import load_scoring_data

        scoring, blocks = load_scoring_data(
            tokenizer, source, getattr(stage, "metric", ""), seq_len=seq_len, num_samples=num_samples, seed=seed
        )
        return blocks, scoring
    blocks = load_blocks(
        tokenizer, source, split="validation", seq_len=seq_len, num_samples=num_samples, seed=seed, option="calibration_samples"
    )
    return blocks, None


def run_stage(
    stage: Stage,
    settings: dict,
    *,
    model: str,
    calibration_data: str,
    calibration_samples: int,
    seed: int,
    eval_data: str,
    eval_samples: int,
    seq_len: int,
    batch_size: int,
    dtype: str,
    device: str,
    output_dir: str,
    overwrite: bool,
    dry_run: bool,
    push_to_hub: str | None = None,
    onload: str = "none",
    offload_dir: str | None = None,
    max_device_memory: str | None = None,
) -> dict:
    """Run one stage as a command; returns the ``metrics.json`` body plus the decision."""
    if dry_run and overwrite:
        raise InputError("--dry_run writes only decisions.json and keeps what is there; drop --overwrite")
    if dry_run and push_to_hub:
        raise InputError("--dry_run saves no model to upload; drop --push_to_hub")
    check_push(push_to_hub)
    run = RunDirectory(output_dir, overwrite)
    run.check()
    config = load_config(model)
    check_seq_len(seq_len, config)
    check_stages([stage], config)
    sources = [] if dry_run else split_names(eval_data)
    lm, tokenizer = load_checked_model(
        model,
        dtype=dtype,
        device=device,
        seq_len=seq_len,
        data=[*sources, calibration_data],
        onload=onload,
        offload_dir=offload_dir,
        max_device_memory=max_device_memory,
    )
    try:
        evaluation = EvaluationData(tokenizer, sources, seq_len=seq_len, num_samples=eval_samples) if sources else None
        blocks, scoring = _calibration(stage, tokenizer, calibration_data, seq_len=seq_len, num_samples=calibration_samples, seed=seed)
        summary_before = model_summary(lm)
        before = evaluation.evaluate(lm, batch_size=batch_size) if evaluation else summary_before
        start = time.perf_counter()
        extra = {"scoring_data": scoring} if scoring is not None else {}
        decision = stage.plan(lm, blocks, **extra)
        seconds = time.perf_counter() - start
        plan = plan_json([decision], fingerprint(config), model)
        if dry_run:
            run.write_plan(plan, plan_tensors([decision]))
            print(format_plan([decision], summary_before, model_summary(lm)))
            return {"dry_run": True, "plan": str(run.path / "decisions.json"), "decision": decision.summary()}
        after = evaluation.evaluate(lm, batch_size=batch_size)
        settings = {
            **settings,
            "output_dir": output_dir,
            "stage": {"name": stage.name, **asdict(stage)},
            "data_files": evaluation.files,
            "calibration_file": calibration_data if is_task(calibration_data) else data_location(calibration_data, "validation"),
        }
        data = {"evaluation": f"{', '.join(sources)} (test split), {eval_samples} blocks of {seq_len} tokens"}
        if stage.needs_calibration():
            drawn = "items" if is_task(calibration_data) else f"blocks of {seq_len} tokens"
            data["calibration"] = f"{calibration_data} (validation split), {calibration_samples} {drawn}, seed {seed}"
        card = stage_card(stage, decision, model, {"before": before, "after": after}, data, settings)
        finish_onload(lm)  # the whole model back in host memory (mapped layers stay mapped) for saving
        run.save_model(lm, tokenizer, card=card, decisions=[decision])
        run.write_plan(plan, plan_tensors([decision]))
        run.write_config(settings)
        record = run_record(settings, before=before, after=after, stage_seconds=seconds, **decision.measurements())
        run.write_json("metrics.json", record)
        if push_to_hub:
            record["hub_commit"] = push_model(run.path / "model", push_to_hub)
        return {**record, "summary": [decision.summary()], "decisions": plan}
    finally:
        finish_onload(lm)
