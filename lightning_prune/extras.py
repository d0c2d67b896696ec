"""Optional features and the extra that installs each: one line naming the install command, before any work."""

import importlib.util
import re
import sys

__all__ = ["EXTRAS", "install_hint", "require", "missing_extra", "missing_extra_in"]

# top-level module -> the lightning-prune extra that installs it
EXTRAS = {"peft": "lora", "bitsandbytes": "lora", "lm_eval": "eval", "compressed_tensors": "compressed", "tensorboard": "tensorboard"}


def install_hint(module: str, feature: str) -> str:
    """``<feature> needs <module> (optional); install it with: pip install 'lightning-prune[<extra>]'``."""
    extra = EXTRAS[module]
    return f"{feature} needs the optional package {module}; install it with: pip install 'lightning-prune[{extra}]'"


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, feature: str) -> None:
    """Raise a one-line :class:`InputError` naming the extra to install when ``module`` is not importable."""
    from lightning_prune.errors import InputError

    if not _installed(module):
        raise InputError(install_hint(module, feature))


def missing_extra(error: BaseException | None) -> str | None:
    """The install hint for a ``ModuleNotFoundError`` of an optional package anywhere in ``error``'s chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in EXTRAS:
            module = error.name.split(".")[0]
            return install_hint(module, "this run")
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def missing_extra_in(message: str) -> str | None:
    """The install hint for a message that reports ``No module named '<optional package>'`` (jsonargparse keeps only text)."""
    for name in re.findall(r"No module named '([\w.]+)'", message):
        if name.split(".")[0] in EXTRAS:
            return install_hint(name.split(".")[0], "this run")
    return None
