"""What the benchmark scripts share: the commit they ran on, how they write their markdown, and
how they read a ``--round-to`` value.

A sibling module, not part of the package: the scripts put ``benchmarks/`` on ``sys.path`` (a
script's own folder is there when it runs as ``python benchmarks/<name>.py``) and import it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
from typing import Sequence, Union

__all__ = ["git_commit", "round_to_arg", "write_markdown"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(paths: Sequence[str] = ("lightning_bnnprune", "benchmarks")) -> str:
    """The short commit of the checkout, ``+local changes`` when tracked files under ``paths``
    differ from it, ``unknown`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
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


def round_to_arg(text: str) -> Union[int, str]:
    """``--round-to``'s values (an argparse ``type``): an int, or an engine's name."""
    from lightning_bnnprune.pruning.allocation import ENGINES

    if text in ENGINES:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an int nor one of {', '.join(ENGINES)}") from None
