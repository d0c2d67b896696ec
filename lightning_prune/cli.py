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

__all__ = ["main", "lightning_main", "build_parser"]

PROG = "lightning-prune"
# bitsandbytes announces on import that an optional CPU kernel package is absent; its
# fallback kernels are used and the notice is not an error of the user's run.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


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


def build_parser(commands: dict[str, Callable]) -> ArgumentParser:
    """Parser with one subcommand per function; options come from each signature (dataclass parameters flattened)."""
    parser = _OneLineParser(
        prog=PROG,
        description="One-shot commands below. Recipes (stages + training in one Lightning fit): "
        "lightning-prune fit|validate|test --config NAME_OR_YAML [--section.option value ...]; "
        "lightning-prune recipes [list | copy NAME DEST].",
    )
    subcommands = parser.add_subcommands(dest="command")
    for name, function in commands.items():
        sub = _OneLineParser(prog=f"{PROG} {name}", description=_summary(function))
        groups = _groups(function)
        sub.add_function_arguments(function, as_group=False, skip=set(groups))
        added = set(inspect.signature(function).parameters) - set(groups)
        for group in groups.values():
            own = {f.name for f in fields(group)}
            sub.add_class_arguments(group, None, as_group=False, skip=own & added, instantiate=False)
            added |= own
        subcommands.add_subcommand(name, sub, help=_summary(function))
    return parser


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
        PruneCLI(args=resolve_config_args(sys.argv[1:] if args is None else args))
    except Exception as error:
        plan = _in_chain(error, PlanOnly)
        if plan is not None:
            print(f"dry run: plan written to {plan}; nothing was trained")
            return
        cause = _in_chain(error, InputError)
        if cause is None:
            raise
        _fail(str(cause))


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

    config = build_parser(COMMANDS).parse_args(argv)
    options = config[config.command].as_dict()
    try:
        result = _call(COMMANDS[config.command], options)
    except InputError as error:
        _fail(str(error))
    if result is not None:  # generate and chat print their own output
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
