"""Training-step time of MainSubsidiaryPruning's phases against plain binary training, in one run.

Three kinds of step on the same binarised model and the same batch, each in a real
``lightning.Trainer`` with the product's :class:`~lightning_bnnprune.module.ImageClassifier`:

- *plain*: ``Binarize`` only, the binary network trained as the user would without pruning;
- *selector*: ``MainSubsidiaryPruning`` in a selector phase (gates of one layer train, the main
  weights are frozen, plus the distillation teacher's forward and the budget term), timed on the
  first prunable layer (the deepest backward) and on the last one;
- *retrain*: the main network trains with the gates fixed (gate masks in every forward).

A step is timed from one ``on_train_batch_start`` to the next, so the callbacks' own hooks count.
The first ``--warmup`` steps of each phase are dropped; the table gives the median of the next
``--steps``, as wall time and as CPU time of the process (which other processes on a shared machine
do not inflate). Goal (issue 3): selector <= 1.4x and retrain <= 1.05x the plain step.

Example::

    python benchmarks/step_time.py --model resnet18_cifar --batch-size 64 --threads 1 \\
        --out benchmarks/results/step_time.md
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import lightning as L
import timm
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

import lightning_bnnprune  # noqa: F401  registers the CIFAR networks
from lightning_bnnprune import Binarize
from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.callbacks.msf import MainSubsidiaryPruning
from lightning_bnnprune.module import ImageClassifier
from lightning_bnnprune.pruning.groups import find_channel_groups


class StepTimer(Callback):
    """(label, wall s, CPU s) of every step, from one batch start to the next."""

    def __init__(self, label) -> None:
        self.label = label  # a string, or a function of the trainer
        self.steps: List[Tuple[str, float, float]] = []
        self._last: Tuple[str, float, float] = ("", 0.0, 0.0)

    def _mark(self, trainer) -> None:
        now = (time.perf_counter(), time.process_time())
        if self._last[0]:
            self.steps.append((self._last[0], now[0] - self._last[1], now[1] - self._last[2]))
        label = self.label(trainer) if callable(self.label) else self.label
        self._last = (label, *now)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mark(trainer)

    def on_train_end(self, trainer, pl_module):
        self._mark(trainer)


def _git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lightning_bnnprune", "benchmarks/step_time.py"],
            cwd=root, capture_output=True, text=True,
        ).stdout.strip()
        return out.stdout.strip() + ("+local changes" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def _fit(args, callbacks, steps: int) -> None:
    torch.manual_seed(args.seed)
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch_size,))
    # the same batch every step, one epoch for the whole run
    data = DataLoader(TensorDataset(x.repeat(steps, 1, 1, 1), y.repeat(steps)), batch_size=args.batch_size)
    model = ImageClassifier(args.model, num_classes=10, optimizer="sgd", lr=0.01, scheduler=None)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.tmp,
        num_sanity_val_steps=0, callbacks=callbacks,
    )
    trainer.fit(model, data)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="input height = width")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each phase")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating (plain, pruning) runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", default="/tmp/bnnprune_step_time")
    parser.add_argument("--out", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    per_phase = args.warmup + args.steps

    probe = timm.create_model(args.model, num_classes=10)  # group names: the first and last prunable layer
    binarize_model(probe)
    groups = find_channel_groups(probe, torch.randn(1, 3, args.size, args.size)).names
    first, last = groups[0], groups[-1]

    # Rounds of (plain run, pruning run) alternate, so that load changes on a shared machine hit
    # every kind of step alike; steps are pooled by kind over the rounds.
    pooled: Dict[str, List[Tuple[float, float]]] = {}
    per_round: Dict[str, List[float]] = {}
    for _ in range(args.rounds):
        plain = StepTimer("plain")
        _fit(args, [Binarize(), plain], per_phase)
        msf = MainSubsidiaryPruning(target_pfr=0.4, selector=per_phase, retrain=per_phase, layers=[first, last],
                                    remove_at_end=False)

        def label(trainer, msf=msf) -> str:
            phase = msf._phase
            return f"{phase.name} ({phase.groups[0]})" if phase.groups else phase.name

        timed = StepTimer(label)
        _fit(args, [Binarize(), msf, timed], 4 * per_phase)
        for timer in (plain, timed):
            for lab in dict.fromkeys(lab for lab, _, _ in timer.steps):
                steps = [s[1:] for s in timer.steps if s[0] == lab][args.warmup:]
                pooled.setdefault(lab, []).extend(steps)
                per_round.setdefault(lab, []).append(statistics.median(s[1] for s in steps))
    rows = {lab: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for lab, v in pooled.items()}
    order = ["plain", f"selector ({first})", f"selector ({last})", f"retrain ({first})", f"retrain ({last})"]
    base_wall, base_cpu = rows["plain"]
    goals = {"plain": "", "selector": "<= 1.40x", "retrain": "<= 1.05x"}
    lines = [
        "| step | wall (ms) | CPU (ms) | wall ratio | CPU ratio | CPU ratio per round | goal |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for lab in order:
        wall, cpu = rows[lab]
        rounds = ", ".join(f"{c / b:.2f}" for c, b in zip(per_round[lab], per_round["plain"]))
        lines.append(f"| {lab} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | {wall / base_wall:.2f}x | "
                     f"{cpu / base_cpu:.2f}x | {rounds} | {goals[lab.split(' ')[0]]} |")
    table = "\n".join(lines)
    command = "python benchmarks/step_time.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = "\n".join([
        f"## MainSubsidiaryPruning step time: {args.model}, batch {args.batch_size} at {args.size}x{args.size} (CPU)",
        "",
        f"- command: `{command}`",
        f"- git commit: {_git_commit()}",
        f"- machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, load average at start {load:.1f} (other processes share the machine)",
        f"- torch {torch.__version__}, lightning {L.__version__}, timm {timm.__version__}, python {platform.python_version()}",
        f"- timing: a real Trainer with ImageClassifier (SGD), the same batch every step, one batch start to the "
        f"next; {args.rounds} rounds of (plain run, pruning run), {args.warmup} untimed steps per phase and "
        f"round, median of the {args.rounds * args.steps} timed steps of each kind",
        f"- selector timed on the first prunable layer ({first}: backward down to the input side) and the last ({last})",
        f"- wall time of the benchmark: {time.perf_counter() - started:.1f} s",
        "",
        "Wall: median wall-clock time per step. CPU: median CPU time of the process per step (all its threads).",
        "Ratios are against the plain binary step.",
        "",
        table,
        "",
    ])
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
