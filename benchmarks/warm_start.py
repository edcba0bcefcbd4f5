"""Warm start for the pruning benchmarks: the CPU-budget binary ResNet-20 trained on CIFAR-10
toward >= 80 % test top-1, resumable, over as many sittings as it takes.

Run the same command again and it continues exactly where it stopped: model, optimizer, learning
rate schedule, loop counters and the data order (a :class:`~lightning_bnnprune.batches.StepSeededLoader`:
the batch and its augmentation are a function of the seed and the global step) all come from the
newest readable checkpoint under ``<out>/ckpt``. A checkpoint is written every ``--ckpt-every``
steps and at every epoch's end; after each epoch the script rewrites ``<out>/manifest.json``
(command, commit, epochs done, wall time over all sittings, test accuracy, sha256 of that epoch's
checkpoint) and ``<out>/accuracy.csv`` (test top-1 per epoch). When the last epoch is done it writes
the network's weights (a few MB) and the manifest under ``--assets`` (``benchmarks/assets``).

The variant, chosen from the literature (no time on this machine to measure alternatives; the
choices are arguments so a faster one can replace them):

* ``resnet20_cifar`` with its ResNet block structure (one shortcut per two convs), every conv
  binary (XNOR weights, sign activations with Bi-Real's ApproxSign gradient) except the first
  conv, the classifier and the two 1x1 downsample shortcuts, which stay full precision as in
  Bi-Real Net and ReActNet (they carry the whole signal at a stage change; < 1 % of the MACs).
* Adam, lr 1e-3, cosine to 0 over ``--epochs``, no weight decay (latent binary weights are
  clipped instead), label smoothing 0.1, random crop (pad 4) + horizontal flip, batch 128,
  all 50 000 training images (``val_split=0``: the test set is evaluated after every epoch and is
  never used to choose anything here).
* No distillation from a full-precision teacher in the first kept run (``resnet20_cifar_binary``):
  the teacher's own training would cost a large share of the budget, and its forward adds about a
  third to every step. Issue 21's run takes one (below).

``--full-precision`` trains the same network without ``Binarize`` (issue 21's teacher and
real-valued initialisation, as Bi-Real Net and IR-Net start from one): the usual ResNet-20
recipe, SGD with momentum 0.9, lr 0.1, weight decay 5e-4, cosine, no label
smoothing (a smoothed teacher distils worse: Mueller et al., "When does label smoothing help?",
NeurIPS 2019)::

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD nice -n 19 python benchmarks/warm_start.py \\
        --data-dir ../shared/data/cifar10 --out ../fp_teacher --full-precision --name resnet20_cifar_fp \\
        --optimizer sgd --lr 0.1 --weight-decay 5e-4 --label-smoothing 0 --epochs 60

From the full-precision weights, with it as teacher (issue 21; ReActNet's distributional loss,
optionally its two steps)::

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD nice -n 19 python benchmarks/warm_start.py \\
        --data-dir ../shared/data/cifar10 --out ../warmstart_fp --name resnet20_cifar_binary_fp \\
        --init-from benchmarks/assets/resnet20_cifar_fp.pt --teacher full_precision

Example (from the repository root; a background run on a shared machine)::

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD nice -n 19 python benchmarks/warm_start.py \\
        --data-dir ../shared/data/cifar10 --out ../warmstart
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_bnnprune import Binarize, ImageClassifier, NpzDataModule
from lightning_bnnprune.batches import StepSeededLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling _report
from _report import write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOWNSAMPLE = "*.downsample.*"  # the 1x1 stage-change shortcuts of timm's ResNet


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "cifar10"),
                   help="folder with train.npz / test.npz")
    p.add_argument("--out", required=True, help="checkpoints, manifest.json, accuracy.csv (keep it outside the repo)")
    p.add_argument("--assets", default=os.path.join(ROOT, "benchmarks", "assets"),
                   help="where the final weights and manifest go when the last epoch is done")
    p.add_argument("--name", default="resnet20_cifar_binary", help="file stem of the final weights")
    p.add_argument("--model", default="resnet20_cifar")
    p.add_argument("--epochs", type=int, default=120, help="length of the cosine schedule")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd"))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--input-quantizer", default="approx_sign", help="activation quantizer alias")
    p.add_argument("--full-precision", action="store_true",
                   help="no Binarize: the full-precision network (the teacher / real-valued start)")
    p.add_argument("--init-from", default=None,
                   help="weights (a state dict of the same network, e.g. the full-precision run's .pt) to start from")
    p.add_argument("--teacher", default=None,
                   help="Binarize's teacher: 'full_precision' (the network as it starts, e.g. --init-from's) or a "
                        "weights file; none by default")
    p.add_argument("--teacher-weight", type=float, default=1.0, help="weight of the teacher's KL term")
    p.add_argument("--teacher-temperature", type=float, default=1.0)
    p.add_argument("--binary-weights-from-epoch", type=int, default=None,
                   help="two-step binarisation: binary activations from the start, binary weights from this epoch")
    p.add_argument("--binary-downsample", action="store_true",
                   help="binarise the 1x1 downsample shortcuts too (default: full precision)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between mid-epoch checkpoints")
    p.add_argument("--subset-train", type=int, default=None, help="keep this many training images (tests)")
    p.add_argument("--subset-test", type=int, default=None, help="keep this many test images (tests)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop this sitting when the global step reaches this value, as if killed (tests)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for flag in ("epochs", "batch_size", "ckpt_every", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.full_precision and (args.teacher or args.binary_weights_from_epoch is not None):
        p.error("--teacher and --binary-weights-from-epoch are for the binary run, not with --full-precision")
    if args.init_from is not None and not os.path.isfile(args.init_from):
        p.error(f"--init-from: no file {args.init_from!r}")
    return args


class ResumableNpz(NpzDataModule):
    """``NpzDataModule`` whose training batches follow the trainer's global step (exact resume)."""

    def train_dataloader(self) -> StepSeededLoader:
        return StepSeededLoader(self.data_train, self.batch_size, self.seed, step=lambda: self.trainer.global_step)


