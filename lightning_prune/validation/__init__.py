"""Pre-flight checks: every user input is checked before any work, and a bad one is one line (exit code 2)."""

from lightning_prune.validation.locations import check_output_location
from lightning_prune.validation.model_files import check_model_files, check_safetensors
from lightning_prune.validation.names import check_task_name
from lightning_prune.validation.numbers import RANGES, check_numbers

__all__ = ["RANGES", "check_numbers", "check_model_files", "check_safetensors", "check_output_location", "check_task_name"]
