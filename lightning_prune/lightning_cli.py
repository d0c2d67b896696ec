"""``LightningCLI`` for recipes: ``lightning-prune fit --config <recipe>`` (or ``python train.py fit ...``).

A recipe names its LightningModule and DataModule by ``class_path`` and adds top-level
sections that every flag can reach:

- ``run_dir``: the one output location: ``config.yaml``, ``decisions.json``, ``metrics.json``,
  ``model/``, ``adapter/``, ``checkpoints/`` (ModelCheckpoints without a ``dirpath``) and
  ``logs/`` (a CSV logger, and a TensorBoard one when ``tensorboard`` is installed, unless the
  recipe sets ``trainer.logger``);
- ``stages``: stage names in order (``prune``, ``merge``, ``sparsify``), each configured by its
  own section (``prune:``, ``merge:``, ``sparsify:``; e.g. ``--prune.num_layers 3``);
- ``evaluation``: what ``metrics.json`` measures (``--evaluate false`` turns it off);
- ``dry_run``: plan, write ``decisions.json``, print the plan, stop before training;
- ``push_to_hub``: upload ``model/`` (with its model card) to a Hub repo at the end;
- ``max_shard_size``: largest safetensors file of the saved ``model/`` (default 5GB);
- ``onload`` / ``offload_dir``: ``onload: layer`` plans the stages with one decoder layer at a
  time on the device (the others in host memory, or memory-mapped files in ``offload_dir``).

``model.init_args.model`` is linked to ``data.init_args.tokenizer``: changing the model changes
the tokenizer. ``--ckpt_path`` (``fit``, ``validate``, ``test``) is handed to the
:class:`~lightning_prune.callbacks.stage.StageCallback`, which rebuilds the checkpoint's decided
architecture before Lightning loads its weights.
"""

import difflib
import importlib.util
import logging
import re
import warnings
from pathlib import Path

from jsonargparse import ActionConfigFile
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from lightning_prune.callbacks.cleanup import RemoveFailedRun
from lightning_prune.callbacks.stage import StageCallback
from lightning_prune.errors import InputError
from lightning_prune.evaluation.suite import EvaluationSuite
from lightning_prune.extras import missing_extra, missing_extra_in
from lightning_prune.model.loading import load_config
from lightning_prune.progress import StepBudgetProgressBar
from lightning_prune.results import DEFAULT_SHARD_SIZE, RunDirectory
from lightning_prune.stages import STAGES
from lightning_prune.stages.plan import check_stages
from lightning_prune.validation.recipe import check_checkpoint_file, check_recipe

__all__ = ["PruneCLI", "RunConfig", "RecipeParser", "RecipeError", "quiet_third_party", "run_loggers"]


class _NoAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: … try installing …" product suggestions."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip:")


def quiet_third_party() -> None:
    """Silence adverts and deprecation notices that come from libraries' own calls, not from the user's recipe."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())
    # peft reads model.is_gradient_checkpointing (deprecated in transformers 5); Lightning's own pytree use
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # a distillation's frozen teacher is a submodule kept in eval mode on purpose (each step sets it again)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class RecipeError(InputError):
    """A recipe or flag that does not parse; the CLI prints its first line."""


class RecipeParser(LightningArgumentParser):
    """Parser whose errors are one :class:`RecipeError` instead of usage text plus a nested message."""

    def error(self, message: str, ex: Exception | None = None):
        raise RecipeError(missing_extra(ex) or missing_extra_in(str(message)) or _condensed(message))


def _essential(lines: list[str]) -> str:
    """The first line, completed by what it announces: the expected type and value, or the YAML problem."""
    first = lines[0] if lines else "invalid recipe"
    nested = re.search(r"NestedArg\(key='([^']+)', val='([^']*)'\)", " ".join(lines))
    if first.startswith("Parser key") and nested:
        return f"{first} {nested.group(1)} does not accept {nested.group(2)!r}"
    expected = [line for line in lines[1:] if line.startswith(("Expected", "- Expected")) and "NoneType" not in line]
    if first.startswith("Parser key") and expected:
        return f"{first} {expected[0].lstrip('- ')}"
    if first.startswith("Problems parsing config"):
        return " ".join(lines)
    return first


def _condensed(message: str) -> str:
    """The essential line of a jsonargparse message, with the valid options of a mistyped stage key."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    first = _essential(lines)
    for line in lines:
        if "unrecognized arguments" in line or "does not accept nested key" in line or "No action for key" in line:
            first = line
    for name, stage in STAGES.items():
        if f"{name}." in first or f"'{name}" in first:
            fields = sorted(stage.__dataclass_fields__)
            return f"{first}; valid {name} options: {', '.join(fields)}"
    return first


