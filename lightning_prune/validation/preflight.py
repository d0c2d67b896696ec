"""Pre-flight checks of a command's options: everything a user passes, checked before any weight loads.

The checks go by option name, so every command gets the same ones: numeric ranges, the
device and dtype, the model source (config and weight headers), data files (present,
non-empty, UTF-8, jsonl text fields; read in full when small), task names and the output
location.
"""

from lightning_prune.data.hub import hub_rows, parse_hub_spec
from lightning_prune.data.tasks import TASK_NAMES, is_task, load_task
from lightning_prune.data.text import NAMED_CORPORA, local_data_file, read_text
from lightning_prune.errors import InputError
from lightning_prune.evaluation.suite import split_names
from lightning_prune.model.loading import load_config, resolve_device, resolve_dtype
from lightning_prune.onload import check_onload
from lightning_prune.results import size_bytes
from lightning_prune.validation.locations import check_output_location
from lightning_prune.validation.model_files import check_model_files
from lightning_prune.validation.numbers import check_numbers

__all__ = ["DATA_OPTIONS", "FULL_READ_BYTES", "check_model", "check_data_source", "check_command"]

DATA_OPTIONS = ("eval_data", "calibration_data", "train_data", "val_data")
# Local data files up to this size are read (decoded, jsonl fields checked) before any weights load.
FULL_READ_BYTES = 32 * 1024 * 1024


def check_model(name: str) -> None:
    """The model source's files and its config (a wrong-typed field is one line, not a traceback)."""
    from huggingface_hub.errors import StrictDataclassError

    check_model_files(name)
    try:
        load_config(name)
    except (TypeError, KeyError, AttributeError, StrictDataclassError) as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise InputError(f"model {name!r} has an invalid config.json: {detail}") from error


# The split each data option reads (a Hub spec's own @split wins).
OPTION_SPLITS = {"calibration_data": "validation", "train_data": "validation", "val_data": "validation"}


def check_data_source(source: str, option: str) -> None:
    """A local data file exists, is non-empty and decodes (when small it is read in full: text fields,
    task items); a Hub dataset's split loads (into the ``datasets`` cache) with its text column."""
    if source in TASK_NAMES:
        return
    path = local_data_file(source)
    if path is None:
        try:
            hub_rows(parse_hub_spec(source, list(NAMED_CORPORA)), OPTION_SPLITS.get(option, "test"))
        except InputError as error:
            raise InputError(f"--{option}: {error}") from error
        return
    if source in NAMED_CORPORA or path.stat().st_size > FULL_READ_BYTES:
        return
    try:
        if is_task(source):
            load_task(source)
        else:
            read_text(source)
    except InputError as error:
        raise InputError(f"--{option}: {error}") from error


def check_command(options: dict) -> None:
    """Check a command's parsed options (name -> value) before it runs."""
    check_numbers(options)
    if "device" in options:
        device = resolve_device(options["device"])
        if "dtype" in options:
            resolve_dtype(options["dtype"], device)
    if "output_dir" in options and options["output_dir"]:
        check_output_location(options["output_dir"])
    if "onload" in options:
        check_onload(options["onload"], options.get("offload_dir"))
    if options.get("offload_dir"):
        check_output_location(options["offload_dir"], "--offload_dir")
    if options.get("max_device_memory") is not None:
        size_bytes(options["max_device_memory"], "max_device_memory")
    if isinstance(options.get("model"), str):
        check_model(options["model"])
    for option in DATA_OPTIONS:
        for source in split_names(options.get(option) or ""):
            check_data_source(source, option)
