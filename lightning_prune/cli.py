"""Command line: ``lightning-prune <command>``.

Functional commands (evaluate, prune, …) are plain functions in
:mod:`lightning_prune.commands` whose signatures and docstrings become the options and
their help. ``fit`` / ``validate`` / ``test`` go to a :class:`LightningCLI` that builds a
LightningModule, a DataModule and callbacks from a YAML config. Bad input gives one line on
stderr and exit code 2.
"""

import inspect
import json
import logging
import sys
import typing
import warnings
from collections.abc import Callable
from dataclasses import fields, is_dataclass

from jsonargparse import ArgumentParser

from lightning_prune.errors import InputError
from lightning_prune.extras import missing_extra
from lightning_prune.summary import summarize

__all__ = ["main", "lightning_main", "build_parser"]

PROG = "lightning-prune"
# bitsandbytes announces on import that an optional CPU kernel package is absent; its
# fallback kernels are used and the notice is not an error of the user's run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Old option names, accepted for one release with a note: {old: {command: new}}.
RENAMED_OPTIONS = {
    "data": {"evaluate": "eval_data", "prune": "eval_data", "merge": "eval_data", "sparsify": "calibration_data"},
    "num_samples": {"evaluate": "eval_samples", "prune": "eval_samples", "merge": "eval_samples"},
    "num_items": {"relevance": "calibration_samples"},
}
# A recipe's own yes/no options (the LightningCLI's top level) that may be given bare.
RECIPE_FLAGS = ("dry_run", "evaluate")


def _fail(message: str) -> None:
    first_line = " ".join(message.split()) or "invalid input"
    print(f"{PROG}: error: {first_line}", file=sys.stderr)
    sys.exit(2)


class _OneLineParser(ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str, ex: Exception | None = None):
        _fail(message)


def _summary(function: Callable) -> str:
    return (function.__doc__ or "").strip().splitlines()[0]


def _groups(function: Callable) -> dict[str, type]:
    """Parameters of ``function`` typed with a dataclass: their fields become the command's flags."""
    hints = typing.get_type_hints(function)
    return {name: hints[name] for name in inspect.signature(function).parameters if is_dataclass(hints.get(name))}


def _command_parser(name: str, function: Callable, full: bool) -> ArgumentParser:
    """One subcommand's parser; its options (from the signature, dataclass parameters flattened) only when ``full``."""
    sub = _OneLineParser(prog=f"{PROG} {name}", description=_summary(function))
    if not full:
        return sub
    sub.add_argument("--json", type=bool, default=False, help="print the full result as JSON instead of the summary table")
    groups = _groups(function)
    sub.add_function_arguments(function, as_group=False, skip=set(groups))
    added = set(inspect.signature(function).parameters) - set(groups)
    for group in groups.values():
        own = {f.name for f in fields(group)}
        sub.add_class_arguments(group, None, as_group=False, skip=own & added, instantiate=False)
        added |= own
    return sub


def build_parser(commands: dict[str, Callable], selected: str | None = None) -> ArgumentParser:
    """Parser with one subcommand per function; options come from each signature (dataclass parameters flattened).

    With ``selected``, only that subcommand gets its options (the others keep their one-line
    help): reading docstrings into options is most of the start-up time.
    """
    parser = _OneLineParser(
        prog=PROG,
        description="One-shot commands below. Recipes (stages + training in one Lightning fit): "
        "lightning-prune fit|validate|test --config NAME_OR_YAML [--section.option value ...]; "
        "lightning-prune recipes [list | copy NAME DEST].",
    )
    subcommands = parser.add_subcommands(dest="command")
    for name, function in commands.items():
        full = selected is None or name == selected
        subcommands.add_subcommand(name, _command_parser(name, function, full), help=_summary(function))
    return parser


def _bool_options(function: Callable) -> set[str]:
    """Names of the command's yes/no options (plain parameters and dataclass fields typed ``bool``)."""
    hints = typing.get_type_hints(function)
    names = {name for name in inspect.signature(function).parameters if hints.get(name) is bool}
    for group in _groups(function).values():
        group_hints = typing.get_type_hints(group)
        names |= {f.name for f in fields(group) if group_hints.get(f.name) is bool}
    return names


