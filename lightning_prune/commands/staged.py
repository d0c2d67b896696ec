"""The one-shot driver behind ``prune``, ``merge`` and ``sparsify``: check -> load -> plan -> save.

Each command declares only its data and output options; its stage's options come from the
stage dataclass (:mod:`lightning_prune.stages`), the same one a recipe's section fills. The
driver validates everything before any weight loads, measures the model before and after,
and writes the run directory (``model/``, ``decisions.json`` (+ ``.safetensors``),
``metrics.json``, ``config.yaml``) — or, with ``dry_run``, only the plan.
"""

import time
from dataclasses import asdict

from lightning_prune.commands.common import EvaluationData, check_seq_len, load_checked_model, run_record, split_names
from lightning_prune.data.tasks import is_task
from lightning_prune.data.text import load_blocks
from lightning_prune.errors import InputError
from lightning_prune.evaluation.suite import data_location
from lightning_prune.model.loading import load_config
from lightning_prune.results import RunDirectory, model_summary
from lightning_prune.stages import Stage, check_stages, fingerprint, format_plan, plan_json, plan_tensors

__all__ = ["run_stage"]


def _calibration(stage: Stage, tokenizer, source: str, *, seq_len: int, num_samples: int, seed: int):
    """(calibration blocks, scoring data): a text source's seeded validation blocks, or a task's items."""
    if not stage.needs_calibration():
        return None, None
    if is_task(source):
        from lightning_prune.commands.score import load_scoring_data

        scoring, blocks = load_scoring_data(tokenizer, source, getattr(stage, "metric", ""), seq_len=seq_len,
                                            num_samples=num_samples, seed=seed)
        return blocks, scoring
    return load_blocks(tokenizer, source, split="validation", seq_len=seq_len, num_samples=num_samples, seed=seed), None


def run_stage(stage: Stage, settings: dict, *, model: str, calibration_data: str, calibration_samples: int, seed: int,
              eval_data: str, eval_samples: int, seq_len: int, batch_size: int, dtype: str, device: str,
              output_dir: str, overwrite: bool, dry_run: bool) -> dict:
    """Run one stage as a command; returns the ``metrics.json`` body plus the decision."""
    if dry_run and overwrite:
        raise InputError("--dry_run writes only decisions.json and keeps what is there; drop --overwrite")
    run = RunDirectory(output_dir, overwrite)
    run.check()
    config = load_config(model)
    check_seq_len(seq_len, config)
    check_stages([stage], config)
    sources = [] if dry_run else split_names(eval_data)
    lm, tokenizer = load_checked_model(model, dtype=dtype, device=device, seq_len=seq_len, data=[*sources, calibration_data])
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
    settings = {**settings, "stage": {"name": stage.name, **asdict(stage)}, "data_files": evaluation.files,
                "calibration_file": calibration_data if is_task(calibration_data) else data_location(calibration_data, "validation")}
    run.save_model(lm, tokenizer)
    run.write_plan(plan, plan_tensors([decision]))
    run.write_config(settings)
    record = run_record(settings, before=before, after=after, stage_seconds=seconds, **decision.measurements())
    run.write_json("metrics.json", record)
    return {**record, "decisions": plan}
