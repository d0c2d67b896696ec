"""``LightningCLI`` for recipes: ``python train.py fit --config configs/<recipe>.yaml``.

Model, data and callbacks are named explicitly by ``class_path`` in the YAML, so a
recipe reads as the list of stages it runs.
"""

from lightning.pytorch.cli import LightningCLI

__all__ = ["PruneCLI"]


class PruneCLI(LightningCLI):
    """LightningCLI with any LightningModule / LightningDataModule chosen by ``class_path``."""

    def __init__(self, args=None, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            **kwargs,
        )
