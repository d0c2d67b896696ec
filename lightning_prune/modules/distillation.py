"""``LayerwiseDistillation``: train merged layers to reproduce the teacher's hidden states.

Paper 004 App. B.2, Alg. 3 (CoMe-sp) and Alg. 4 (CoMe-mp); the loss is
:func:`lightning_prune.merging.distill.distillation_loss` (``loss``, default ``mse_norm``;
``kl_raw`` is the paper's Eq. 6) on the mapping P (student layer ``b`` -> last original
layer ``a`` it replaces). The teacher is the original model (frozen, eval
mode, no grad); the student is the same model after :class:`LayerMergingCallback` merged it
in ``setup("fit")``. Only the merged layers' parameters train (their count is asserted).

- ``mode: sp`` - one student and one teacher forward per batch, the sum of the KL of every
  mapped pair, one AdamW (weight decay 1e-2) with cosine decay from ``learning_rate``
  (1e-5). Under DDP it is ordinary data parallelism.
- ``mode: mp`` - one merged layer at a time, shallow -> deep, ``epochs_per_layer`` epochs
  each, its own AdamW and cosine schedule with the k-th entry of ``learning_rates``. The
  prediction comes from the student's own path (Alg. 4) unless ``teacher_forced``, which feeds
  the teacher's boundary state (input of the group's first original layer) into the merged
  layer; those states are computed once per batch and cached (memory, then disk), so a step
  runs a single layer. Under DDP the teacher-forced layers are spread over ranks (layer k on
  rank ``k % world_size``; every rank must see every batch, hence
  ``data.init_args.shard: false``), nothing is all-reduced, and the trained layers
  are broadcast from their owners at the end: the result equals a one-process run with the
  same data order. The student-path variant averages the current layer's gradients over ranks.
"""

import contextlib
import copy
import math

import torch

from lightning_prune.capture import capture_layer_inputs, run_layers
from lightning_prune.errors import InputError
from lightning_prune.merging.distill import BoundaryCache, check_distillation_loss, distillation_loss, layer_outputs
from lightning_prune.merging.progressive import MappedLayer, layer_mapping
from lightning_prune.model.anatomy import Anatomy
from lightning_prune.modules.causal_lm import CausalLMModule
from lightning_prune.modules.optim import adamw_cosine, warmup_cosine

__all__ = ["DISTILLATION_MODES", "MP_LEARNING_RATES", "LayerwiseDistillation"]

DISTILLATION_MODES = ("sp", "mp")
MP_LEARNING_RATES = (5e-4, 2.5e-4, 1e-4, 7.5e-5, 5e-5, 2.5e-5, 1e-5)  # paper App. B.2, LLaMA-2-7B, shallow -> deep


