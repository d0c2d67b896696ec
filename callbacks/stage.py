"""``StageCallback``: run a list of stages in ``setup("fit")``, keep their decisions, write the run directory.

When: ``setup`` runs after the process group is up and before ``configure_optimizers``, the
checkpoint restore and the DDP wrapper, so the optimizer only ever sees the final
architecture. The module's idempotent ``configure_model`` is called first and the module is
moved to the training device (``trainer.strategy.root_device``), so calibration runs there.

What it does in one ``fit``:

1. measure the dense model (``evaluation``, rank 0; the others wait at a barrier);
2. for each stage: ``plan`` on the DataModule's ``calibration_blocks()`` (a stage whose
   statistics are sums takes this rank's shard and all-reduces through ``reduce``; the others
   run all blocks on every rank), check that every rank took the same decision, measure again;
3. write ``decisions.json`` (+ ``decisions.safetensors``) and hand the decisions to the module
   (``receive_decisions``: distillation trains the merged layers);
4. while training: ``mask_gradients`` before each optimizer step, ``constrain`` after each batch;
5. at the end: export (``pl_module.export_model()``, then every decision's ``on_export``),
   measure, save ``model/`` (and ``adapter/`` for peft) and ``metrics.json``.

Resume / validate / test: with ``resume_from`` (the CLI sets it from ``--ckpt_path``;
``"last"`` is the newest ``last.ckpt`` of the trainer's ModelCheckpoints) the decisions are read
from the checkpoint (``weights_only=True``) and replayed without data, so the state dict that
Lightning loads next fits. ``checkpoint["decisions"]`` is written by ``on_save_checkpoint``.
"""

import time
from dataclasses import asdict

import lightning as L
import torch

from lightning_prune.callbacks.checkpoints import read_checkpoint, resolve_checkpoint
from lightning_prune.errors import InputError
from lightning_prune.evaluation.suite import EvaluationSuite
from lightning_prune.hub import check_push, push_model
from lightning_prune.model_card import recipe_card
from lightning_prune.modules.slim import slim_record
from lightning_prune.onload import LayerOnloader, check_onload, finish_onload
from lightning_prune.results import DEFAULT_SHARD_SIZE, RunDirectory, model_summary, package_versions, shard_size_bytes
from lightning_prune.sparsity.masks import unwrap_model
from lightning_prune.stages import Decision, Stage
from lightning_prune.stages.plan import (
    CHECKPOINT_KEY,
    apply_decisions,
    check_fingerprint,
    check_stages,
    checkpoint_decisions,
    checkpoint_entry,
    fingerprint,
    format_plan,
    plan_json,
    plan_tensors,
    same_decisions,
)

__all__ = ["StageCallback", "PlanOnly"]


def _tokenizer(pl_module: L.LightningModule):
    return getattr(pl_module, "tokenizer", None)


class PlanOnly(Exception):
    """Raised after a dry run wrote its plan, to stop ``fit`` before training (the CLI exits 0)."""


