"""Binary ResNet-20 test top-1 against the hours it cost: the kept warm start from scratch beside
the one trained from the full-precision network with it as teacher (issue 21), the teacher's own
hours counted first.

Reads the ``accuracy.csv`` files ``warm_start.py`` writes (``epoch, step, test_acc, ..., wall_s``;
``wall_s`` adds up every sitting) and the teacher's manifest (its ``wall_time_s``). Writes
``<out>/warm_start_curve.md`` (each run's accuracy at every whole hour, its last epoch and the
goal) and ``.png``. A run still under way is drawn as far as it got; rerun the script as it goes.

Example (both runs' kept curves, ``benchmarks/assets/*_accuracy.csv``; ``--run`` draws another)::

    python benchmarks/warm_start_curve.py
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import sys
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling _report
from _report import ROOT, git_commit, write_markdown  # noqa: E402

ASSETS = os.path.join(ROOT, "benchmarks", "assets")
GOAL = 0.84  # issue 21: >= 84 % test top-1 within 10 h, the teacher included
BUDGET_H = 10.0

Curve = List[Tuple[float, float, int]]  # (hours, test top-1, epoch)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scratch", default=os.path.join(ASSETS, "resnet20_cifar_binary_accuracy.csv"),
                   help="accuracy.csv of the binary run from scratch")
    p.add_argument("--teacher", default=os.path.join(ASSETS, "resnet20_cifar_fp.json"),
                   help="manifest of the full-precision teacher (its wall_time_s is added to the run's hours)")
    p.add_argument("--run", default=os.path.join(ASSETS, "resnet20_cifar_binary_fp_accuracy.csv"),
                   help="accuracy.csv of the binary run from the teacher's weights")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    for flag in ("scratch", "teacher", "run"):
        if not os.path.isfile(getattr(args, flag)):
            p.error(f"--{flag}: no file {getattr(args, flag)!r}")
    return args


def read_curve(path: str, offset_h: float = 0.0) -> Curve:
    """``(hours, test top-1, epoch)`` per epoch of a ``warm_start.py`` accuracy.csv."""
    with open(path) as f:
        return [(offset_h + float(r["wall_s"]) / 3600, float(r["test_acc"]), int(r["epoch"])) for r in csv.DictReader(f)]


def at_hours(curve: Curve, hours: float) -> Optional[float]:
    """The best test top-1 reached within ``hours`` (None before the first epoch or past the curve's end)."""
    if not curve or hours < curve[0][0] or hours > curve[-1][0] + 1e-9:
        return None
    return max(acc for h, acc, _ in curve if h <= hours)


def to_markdown(curves: Dict[str, Curve], teacher_h: float, teacher_acc: float, command: str) -> str:
    last = max(c[-1][0] for c in curves.values() if c)
    hours = list(range(1, int(math.floor(last)) + 1))
    lines = [
        "# Binary ResNet-20 on CIFAR-10: test top-1 against hours",
        "",
        f"`{command}` at commit {git_commit()}. Hours: the wall time `warm_start.py` adds up over its "
        "sittings on this 2-core machine (the runs' own epochs; sittings that shared the machine count "
        f"their slower hours). The run from the teacher starts at the teacher's {teacher_h:.2f} h "
        f"(full-precision ResNet-20, {100 * teacher_acc:.2f} % test top-1). Goal: >= {100 * GOAL:.0f} % "
        f"within {BUDGET_H:g} h, the teacher included.",
        "",
        "| hours | " + " | ".join(curves) + " |",
        "|---:|" + "---:|" * len(curves),
    ]
    for h in hours:
        cells = [at_hours(c, h) for c in curves.values()]
        lines.append(f"| {h} | " + " | ".join("-" if v is None else f"{100 * v:.2f} %" for v in cells) + " |")
    lines.append("")
    for name, c in curves.items():
        if not c:
            continue
        h, acc, epoch = c[-1]
        best = max(a for _, a, _ in c)
        reached = next((hh for hh, a, _ in c if a >= GOAL), None)
        lines.append(f"- {name}: epoch {epoch} at {h:.2f} h, test top-1 {100 * acc:.2f} % (best {100 * best:.2f} %); "
                     + (f"the goal reached at {reached:.2f} h." if reached is not None else
                        f"the goal not reached in its {h:.2f} h."))
    return "\n".join(lines) + "\n"


def plot(curves: Dict[str, Curve], teacher_h: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, c in curves.items():
        ax.plot([h for h, _, _ in c], [100 * a for _, a, _ in c], label=name)
    ax.axvline(teacher_h, color="grey", lw=0.8, ls=":", label="teacher trained")
    ax.axhline(100 * GOAL, color="k", lw=0.8, ls="--", label=f"goal {100 * GOAL:.0f} %")
    ax.axvline(BUDGET_H, color="k", lw=0.8, ls="-.", label=f"{BUDGET_H:g} h")
    ax.set_xlabel("hours of CPU (2 cores, wall)")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict[str, Curve]:
    args = parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/warm_start_curve.py " + " ".join(shlex.quote(a) for a in given)
    with open(args.teacher) as f:
        teacher = json.load(f)
    teacher_h = float(teacher["wall_time_s"]) / 3600
    curves = {"from scratch, no teacher": read_curve(args.scratch),
              "from the full-precision weights, its teacher": read_curve(args.run, teacher_h)}
    os.makedirs(args.out, exist_ok=True)
    write_markdown(to_markdown(curves, teacher_h, float(teacher["test_acc"]), command),
                   os.path.join(args.out, "warm_start_curve.md"))
    plot(curves, teacher_h, os.path.join(args.out, "warm_start_curve.png"))
    return curves


if __name__ == "__main__":
    main()
