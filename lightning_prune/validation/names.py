"""Task names are names: a path given as a task name is refused (files go through ``--task_dir``)."""

import re

from lightning_prune.errors import InputError

__all__ = ["check_task_name"]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_task_name(name: str, option: str = "--tasks") -> None:
    """Refuse a task name that is a path (``../x``, ``/abs/path``, ``a/b``) or holds characters a file name should not."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise InputError(
            f"{option} {name!r} is not a task name; give names such as arc_easy, and put your <task>.jsonl files in a --task_dir"
        )
