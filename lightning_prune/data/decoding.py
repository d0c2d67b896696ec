"""UTF-8 text files: a cheap check of the first bytes before any work, and a full decode that names the byte offset."""

from pathlib import Path

from lightning_prune.errors import InputError

__all__ = ["PREFIX_BYTES", "check_utf8_prefix", "read_utf8"]

PREFIX_BYTES = 64 * 1024


def _error(label: str, error: UnicodeDecodeError, offset: int = 0) -> InputError:
    where = offset + error.start
    return InputError(
        f"{label} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {where}); pass a UTF-8 text or jsonl file"
    )


def check_utf8_prefix(path: Path, label: str) -> None:
    """Refuse a file whose first :data:`PREFIX_BYTES` bytes are not UTF-8 (a character cut at the end is allowed)."""
    with Path(path).open("rb") as handle:
        head = handle.read(PREFIX_BYTES)
    nul = head.find(b"\0")
    if nul >= 0:
        raise InputError(f"{label} is binary (a NUL byte at offset {nul}); pass a UTF-8 text or jsonl file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.reason != "unexpected end of data" or len(head) < PREFIX_BYTES:
            raise _error(label, error) from error


def read_utf8(path: Path, label: str) -> str:
    """The whole file as text; a decoding error names the byte offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _error(label, error) from error
