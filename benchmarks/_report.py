"""What the benchmark scripts share: the commit they ran on, how they write their markdown and
their result files, and how they read a ``--round-to`` value.

A sibling module, not part of the package: the scripts put ``benchmarks/`` on ``sys.path`` (a
script's own folder is there when it runs as ``python benchmarks/<name>.py``) and import it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
from typing import Any, Callable, Sequence, Union

__all__ = ["git_commit", "replace_atomically", "round_to_arg", "write_json", "write_markdown", "write_png",
           "write_text"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(paths: Sequence[str] = ("lightning_bnnprune", "benchmarks"), root: str = ROOT) -> str:
    """The short commit of the checkout, ``+local changes`` when tracked code under ``paths``
    differs from it, ``unknown`` outside a git checkout. ``benchmarks/results`` is not code: a grid
    rewrites its tables there after every cell, and that must not mark the next cell's code dirty."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths,
                                ":(exclude)benchmarks/results"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+local changes" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def write_markdown(text: str, out: str | None, append: bool = False) -> None:
    """Print ``text``; also write it to ``out`` (its folder made), or append it after a blank line."""
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "a" if append else "w") as f:
            if append and f.tell():
                f.write("\n")
            f.write(text)


def replace_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)``, then rename ``tmp`` to ``path``: a reader sees the old file or the new one,
    never half of one. The temporary name is the process's own, because two processes may write
    one file at once (two grid processes summarising); a shared name let one replace the file
    while the other was still writing into it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    write(tmp)
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    replace_atomically(path, write)


def write_json(path: str, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


def write_png(path: str, fig: Any) -> None:
    """A matplotlib figure, replaced atomically as the grids' other result files are."""
    replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def round_to_arg(text: str) -> Union[int, str]:
    """``--round-to``'s values (an argparse ``type``): an int, or an engine's name."""
    from lightning_bnnprune.pruning.allocation import ENGINES

    if text in ENGINES:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an int nor one of {', '.join(ENGINES)}") from None