class LayerwiseDistillation(CausalLMModule):
    """Distil merged layers from the original model (CoMe-sp / CoMe-mp).

    Args:
        model: 'demo', a Hub id, a local model directory or a .gguf file (teacher and student).
        dtype: weight dtype (auto: bfloat16 on a CUDA device that supports it, else float32).
        mode: ``sp`` (all merged layers jointly) or ``mp`` (one merged layer at a time).
        learning_rate: sp learning rate (paper: 1e-5).
        learning_rates: mp learning rate per merged layer, shallow -> deep (paper: 5e-4 ... 1e-5).
        weight_decay: AdamW weight decay (paper: 1e-2).
        warmup_steps: linear warm-up steps before the cosine decay (per layer in mp).
        epochs_per_layer: mp epochs over the training data for each merged layer.
        teacher_forced: mp only: feed the teacher's boundary hidden state into the merged layer.
        cache_memory_mb: teacher-forced boundary cache budget in memory; the rest goes to disk.
        cache_dir: where spilled boundary states go (default: a temporary directory).
        loss: distillation loss, a name of :data:`lightning_prune.merging.distill.DISTILLATION_LOSSES`.
            Default ``mse_norm`` (MSE between per-token RMS-normalised states): a first
            measurement on SmolLM2 CoMe 30->23 layers gave WikiText-2 perplexity 175.3 -> 87.2
            with MSE after the final norm, while the paper's raw-state KL (``kl_raw``) made it
            worse, 175.3 -> 214.4 (a massive-activation dimension takes ~0.999 of the raw
            softmax mass, so ``kl_raw`` is blind to the other dimensions).
    """

    def __init__(
        self,
        model: str = "demo",
        dtype: str = "auto",
        mode: str = "sp",
        learning_rate: float = 1e-5,
        learning_rates: list[float] = list(MP_LEARNING_RATES),
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        epochs_per_layer: int = 1,
        teacher_forced: bool = False,
        cache_memory_mb: int = 1024,
        cache_dir: str | None = None,
        loss: str = "mse_norm",
    ):
        check_distillation_loss(loss)
        if mode not in DISTILLATION_MODES:
            raise InputError(f"mode {mode!r} is not known; choose one of {', '.join(DISTILLATION_MODES)}")
        if teacher_forced and mode != "mp":
            raise InputError("teacher_forced applies to mode 'mp' only; set mode: mp or teacher_forced: false")
        if epochs_per_layer < 1:
            raise InputError(f"epochs_per_layer {epochs_per_layer} must be >= 1")
        super().__init__(model=model, dtype=dtype, learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.save_hyperparameters()
        self.automatic_optimization = mode == "sp"
        self.teacher = None
        self.groups: list[list[int]] | None = None
        self.mapping: list[MappedLayer] = []
        self._cache: BoundaryCache | None = None
        self._stage_steps = 1
        self._gathered = False

    # ----- set-up -------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the model once and keep a frozen copy as the teacher; nothing trains until merged."""
        if self.model is not None:
            return
        super().configure_model()
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.model.requires_grad_(False)

    def receive_decisions(self, decisions: list) -> None:
        """Take the merge groups of the merge decision (``StageCallback``); other decisions change no mapping."""
        super().receive_decisions(decisions)
        merges = [d for d in decisions if d.kind == "merge"]
        if merges:
            self.set_groups(merges[-1].groups)

    def set_groups(self, groups: list[list[int]]) -> None:
        """Record the merge (``groups[b]`` = original layers of student layer b) and unfreeze merged layers."""
        depth, teacher_depth = Anatomy(self.model).num_layers, Anatomy(self.teacher).num_layers
        if len(groups) != depth or sum(len(g) for g in groups) != teacher_depth:
            raise InputError(
                f"merge groups for {len(groups)} layers / {sum(len(g) for g in groups)} originals do not fit "
                f"a {depth}-layer student of a {teacher_depth}-layer teacher"
            )
        mapping = layer_mapping(groups)
        if self.hparams.mode == "mp" and len(self.hparams.learning_rates) < len(mapping):
            raise InputError(
                f"learning_rates has {len(self.hparams.learning_rates)} entries but the merge produced "
                f"{len(mapping)} merged layers; give at least {len(mapping)} learning rates, shallow -> deep"
            )
        self.groups, self.mapping = [list(g) for g in groups], mapping
        self.model.requires_grad_(False)
        for entry in mapping:
            self._layer(entry).requires_grad_(True)
        expected = sum(p.numel() for e in mapping for p in self._layer(e).parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        assert trainable == expected, f"{trainable} trainable parameters, expected {expected} (merged layers only)"

    def _layer(self, entry: MappedLayer) -> torch.nn.Module:
        return Anatomy(self.model).layers[entry.student]

    @property
    def distributed_layers(self) -> bool:
        """Teacher-forced mp on several ranks: each rank trains its own share of merged layers."""
        return self.hparams.mode == "mp" and self.hparams.teacher_forced and self.trainer.world_size > 1

    def owned_layers(self) -> list[int]:
        """Indices into the mapping that this rank trains, shallow -> deep."""
        if not self.distributed_layers:
            return list(range(len(self.mapping)))
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return [k for k in range(len(self.mapping)) if k % world == rank]

    def num_stages(self) -> int:
        world = self.trainer.world_size if self.distributed_layers else 1
        return math.ceil(len(self.mapping) / world)

    def configure_optimizers(self):
        if not self.mapping:
            raise InputError("no merged layers to distil; add a merge stage (recipe: stages: [merge])")
        hp = self.hparams
        if hp.mode == "sp":
            return adamw_cosine(
                self.trainable_parameters(),
                lr=hp.learning_rate,
                weight_decay=hp.weight_decay,
                warmup_steps=hp.warmup_steps,
                total_steps=self.trainer.estimated_stepping_batches,
            )
        configured = []
        for k, entry in enumerate(self.mapping):
            optimizer = torch.optim.AdamW(self._layer(entry).parameters(), lr=hp.learning_rates[k], weight_decay=hp.weight_decay)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: warmup_cosine(step, warmup_steps=hp.warmup_steps, total_steps=self._stage_steps)
            )
            configured.append({"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}})
        return configured

    def on_fit_start(self) -> None:
        if self.hparams.mode == "mp":
            if self.distributed_layers and getattr(self.trainer.datamodule, "hparams", {}).get("shard", True):
                raise InputError("teacher-forced mp on several ranks needs every batch on every rank; set data.init_args.shard: false")
            self.trainer.fit_loop.max_epochs = self.num_stages() * self.hparams.epochs_per_layer

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()

    # ----- training -----------------------------------------------------------------------
    def training_step(self, batch: torch.Tensor, batch_index: int):
        if self.hparams.mode == "sp":
            return self._sp_step(batch)
        return self._mp_step(batch)

    def sp_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Alg. 3: sum over P of loss(teacher H^(a), student H^(b)) from one forward each."""
        with torch.no_grad():
            targets = layer_outputs(self.teacher, batch, [m.teacher_last for m in self.mapping])
        predictions = layer_outputs(self.model, batch, [m.student for m in self.mapping])
        return sum(self.pair_loss(targets[m.teacher_last], predictions[m.student]) for m in self.mapping)

    def pair_loss(self, target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The configured ``loss`` between one teacher state and one student state (B, T, D)."""
        return distillation_loss(self.hparams.loss, target, prediction, norm=Anatomy(self.model).final_norm)

    def _sp_step(self, batch: torch.Tensor) -> torch.Tensor:
        loss = self.sp_loss(batch)
        self.log("train_kl", loss, prog_bar=True)
        return loss

    def mp_pair(self, batch: torch.Tensor, entry: MappedLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) for one merged layer: student path or teacher-forced input."""
        if self.hparams.teacher_forced:
            states = self.boundary_cache().get(batch)
            kwargs = capture_layer_inputs(self.model, [batch], start=0).kwargs[0]
            hidden, target = states["inputs"][entry.teacher_first], states["targets"][entry.teacher_last]
            return run_layers(self.model, hidden, kwargs, [entry.student]), target
        with torch.no_grad():
            target = layer_outputs(self.teacher, batch, [entry.teacher_last])[entry.teacher_last]
        inputs = capture_layer_inputs(self.model, [batch], start=entry.student)
        return run_layers(self.model, inputs.hidden[0], inputs.kwargs[0], [entry.student]), target

    def _mp_step(self, batch: torch.Tensor):
        """Alg. 4 step for the merged layer of the current stage (manual optimization)."""
        stage = self.current_epoch // self.hparams.epochs_per_layer
        owned = self.owned_layers()
        if stage >= len(owned):
            return None
        k = owned[stage]
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        optimizer = optimizers[k] if isinstance(optimizers, list) else optimizers
        scheduler = schedulers[k] if isinstance(schedulers, list) else schedulers
        prediction, target = self.mp_pair(batch, self.mapping[k])
        loss = self.pair_loss(target, prediction)
        optimizer.zero_grad()
        with getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)():
            self.manual_backward(loss)
        if self.trainer.world_size > 1 and not self.distributed_layers:
            for parameter in self._layer(self.mapping[k]).parameters():
                parameter.grad = self.trainer.strategy.reduce(parameter.grad, reduce_op="mean")
        optimizer.step()
        scheduler.step()
        self.log("train_kl", loss.detach(), prog_bar=True)
        self.log("merged_layer", float(self.mapping[k].student))
        return loss.detach()

    def boundary_cache(self) -> BoundaryCache:
        """The teacher-state cache for this rank's layers (created on first use)."""
        if self._cache is None:
            entries = [self.mapping[k] for k in self.owned_layers()]
            self._cache = BoundaryCache(
                self.teacher,
                [m.teacher_first for m in entries],
                [m.teacher_last for m in entries],
                memory_bytes=self.hparams.cache_memory_mb << 20,
                directory=self.hparams.cache_dir,
            )
        return self._cache

    def gather_layers(self) -> None:
        """Teacher-forced mp on several ranks: every rank receives each trained layer from its owner (once).

        A collective: every rank must call it. ``StageCallback`` calls it through :meth:`export_model`
        in its ``on_train_end``, which Lightning runs before the module's own ``on_train_end``.
        """
        several = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        if not several or not self.distributed_layers or self._gathered:
            return
        world = torch.distributed.get_world_size()
        for k, entry in enumerate(self.mapping):
            for parameter in self._layer(entry).parameters():
                torch.distributed.broadcast(parameter.data, src=k % world)
        self._gathered = True

    def export_model(self) -> torch.nn.Module:
        """The student, with every rank's trained layers gathered first."""
        self.gather_layers()
        return super().export_model()

    def on_train_start(self) -> None:
        self._gathered = False
        self._stage_steps = max(1, int(self.trainer.num_training_batches) * self.hparams.epochs_per_layer)

    def on_train_end(self) -> None:
        self.gather_layers()
