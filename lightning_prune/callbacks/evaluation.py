"""``EvaluationCallback``: perplexity (and optional lm-eval tasks) before and after ``fit``.

"Before" runs in ``on_fit_start`` - after the pruning/compensation callbacks and after the
adapters were attached (LoRA B is zero, so this is the pruned model) - and "after" in
``on_train_end`` on the model that will be saved (``pl_module.export_model()``: adapters
merged). Rank 0 evaluates, the other ranks wait. Values go to every Lightning logger (CSV by
default, TensorBoard if configured) as ``eval/<stage>/...`` and to ``metrics.json``.
"""

import lightning as L
import torch

from lightning_prune.commands.common import EvaluationData, split_names
from lightning_prune.evaluation.harness import check_task_options, evaluate_tasks, resolve_tasks
from lightning_prune.results import RunDirectory, model_summary, package_versions

__all__ = ["EvaluationCallback"]


class EvaluationCallback(L.Callback):
    """Evaluate the trained model at the start and end of fit.

    Args:
        data: comma-separated perplexity sources (wikitext2, c4, text/jsonl files); test split.
        seq_len: tokens per perplexity block.
        num_samples: perplexity blocks per source (the first ones).
        batch_size: blocks (or task requests) per forward pass.
        tasks: comma-separated multiple-choice tasks for lm-eval (empty: perplexity only).
        task_dir: directory of ``<task>.jsonl`` files (query/choices/gold).
        limit: first items per task (``None``: all).
        num_fewshot: in-context examples per task question.
        before: also evaluate at the start of fit (after pruning, before training).
        output_dir: where ``metrics.json`` goes (default: ``trainer.default_root_dir``).
    """

    def __init__(
        self,
        data: str = "wikitext2",
        seq_len: int = 128,
        num_samples: int = 64,
        batch_size: int = 8,
        tasks: str | None = None,
        task_dir: str | None = None,
        limit: int | None = None,
        num_fewshot: int = 0,
        before: bool = True,
        output_dir: str | None = None,
    ):
        self.settings = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.tasks = split_names(tasks or "")
        if self.tasks:
            check_task_options(limit, num_fewshot)
            resolve_tasks(self.tasks, task_dir)
        self.results: dict[str, dict] = {}

    def _evaluate(self, model: torch.nn.Module, tokenizer) -> dict:
        s = self.settings
        evaluation = EvaluationData(tokenizer, split_names(s["data"]), seq_len=s["seq_len"], num_samples=s["num_samples"])
        values = evaluation.evaluate(model, batch_size=s["batch_size"])
        if self.tasks:
            accuracy = evaluate_tasks(model, tokenizer, self.tasks, task_dir=s["task_dir"], limit=s["limit"],
                                      num_fewshot=s["num_fewshot"], batch_size=s["batch_size"])
            values["tasks"] = accuracy["tasks"]
            self.settings["harness"] = accuracy["settings"]
        return values

    def _run(self, trainer: L.Trainer, model: torch.nn.Module, tokenizer, stage: str) -> None:
        if trainer.is_global_zero:
            values = self._evaluate(model, tokenizer)
            self.results[stage] = {**values, **model_summary(model), "global_step": trainer.global_step}
            flat = {f"eval/{stage}/perplexity_{k}": v for k, v in values["perplexity"].items()}
            for task, scores in values.get("tasks", {}).items():
                flat.update({f"eval/{stage}/{task}_{m}": scores[m] for m in ("acc", "acc_norm")})
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=trainer.global_step)
                logger.save()
            RunDirectory(self.settings["output_dir"] or trainer.default_root_dir, overwrite=True).write_json(
                "metrics.json", {**self.results, "settings": self.settings, "versions": package_versions()}
            )
        trainer.strategy.barrier("evaluation")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.settings["before"] and "before" not in self.results:
            model = pl_module.model.get_base_model() if hasattr(pl_module.model, "get_base_model") else pl_module.model
            self._run(trainer, model, pl_module.tokenizer, "before")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = pl_module.model.training
        self._run(trainer, pl_module.export_model(), pl_module.tokenizer, "after")
        pl_module.model.train(was_training)

    def state_dict(self) -> dict:
        return {"results": self.results}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = state_dict.get("results", {})