class StageCallback(L.Callback):
    """Run stages before fitting and own the run directory.

    Args:
        stages: stages in order (e.g. ``PruneStage``, ``MergeStage``, ``SparsifyStage``).
        evaluation: what to measure densely, after each stage and after training (``None``: nothing).
        run_dir: where ``decisions.json``, ``metrics.json``, ``model/``, ``adapter/`` go
            (default: ``trainer.default_root_dir``).
        resume_from: checkpoint whose decisions to rebuild instead of planning (``"last"`` allowed).
        dry_run: plan, write ``decisions.json``, print the plan and stop before training.
        save_model: export and save the model at the end of fit.
        source: the model source to record in the plan (default: the module's ``hparams.model``).
        push_to_hub: upload the saved ``model/`` (with its card) to this Hub repo; credentials are
            checked here, before any work.
        max_shard_size: largest safetensors file of the saved model (``5GB``; bytes or ``500MB``,
            ``2GiB``...); a larger model is saved as several shards plus an index.
        onload: ``none`` (stages plan with the whole model on the training device) or ``layer``
            (decoder layers stay in host memory, or in ``offload_dir``, and run on the device one at
            a time while the stages plan and measure; training then gets the whole model as usual).
        offload_dir: with ``onload: layer``, keep the layers in memory-mapped files under this directory.
    """

    def __init__(
        self,
        stages: list[Stage] | tuple = (),
        evaluation: EvaluationSuite | None = None,
        run_dir: str | None = None,
        resume_from: str | None = None,
        dry_run: bool = False,
        save_model: bool = True,
        source: str | None = None,
        push_to_hub: str | None = None,
        max_shard_size: str = DEFAULT_SHARD_SIZE,
        onload: str = "none",
        offload_dir: str | None = None,
    ):
        if push_to_hub and (dry_run or not save_model):
            raise InputError("push_to_hub uploads the saved model; it needs save_model true and dry_run false")
        check_push(push_to_hub)
        shard_size_bytes(max_shard_size)  # a bad size fails here, before any weight loads
        check_onload(onload, offload_dir)
        self.onload, self.offload_dir = onload, offload_dir
        self.push_to_hub, self.max_shard_size = push_to_hub, max_shard_size
        self.stages, self.evaluation, self.run_dir = list(stages), evaluation, run_dir
        self.resume_from, self.dry_run, self.save_model, self.source = resume_from, dry_run, save_model, source
        self.decisions: list[Decision] | None = None
        self.results: dict[str, dict] = {}
        self.fingerprint: dict | None = None

    # ----- set-up ---------------------------------------------------------------------------
    def run(self, trainer: L.Trainer) -> RunDirectory:
        return RunDirectory(self.run_dir or trainer.default_root_dir, overwrite=True)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.decisions is not None:
            return
        path = resolve_checkpoint(trainer, self.resume_from)
        checkpoint = read_checkpoint(path) if path is not None else None
        self._load_base(pl_module, checkpoint, path)
        model = pl_module.model
        self.source = self.source or getattr(pl_module.hparams, "model", None)
        self.fingerprint = fingerprint(model.config)
        check_stages(self.stages, model.config)
        if checkpoint is not None:
            self.decisions = self._restore(checkpoint, path, model)
        elif stage == "fit":
            self.decisions = self._plan(trainer, pl_module)
        else:
            self.decisions = []
        if callable(getattr(pl_module, "receive_decisions", None)):
            pl_module.receive_decisions(self.decisions)

    @staticmethod
    def _load_base(pl_module: L.LightningModule, checkpoint: dict | None, path) -> None:
        """``configure_model``; when resuming a slim checkpoint, a base that cannot load names the model it needs."""
        slim = slim_record(checkpoint) if checkpoint is not None else None
        try:
            pl_module.configure_model()
        except InputError as error:
            if slim is None:
                raise
            raise InputError(
                f"checkpoint {str(path)!r} holds only the trained parameters; its frozen base "
                f"({len(slim['dropped'])} tensors) is rebuilt from model {slim['source']!r}, which could not be loaded "
                f"({error}); make that model available or pass its new location as the model"
            ) from error

    def _restore(self, checkpoint: dict, path, model: torch.nn.Module) -> list[Decision]:
        decisions = checkpoint_decisions(checkpoint, where=f"checkpoint {str(path)!r}")
        if decisions is None:
            raise InputError(f"checkpoint {str(path)!r} holds no stage decisions; it was not written by a lightning-prune recipe")
        stored = checkpoint[CHECKPOINT_KEY]["plan"].get("model") or {}
        check_fingerprint(stored.get("fingerprint") or {}, model.config, f"checkpoint {str(path)!r}")
        apply_decisions(model, decisions)
        return decisions

    def _reduce(self, trainer: L.Trainer):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.reduce(tensor.to(trainer.strategy.root_device), reduce_op="sum").to(tensor.device)

        return reduce

    def _calibration(self, trainer: L.Trainer) -> torch.Tensor:
        datamodule = trainer.datamodule
        if not callable(getattr(datamodule, "calibration_blocks", None)):
            raise InputError("stages need a DataModule with calibration_blocks(), e.g. lightning_prune.data.datamodule.TextDataModule")
        return datamodule.calibration_blocks()

    def _shard(self, trainer: L.Trainer, blocks: torch.Tensor, stage: Stage) -> torch.Tensor:
        if not stage.shards_calibration or trainer.world_size == 1:
            return blocks
        if len(blocks) < trainer.world_size:
            raise InputError(
                f"{len(blocks)} calibration blocks cannot be shared by {trainer.world_size} ranks; raise data calibration_samples"
            )
        return blocks[trainer.global_rank :: trainer.world_size]

    def _agree(self, trainer: L.Trainer, decision: Decision) -> None:
        reference = trainer.strategy.broadcast(decision.signature(), src=0)
        if reference != decision.signature():
            raise RuntimeError(
                f"rank {trainer.global_rank} decided {decision.signature()} but rank 0 decided {reference}; "
                "calibration statistics must be reduced over ranks"
            )

    def _plan(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Decision]:
        if self.onload == "layer":
            LayerOnloader(pl_module.model, trainer.strategy.root_device, self.offload_dir).attach()
        else:
            pl_module.to(trainer.strategy.root_device)
        try:
            return self._plan_stages(trainer, pl_module)
        finally:
            finish_onload(pl_module.model)

    def _plan_stages(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Decision]:
        model = pl_module.model
        before = model_summary(model)
        self._measure(trainer, model, _tokenizer(pl_module), "dense")
        decisions = []
        blocks = self._calibration(trainer) if any(stage.needs_calibration() for stage in self.stages) else None
        for stage in self.stages:  # a stage that needs the unchanged model (a dense teacher) sees it now
            stage.observe(
                model, self._shard(trainer, blocks, stage) if stage.needs_calibration() else None, progress=trainer.is_global_zero
            )
        for stage in self.stages:
            stage.follow(decisions)
            start = time.perf_counter()
            decision = stage.plan(
                model,
                self._shard(trainer, blocks, stage) if stage.needs_calibration() else None,
                reduce=self._reduce(trainer),
                progress=trainer.is_global_zero,
            )
            self._agree(trainer, decision)
            decisions.append(decision)
            self._measure(
                trainer, model, _tokenizer(pl_module), f"after {stage.name}", seconds=time.perf_counter() - start, **decision.measurements()
            )
        if trainer.is_global_zero:
            self.run(trainer).write_plan(plan_json(decisions, self.fingerprint, self.source), plan_tensors(decisions))
        trainer.strategy.barrier("stage plan")
        if self.dry_run:
            if trainer.is_global_zero:
                print(format_plan(decisions, before, model_summary(model)))
            raise PlanOnly(str(self.run(trainer).path / "decisions.json"))
        return decisions

    # ----- measuring and the run directory ---------------------------------------------------
    def _measure(self, trainer: L.Trainer, model: torch.nn.Module, tokenizer, label: str, **extra) -> None:
        if self.evaluation is None or self.dry_run:  # a dry run writes nothing but decisions.json
            return
        if trainer.is_global_zero:
            values = self.evaluation.evaluate(model, tokenizer)
            self.results[label] = {**values, **extra, "global_step": trainer.global_step}
            flat = {f"eval/{label.replace(' ', '_')}/perplexity_{k}": v for k, v in values["perplexity"].items()}
            for task, scores in values.get("tasks", {}).items():
                flat.update({f"eval/{label.replace(' ', '_')}/{task}_{m}": scores[m] for m in ("acc", "acc_norm")})
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=trainer.global_step)
            self._write_metrics(trainer)
        trainer.strategy.barrier(f"evaluation {label}")

    def _write_metrics(self, trainer: L.Trainer) -> None:
        settings = {
            "run_dir": str(self.run(trainer).path),
            "model": self.source,
            "stages": [{"name": s.name, **asdict(s)} for s in self.stages],
            "evaluation": self.evaluation.settings() if self.evaluation else None,
            "onload": self.onload,
            "offload_dir": self.offload_dir,
        }
        self.run(trainer).write_json("metrics.json", {**self.results, "settings": settings, "versions": package_versions()})

    def export(self, pl_module: L.LightningModule) -> torch.nn.Module:
        """The plain model to save: the module's export, then every decision's ``on_export``."""
        export = getattr(pl_module, "export_model", None)
        model = export() if callable(export) else pl_module.model
        for decision in self.decisions or []:
            decision.on_export(model)
        return model

    def _card(self, trainer: L.Trainer, model: torch.nn.Module) -> str:
        data = {}
        hparams = getattr(trainer.datamodule, "hparams", None)
        if hparams:
            data["training and calibration"] = ", ".join(f"{key}={value}" for key, value in dict(hparams).items() if key != "tokenizer")
        if self.evaluation is not None:
            data["evaluation"] = ", ".join(f"{key}={value}" for key, value in self.evaluation.settings().items() if value not in (None, ""))
        config = self.run(trainer).path / "config.yaml"
        config_text = config.read_text(encoding="utf-8") if config.exists() else None
        return recipe_card(self.source, self.decisions or [], self.results, data, config_text, model_summary(model))

    # ----- training ---------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for decision in self.decisions or []:
            decision.mask_gradients(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for decision in self.decisions or []:
            decision.constrain(pl_module.model)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = pl_module.model.training
        model = self.export(pl_module)
        self._measure(trainer, model, _tokenizer(pl_module), "after training")
        if self.save_model and trainer.is_global_zero:
            run = self.run(trainer)
            run.save_model(
                model,
                _tokenizer(pl_module),
                card=self._card(trainer, model),
                decisions=self.decisions or [],
                max_shard_size=self.max_shard_size,
            )
            if unwrap_model(pl_module.model) is not pl_module.model:
                run.save_model(pl_module.model, name="adapter")
            if self.push_to_hub:
                push_model(run.path / "model", self.push_to_hub)
        trainer.strategy.barrier("export")
        pl_module.model.train(was_training)

    # ----- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = checkpoint_entry(self.decisions or [], self.fingerprint, self.source)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Refuse a checkpoint taken after other decisions (our modules refuse it earlier, before its weights load)."""
        stored = checkpoint_decisions(checkpoint)
        if stored is not None and not same_decisions(stored, self.decisions or []):
            raise InputError(
                f"checkpoint was written after {[d.summary() for d in stored]} but this run applied "
                f"{[d.summary() for d in self.decisions or []] or 'no stages'}; resume through "
                "StageCallback(resume_from=<checkpoint>) (the CLI does this for --ckpt_path)"
            )

    def state_dict(self) -> dict:
        return {"results": self.results}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = {**state_dict.get("results", {}), **self.results}
