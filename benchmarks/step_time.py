"""Training-step time of MainSubsidiaryPruning's phases against plain binary training, in one run.

Two real ``lightning.Trainer`` runs of the product's :class:`~lightning_bnnprune.ImageClassifier`
on the same binarised model and the same batch, each in its own thread, take turns step by step
(a baton passed at every batch end), so every pruning step is timed right after a plain step,
under the same machine load:

- *plain*: ``Binarize`` only, the binary network trained as a user would without pruning;
- *pruning*: ``Binarize`` + ``MainSubsidiaryPruning`` on two layers, the first prunable one (the
  deepest backward in its selector) and the last one, each with a *selector* phase (gates train,
  main weights frozen, the distillation teacher's forward, the budget term) and a *retrain* phase
  (the main network trains with the gates fixed, gate masks in every forward).

The selector starts its gates at 0 (``gate_init_logit=0``), so that gates close from the first step on
and the teacher's forward runs on every timed selector step (with the default start, the first
steps of a phase skip it: the student is the teacher while every gate is open).

A step is timed from the first callback's ``on_train_batch_start`` to the last callback's
``on_train_batch_end``, as wall time and as CPU time of the thread. The first ``--warmup`` steps of
each phase are dropped. Ratio = pruning step / the plain step just before it; the table gives the
median of those ratios and of the times. Goal (issue 3): selector <= 1.4x, retrain <= 1.05x.

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
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import lightning as L
import timm
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling _report

from lightning_bnnprune import (  # noqa: E402
    Binarize, ImageClassifier, MainSubsidiaryPruning, binarize_model, find_channel_groups,
)
from lightning_bnnprune.pruning import selector as selector_module  # noqa: E402
from _report import git_commit  # noqa: E402


class Baton:
    """Turn-taking between runs: run ``i`` steps only when it holds the baton."""

    def __init__(self, runs: int) -> None:
        self.cond = threading.Condition()
        self.turn, self.runs, self.finished = 0, runs, set()

    def wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)

    def give(self, i: int) -> None:
        with self.cond:
            alive = [r for r in range(self.runs) if r not in self.finished]
            if alive:
                later = [r for r in alive if r > i]
                self.turn = later[0] if later else alive[0]
            self.cond.notify_all()

    def finish(self, i: int) -> None:
        with self.cond:
            self.finished.add(i)
        self.give(i)


class StartTimer(Callback):
    """First in the callback list: waits for the baton, starts the clock."""

    def __init__(self, baton: Baton, run: int) -> None:
        self.baton, self.run, self.started = baton, run, (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.baton.wait(self.run)
        self.started = (time.perf_counter(), time.thread_time())


class StopTimer(Callback):
    """Last in the callback list: stops the clock, labels the step, passes the baton."""

    def __init__(self, start: StartTimer, label: Callable[[], str], count: Callable[[], int] = lambda: 0) -> None:
        self.start, self.label, self.count = start, label, count
        self.steps: List[Tuple[str, float, float]] = []
        self.counts: List[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        wall, cpu = time.perf_counter() - self.start.started[0], time.thread_time() - self.start.started[1]
        self.steps.append((self.label(), wall, cpu))
        self.counts.append(self.count())
        self.start.baton.give(self.start.run)

    def on_train_end(self, trainer, pl_module):
        self.start.baton.finish(self.start.run)


def _fit(args, callbacks, steps: int, errors: List[BaseException]) -> None:
    try:
        torch.manual_seed(args.seed)
        x = torch.randn(args.batch_size, 3, args.size, args.size)
        y = torch.randint(0, 10, (args.batch_size,))
        # the same batch every step, one epoch for the whole run
        data = DataLoader(TensorDataset(x.repeat(steps, 1, 1, 1), y.repeat(steps)), batch_size=args.batch_size)
        # timm zero-inits the last norm of each residual block: no gradient would reach the gates
        # inside the blocks, as it does in the trained networks the callback is for
        model = ImageClassifier(args.model, num_classes=10, optimizer="sgd", lr=0.01, scheduler=None,
                                model_kwargs={"zero_init_last": False})
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.tmp,
            num_sanity_val_steps=0, callbacks=callbacks,
        )
        trainer.fit(model, data)
    except BaseException as err:  # noqa: BLE001  reported by the main thread
        errors.append(err)
        callbacks[0].baton.finish(callbacks[0].run)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="input height = width")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per phase")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each phase")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
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

    baton = Baton(2)
    plain_start = StartTimer(baton, 0)
    plain = StopTimer(plain_start, lambda: "plain")
    msf = MainSubsidiaryPruning(target_pfr=0.4, selector=per_phase, retrain=per_phase, layers=[first, last],
                                layers_per_stage=1, allocation="uniform", final_retrain=0,
                                gate_init_criterion=None, gate_init_logit=0.0, remove_at_end=False)
    # the selector's teacher is the network with the stage's gates open: count its forwards where
    # the selector's loss calls it (only this benchmark's msf run selects)
    teacher_calls = [0]
    teacher = selector_module.open_gates_forward

    def counted_teacher(*a, **k):
        teacher_calls[0] += 1
        return teacher(*a, **k)

    selector_module.open_gates_forward = counted_teacher
    msf_start = StartTimer(baton, 1)
    pruning = StopTimer(msf_start, lambda: f"{msf.phase.name} ({msf.phase.groups[0]})", lambda: teacher_calls[0])
    errors: List[BaseException] = []
    runs = [
        threading.Thread(target=_fit, args=(args, [plain_start, Binarize(), plain], 4 * per_phase, errors)),
        threading.Thread(target=_fit, args=(args, [msf_start, Binarize(), msf, pruning], 4 * per_phase, errors)),
    ]
    try:
        for run in runs:
            run.start()
        for run in runs:
            run.join()
    finally:
        selector_module.open_gates_forward = teacher
    if errors:
        raise errors[0]

    # pair each pruning step with the plain step timed just before it
    rows: Dict[str, List[Tuple[float, float, float, float]]] = {}
    teachers: Dict[str, int] = {}
    for index, (label, wall, cpu) in enumerate(pruning.steps):
        if index % per_phase < args.warmup:
            continue
        _, plain_wall, plain_cpu = plain.steps[index]
        rows.setdefault(label, []).append((wall, cpu, wall / plain_wall, cpu / plain_cpu))
        teachers[label] = teachers.get(label, 0) + pruning.counts[index] - (pruning.counts[index - 1] if index else 0)
    plain_rows = [s for i, s in enumerate(plain.steps) if i % per_phase >= args.warmup]
    med = statistics.median
    lines = [
        "| step | wall (ms) | CPU (ms) | wall ratio | CPU ratio | CPU ratio range | teacher forwards | goal |",
        "|---|---:|---:|---:|---:|---|---:|---|",
        f"| plain | {med(s[1] for s in plain_rows) * 1e3:.1f} | {med(s[2] for s in plain_rows) * 1e3:.1f} "
        "| 1.00x | 1.00x | | | |",
    ]
    goals = {"selector": "<= 1.40x", "retrain": "<= 1.05x"}
    for label in (f"selector ({first})", f"selector ({last})", f"retrain ({first})", f"retrain ({last})"):
        r = rows[label]
        lines.append(
            f"| {label} | {med(s[0] for s in r) * 1e3:.1f} | {med(s[1] for s in r) * 1e3:.1f} | "
            f"{med(s[2] for s in r):.2f}x | {med(s[3] for s in r):.2f}x | "
            f"{min(s[3] for s in r):.2f}-{max(s[3] for s in r):.2f} | {teachers[label]}/{len(r)} | "
            f"{goals[label.split(' ')[0]]} |"
        )
    command = "python benchmarks/step_time.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report = "\n".join([
        f"## MainSubsidiaryPruning step time: {args.model}, batch {args.batch_size} at {args.size}x{args.size} (CPU)",
        "",
        f"- command: `{command}`",
        f"- git commit: {git_commit(('lightning_bnnprune', 'benchmarks/step_time.py'))}",
        f"- machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, load average at start {load:.1f} (other processes share the machine)",
        f"- torch {torch.__version__}, lightning {L.__version__}, timm {timm.__version__}, "
        f"python {platform.python_version()}",
        "- timing: two real Trainers (ImageClassifier, SGD, the same batch every step) taking turns step by step; "
        f"{args.warmup} untimed steps per phase, then {args.steps} timed, each against the plain step just before it",
        f"- selector on the first prunable layer ({first}: backward down to the input side) and the last ({last}), "
        "gates starting at 0 so the teacher's forward runs on every timed step (checked: `teacher forwards` below)",
        f"- wall time of the benchmark: {time.perf_counter() - started:.1f} s",
        "",
        "Wall: median wall-clock time per step. CPU: median CPU time of the training thread per step.",
        "Ratios: median over steps of (pruning step / plain step timed just before it); range: min-max.",
        "",
        "\n".join(lines),
        "",
    ])
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
