"""A file cut short told apart from one ``torch.load`` can read, before torch reads it.

``torch.save`` writes a zip archive whose index (the zip "central directory") is its last bytes:
a copy cut short (a full disk, an interrupted transfer or copy) has lost it, and ``torch.load``
ends in a long C++ traceback ("PytorchStreamReader failed reading zip archive"). The check reads
only the file's first bytes and its zip index, with the standard library: the app answers in one
line before it loads torch.
"""
from __future__ import annotations

import os
import zipfile
from typing import Union

__all__ = ["UnreadableFileError", "check_torch_file"]

_ZIP_MAGIC = b"PK\x03\x04"  # a zip archive's first local header: torch.save's format since 1.6
_PICKLE_MAGIC = b"\x80"  # a pickle protocol >= 2 opcode: torch.save's legacy format (left to torch)


class UnreadableFileError(ValueError):
    """A file is truncated or not what ``torch.save`` writes; the message names it."""


def check_torch_file(path: Union[str, "os.PathLike[str]"], what: str = "checkpoint") -> None:
    """Raise a one-line :class:`UnreadableFileError` if ``path`` cannot be a ``torch.save`` file.

    Args:
        path: an existing file.
        what: what the file should be, for the message (``"checkpoint"``).

    Raises:
        UnreadableFileError: if the file is empty, cut short (a zip archive without its index)
            or neither a zip archive holding a pickled object nor a legacy ``torch.save`` file.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if head.startswith(_PICKLE_MAGIC):
        return
    why = None
    if head != _ZIP_MAGIC:
        why = "empty" if size == 0 else "not a zip archive as torch.save writes"
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                if not any(name.endswith("data.pkl") for name in archive.namelist()):
                    why = "a zip archive without torch.save's data.pkl"
        except (zipfile.BadZipFile, OSError):
            why = "its zip index is missing: the file ends early"
    if why is not None:
        raise UnreadableFileError(f"{path} is truncated or not a {what} ({why}; {size} bytes)")
