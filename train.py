"""Run a recipe: ``python train.py fit --config configs/demo.yaml`` (LightningCLI)."""

from lightning_prune.cli import lightning_main

if __name__ == "__main__":
    lightning_main()
