"""File names that never overwrite what a user had: the versioned stems of a run's outputs.

No torch import: the app's entry point uses it as much as the pruning callbacks do.
"""
from __future__ import annotations

import os
from typing import Dict, Sequence, Union

__all__ = ["PathLike", "free_stems"]

#: A file or folder argument: a string or an ``os.PathLike`` (``pathlib.Path``), as ``open`` takes.
PathLike = Union[str, "os.PathLike[str]"]


def free_stems(directory: str, stems: Dict[str, Sequence[str]]) -> Dict[str, str]:
    """``{stem: directory/stem[-vN]}`` with one ``N`` for all, so that no file ``stem[-vN] + suffix``
    exists yet for any of the stems' suffixes (Lightning's ``ModelCheckpoint`` versions its files
    the same way).

    Example: ``free_stems("ckpts", {"pruned": [".pt"], "pruning_report": [".csv", ".md"]})`` gives
    ``{"pruned": "ckpts/pruned-v1", ...}`` when ``ckpts/pruned.pt`` exists.
    """
    version = 0
    while True:
        tag = f"-v{version}" if version else ""
        paths = {stem: os.path.join(directory, stem + tag) for stem in stems}
        if not any(os.path.exists(paths[stem] + ext) for stem, exts in stems.items() for ext in exts):
            return paths
        version += 1