def _is_value(token: str) -> bool:
    return not token.startswith("--")


def bare_flags(argv: list[str], flags: set[str] | tuple[str, ...]) -> list[str]:
    """``--overwrite`` given without a value (last, or followed by another option) means ``--overwrite true``."""
    expanded = []
    for position, token in enumerate(argv):
        expanded.append(token)
        following = argv[position + 1] if position + 1 < len(argv) else None
        if token.startswith("--") and token[2:] in flags and (following is None or not _is_value(following)):
            expanded.append("true")
    return expanded


def renamed_options(command: str, argv: list[str]) -> list[str]:
    """Replace old option names by the current ones, with a one-line note on stderr for each."""
    result = []
    for token in argv:
        name, equals, value = token[2:].partition("=")
        new = RENAMED_OPTIONS.get(name, {}).get(command) if token.startswith("--") else None
        if new:
            print(f"{PROG}: note: {command} --{name} is now --{new}; the old name goes in the next release", file=sys.stderr)
            token = f"--{new}{equals}{value}"
        result.append(token)
    return result


def _call(function: Callable, options: dict):
    """Call a command; each dataclass parameter is built from its fields (a field two groups share goes to both)."""
    groups = _groups(function)
    plain = {key: value for key, value in options.items() if key in inspect.signature(function).parameters}
    built = {name: group(**{f.name: options[f.name] for f in fields(group) if f.name in options}) for name, group in groups.items()}
    return function(**plain, **built)


def _in_chain(error: BaseException, kind: type) -> BaseException | None:
    """The exception of type ``kind`` behind ``error``, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def lightning_main(args: list[str] | None = None) -> None:
    """Run the LightningCLI (``fit``/``validate``/``test``) with our modules and callbacks."""
    from lightning_prune.callbacks.stage import PlanOnly
    from lightning_prune.lightning_cli import PruneCLI
    from lightning_prune.recipes import resolve_config_args

    # the console script passes its own argv on as args (after resolving recipe names)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        PruneCLI(args=bare_flags(resolve_config_args(sys.argv[1:] if args is None else args), RECIPE_FLAGS))
    except Exception as error:
        plan = _in_chain(error, PlanOnly)
        if plan is not None:
            print(f"dry run: plan written to {plan}; nothing was trained")
            return
        cause = _in_chain(error, InputError)
        hint = missing_extra(error)
        if cause is None and hint is None:
            raise
        _fail(str(cause) if cause is not None else hint)


def recipes_main(args: list[str]) -> None:
    """``lightning-prune recipes [list | copy NAME DEST]``: the shipped recipes (torchtune's ``tune ls`` / ``tune cp``)."""
    from lightning_prune.recipes import copy_recipe, describe

    try:
        if not args or args == ["list"]:
            print(describe())
        elif len(args) == 3 and args[0] == "copy":
            target = copy_recipe(args[1], args[2])
            print(f"copied {args[1]} to {target}; run it with: lightning-prune fit --config {target}")
        else:
            raise InputError(f"recipes takes 'list' or 'copy NAME DEST', got {' '.join(args)!r}")
    except InputError as error:
        _fail(str(error))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lightning-prune`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        lightning_main(argv)
        return
    if argv and argv[0] == "recipes":
        recipes_main(argv[1:])
        return
    from lightning_prune.commands import COMMANDS

    selected = argv[0] if argv and argv[0] in COMMANDS else ""
    if selected:
        argv = [selected, *bare_flags(renamed_options(selected, argv[1:]), _bool_options(COMMANDS[selected]) | {"json"})]
    config = build_parser(COMMANDS, selected).parse_args(argv)
    options = config[config.command].as_dict()
    as_json = options.pop("json")
    try:
        result = _call(COMMANDS[config.command], options)
    except InputError as error:
        _fail(str(error))
    except ModuleNotFoundError as error:
        hint = missing_extra(error)
        if hint is None:
            raise
        _fail(hint)
    if result is not None:  # generate and chat print their own output
        print(json.dumps(result, indent=2, default=str) if as_json else summarize(config.command, result))


if __name__ == "__main__":
    main()