class RunConfig(SaveConfigCallback):
    """Writes the parsed recipe to ``run_dir/config.yaml`` (rank 0, atomically) when ``fit`` starts."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            text = self.parser.dump(self.config, skip_none=False)
            RunDirectory(self.config["run_dir"], overwrite=True).write_text("config.yaml", text)


def run_loggers(run_dir: Path) -> list:
    """A CSV logger in ``run_dir/logs``, plus a TensorBoard logger there when ``tensorboard`` is installed."""
    loggers = [CSVLogger(save_dir=str(run_dir), name="", version="logs")]
    if importlib.util.find_spec("tensorboard") is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="", version="logs"))
    return loggers


def _stage_names(names: list[str]) -> list[str]:
    for name in names:
        if name not in STAGES:
            close = difflib.get_close_matches(name, STAGES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InputError(f"stages: {name!r} is not a stage{hint}; choose from {', '.join(STAGES)}")
    return list(names)


class PruneCLI(LightningCLI):
    """LightningCLI with the run directory, stage sections, evaluation and the model-tokenizer link."""

    def __init__(self, args=None, **kwargs):
        kwargs.setdefault("save_config_callback", RunConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True, "save_to_log_dir": False})
        kwargs.setdefault("seed_everything_default", 0)
        quiet_third_party()
        self.stage_callback: StageCallback | None = None
        super().__init__(model_class=None, datamodule_class=None, subclass_mode_model=True, subclass_mode_data=True, args=args, **kwargs)

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)  # a typo such as --prune.num_layer must not match --prune.num_layers
        parser = RecipeParser(**kwargs)
        parser.add_argument("-c", "--config", action=ActionConfigFile, help="A recipe: a YAML path or a shipped recipe name.")
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/run", help="The one output directory of the run.")
        parser.add_argument("--stages", type=list[str], default=[], help=f"Stage names in order, from: {', '.join(STAGES)}.")
        for name, stage in STAGES.items():
            parser.add_class_arguments(stage, name, instantiate=True)
        parser.add_class_arguments(EvaluationSuite, "evaluation", instantiate=True)
        parser.add_argument("--evaluate", type=bool, default=True, help="Measure dense, after each stage and after training.")
        parser.add_argument("--dry_run", type=bool, default=False, help="Plan, write decisions.json, print the plan, stop.")
        parser.add_argument("--push_to_hub", type=str | None, default=None, help="Upload model/ (with its card) to this Hub repo.")
        parser.add_argument(
            "--max_shard_size", type=str, default=DEFAULT_SHARD_SIZE, help="Largest safetensors shard of model/ (500MB, 5GB, 2GiB, bytes)."
        )
        parser.add_argument(
            "--onload",
            type=str,
            default="none",
            help="Stages plan with the whole model on the device (none) or one layer at a time (layer).",
        )
        parser.add_argument("--offload_dir", type=str | None, default=None, help="With onload layer: layers in memory-mapped files here.")
        parser.link_arguments("model.init_args.model", "data.init_args.tokenizer")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then check a ``--ckpt_path`` file before Lightning reads hyper-parameters from it."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and path != "last":
            check_checkpoint_file(str(path))

    def before_instantiate_classes(self) -> None:
        """Check the parsed recipe (numbers, devices, model files, data, run_dir) before any class is built."""
        check_recipe(self.config[self.subcommand] if self.subcommand else self.config)

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run_dir = Path(config["run_dir"])
        stages = [config[name] for name in _stage_names(config["stages"])]
        model_source = getattr(self.model.hparams, "model", None)
        if model_source is not None:
            check_stages(stages, load_config(model_source))
        if config["evaluate"]:
            config["evaluation"].check()
        self.stage_callback = StageCallback(
            stages,
            evaluation=config["evaluation"] if config["evaluate"] else None,
            run_dir=str(run_dir),
            dry_run=config["dry_run"],
            source=model_source,
            push_to_hub=config["push_to_hub"],
            max_shard_size=config["max_shard_size"],
            onload=config["onload"],
            offload_dir=config["offload_dir"],
        )
        trainer = config["trainer"]
        callbacks = list(trainer.get("callbacks") or [])
        for callback in callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(run_dir / "checkpoints")
        if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepBudgetProgressBar())
        kwargs.update(callbacks=[RemoveFailedRun(str(run_dir)), self.stage_callback, *callbacks], default_root_dir=str(run_dir))
        if config["dry_run"]:
            kwargs["logger"] = False  # a dry run writes nothing but decisions.json
        elif trainer.get("logger") in (None, True):
            kwargs["logger"] = run_loggers(run_dir)
        return super().instantiate_trainer(**kwargs)

    def _hand_checkpoint(self) -> None:
        path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        if path:
            self.stage_callback.resume_from = str(path)

    def before_fit(self) -> None:
        self._hand_checkpoint()

    def before_validate(self) -> None:
        self._hand_checkpoint()

    def before_test(self) -> None:
        self._hand_checkpoint()