class Interrupted(RuntimeError):
    """Raised by ``--stop-after``: the sitting ends as a kill would end it."""


class StopAfter(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise Interrupted(f"stopped at step {trainer.global_step} (--stop-after)")


class Progress(Callback):
    """One line every ``every`` steps: loss, accuracy of the batch, seconds per step."""

    def __init__(self, every: int = 50) -> None:
        self.every = every
        self.t0: Optional[float] = None
        self.s0 = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.t0 is None:
            self.t0, self.s0 = time.time(), step
        elif step % self.every == 0:
            m = trainer.callback_metrics
            rate = (time.time() - self.t0) / (step - self.s0)
            print(f"[warm_start] step {step} epoch {trainer.current_epoch} loss {float(m['train/loss']):.4f} "
                  f"acc {float(m['train/acc']):.3f} {rate:.2f} s/step", flush=True)
            self.t0, self.s0 = time.time(), step


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Manifest(Callback):
    """After every epoch's test: ``accuracy.csv`` and ``manifest.json`` in ``out``.

    Its history and the wall time of earlier sittings travel in the checkpoint (callback state),
    so both files always describe the checkpoint they name.
    """

    def __init__(self, args: argparse.Namespace, epoch_ckpt: ModelCheckpoint) -> None:
        self.args = args
        self.epoch_ckpt = epoch_ckpt
        self.history: List[Dict[str, Any]] = []
        self.wall_before = 0.0  # seconds of the sittings before this one
        self.sittings: List[Dict[str, Any]] = []
        self.start = time.time()
        self.sitting = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "command": command_line(args.argv), "commit": git_commit()}

    def wall(self) -> float:
        return self.wall_before + time.time() - self.start

    def state_dict(self) -> Dict[str, Any]:
        return {"history": self.history, "wall": self.wall(), "sittings": self.sittings + [self.sitting]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.wall_before = float(state["wall"])
        self.sittings = list(state["sittings"])
        self.start = time.time()

    def on_validation_end(self, trainer, pl_module) -> None:
        # The epoch's test (the val loop runs on the test set); ModelCheckpoint saves right after
        # this hook, so the row is inside the epoch's checkpoint.
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        epoch = trainer.current_epoch + 1
        row = {"epoch": epoch, "step": trainer.global_step,
               "test_acc": round(float(metrics["val/acc"]), 5), "test_loss": round(float(metrics["val/loss"]), 5),
               "train_loss": round(float(metrics.get("train/loss", float("nan"))), 5),
               "lr": trainer.optimizers[0].param_groups[0]["lr"], "wall_s": round(self.wall(), 1)}
        self.history = [h for h in self.history if h["epoch"] < epoch] + [row]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # After the epoch's checkpoint exists, so its sha256 goes into the manifest.
        if not self.history:
            return
        row = self.history[-1]
        with open(os.path.join(self.args.out, "accuracy.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(self.history)
        ckpt = os.path.join(self.epoch_ckpt.dirpath, f"epoch{row['epoch'] - 1:03d}.ckpt")
        write_json(os.path.join(self.args.out, "manifest.json"), self.manifest(row["epoch"], ckpt, row))

    def manifest(self, epoch: int, ckpt: str, row: Dict[str, Any]) -> Dict[str, Any]:
        return {
            "command": self.sitting["command"], "commit": self.sitting["commit"],
            "epochs_done": epoch, "epochs": self.args.epochs, "global_step": row["step"],
            "wall_time_s": row["wall_s"], "test_acc": row["test_acc"],
            "best_test_acc": max(h["test_acc"] for h in self.history),
            "checkpoint": os.path.abspath(ckpt), "checkpoint_sha256": sha256(ckpt) if os.path.isfile(ckpt) else None,
            "sittings": self.sittings + [self.sitting], "settings": settings(self.args),
            "machine": {"torch": torch.__version__, "lightning": lightning.__version__,
                        "threads": torch.get_num_threads(), "cpus": os.cpu_count()},
        }


def command_line(argv: List[str]) -> str:
    script = os.path.relpath(os.path.abspath(__file__), ROOT)
    return " ".join(shlex.quote(a) for a in ["python", script, *argv])


def settings(args: argparse.Namespace) -> Dict[str, Any]:
    keep = ("model", "epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "input_quantizer",
            "binary_downsample", "seed", "subset_train", "subset_test", "full_precision", "optimizer", "momentum",
            "teacher", "teacher_weight", "teacher_temperature", "binary_weights_from_epoch")
    found = {k: getattr(args, k) for k in keep}
    found["init_from_sha256"] = sha256(args.init_from) if args.init_from else None  # the weights, not their path
    return found


#: settings added after the first kept run, with the value that run used (absent = this value)
ADDED_SETTINGS = {"full_precision": False, "optimizer": "adam", "momentum": 0.9, "teacher": None,
                  "teacher_weight": 1.0, "teacher_temperature": 1.0, "binary_weights_from_epoch": None,
                  "init_from_sha256": None}


def binarize(args: argparse.Namespace) -> Binarize:
    two_step = {} if args.binary_weights_from_epoch is None else {
        "binary_weights_from": args.binary_weights_from_epoch, "binary_weights_unit": "epochs"}
    return Binarize(input_quantizer=args.input_quantizer, keep_fp=[] if args.binary_downsample else [DOWNSAMPLE],
                    teacher=args.teacher, teacher_weight=args.teacher_weight,
                    teacher_temperature=args.teacher_temperature, **two_step)


def newest_checkpoint(folder: str) -> Optional[str]:
    """The readable checkpoint with the highest global step (a kill can truncate the newest)."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if not name.endswith(".ckpt"):
            continue
        path = os.path.join(folder, name)
        try:
            step = torch.load(path, map_location="cpu", weights_only=False)["global_step"]
        except Exception as err:  # noqa: BLE001  a truncated file: skip it, say so
            print(f"[warm_start] skipping unreadable checkpoint {path}: {type(err).__name__}", flush=True)
            continue
        found.append((step, os.path.getmtime(path), path))
    return max(found)[2] if found else None


def check_settings(args: argparse.Namespace) -> None:
    """A rerun must use the settings of the run it continues: refuse a different one."""
    path = os.path.join(args.out, "settings.json")
    mine = settings(args)
    if os.path.isfile(path):
        with open(path) as f:
            theirs = json.load(f)
        diff = {k: (theirs.get(k, ADDED_SETTINGS.get(k)), v) for k, v in mine.items()
                if theirs.get(k, ADDED_SETTINGS.get(k)) != v}
        if diff:
            raise SystemExit(f"{args.out} holds a run with other settings (theirs, yours): {diff}; "
                             "use another --out or the same settings")
    else:
        write_json(path, mine)


def export_final(args: argparse.Namespace, module: ImageClassifier, manifest: Dict[str, Any]) -> str:
    """The network's weights (latent binary weights, BN, full-precision layers) and the manifest."""
    os.makedirs(args.assets, exist_ok=True)
    path = os.path.join(args.assets, f"{args.name}.pt")
    if os.path.exists(path):  # never overwrite a kept warm start
        path = os.path.join(args.assets, f"{args.name}-{dt.datetime.now():%Y%m%d-%H%M%S}.pt")
    state = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
    torch.save(state, path)
    binary = None if args.full_precision else {
        "input_quantizer": args.input_quantizer, "kernel_quantizer": "xnor",
        "keep_fp": [] if args.binary_downsample else [DOWNSAMPLE]}
    final = {**manifest, "weights": os.path.relpath(path, ROOT), "weights_sha256": sha256(path), "binarize": binary}
    write_json(path[: -len(".pt")] + ".json", final)
    return path


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    check_settings(args)
    lightning.seed_everything(args.seed, verbose=False)
    module = ImageClassifier(args.model, num_classes=10, optimizer=args.optimizer, lr=args.lr,
                             momentum=args.momentum, weight_decay=args.weight_decay, scheduler="cosine",
                             label_smoothing=args.label_smoothing)
    dm = ResumableNpz(data_dir=args.data_dir, batch_size=args.batch_size, val_split=0, seed=args.seed,
                      augment=True, subset_train=args.subset_train, subset_test=args.subset_test)
    ckpt_dir = os.path.join(args.out, "ckpt")
    steps = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                            every_n_train_steps=args.ckpt_every, save_top_k=1, monitor="step", mode="max")
    epochs = ModelCheckpoint(dirpath=ckpt_dir, filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                             every_n_epochs=1, save_top_k=1, monitor="step", mode="max",
                             save_on_train_epoch_end=False)  # after the test, before Manifest writes
    manifest = Manifest(args, epochs)
    callbacks: List[Callback] = [steps, epochs, manifest, Progress()]
    if not args.full_precision:
        callbacks.insert(0, binarize(args))
    if args.stop_after is not None:
        callbacks.append(StopAfter(args.stop_after))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, callbacks=callbacks,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, log_every_n_steps=50, use_distributed_sampler=False,
                         default_root_dir=args.out)
    resume = newest_checkpoint(ckpt_dir)
    if args.init_from and not resume:  # a resume takes every weight from its checkpoint
        module.net.load_state_dict(torch.load(args.init_from, map_location="cpu", weights_only=True))
    print(f"[warm_start] {'resuming from ' + resume if resume else 'starting'}"
          f"{' from ' + args.init_from if args.init_from and not resume else ''}; out={args.out}", flush=True)
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    path = os.path.join(args.out, "manifest.json")
    with open(path) as f:
        result = json.load(f)
    if result["epochs_done"] >= args.epochs:
        result["exported"] = export_final(args, module, result)
        print(f"[warm_start] done: test top-1 {result['test_acc']:.4f}, weights {result['exported']}", flush=True)
    return result


if __name__ == "__main__":
    main()
