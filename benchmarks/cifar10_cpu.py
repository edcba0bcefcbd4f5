"""CIFAR-10 reproduction benchmark: every filter-pruning strategy from one trained binary network.

Protocol (the same for every strategy, stated again in the output):

1. *Warm start*: the unpruned binary network (``Binarize()``: ``ste_sign`` activations, XNOR
   weights; first conv and classifier full precision) trains from scratch for ``W`` steps. Its
   weights are the shared starting point (Main/Subsidiary also starts from a trained binary net).
2. *Strategies*: from that checkpoint, each of ``msf`` (Xu et al.'s learned selector),
   ``greedy_l1`` (latent-weight L1), ``stq`` (STQ-Nets' binarisation error) and ``random`` trains
   exactly ``R`` more steps at each target PFR, its pruning schedule inside those ``R`` steps:
   ``msf`` splits ``R`` over the prunable channel groups (one selector + one retrain phase per
   group, bottom-up, as in the paper); the greedy rules prune one-shot at step 0 and retrain for
   the ``R`` steps (the papers' greedy baseline: rank once, cut, fine-tune). At fit end the closed
   filters are removed physically and the *pruned* model is tested on the whole test set.
3. *Baseline*: the unpruned binary network also trains the same ``R`` more steps (equal budget);
   accuracy drops are measured against it.
4. *BDG*: from the same start, ``Binarize(kernel_quantizer="bdg", zero_lower=True, sparsity=EC)``
   trains ``R`` steps in the sparse ``{0, 2 tau}`` domain; ``ZeroFilterPruning`` removes the
   filters that ended all-zero. Its PFR is whatever that freed, not a target.

Every run: the same seed, the same data order and augmentation (re-seeded when training starts),
Adam at ``--lr`` with a cosine decay to 0 over the run's own length (``ImageClassifier``'s
defaults), batch 128, ``NpzDataModule`` with 10% of the training images held out (never used for
tuning here) and the full test set. Main/Subsidiary's retrain phases use that same learning
rate (``retrain_lr_factor=1``) so every strategy's main network trains at the same rate; its
selector phases train the gates with Adam at ``gate_lr=1e-3`` (the callback's default).

A crash in one run is recorded as a failure in the table and the others go on.

Example (CPU budget, ~70 min on 2 cores; ``--calibrate`` only measures the step time)::

    python benchmarks/cifar10_cpu.py --data-dir ../shared/data/cifar10 --out benchmarks/results

``--full`` runs the papers' budget on a GPU instead (ResNet-18, epochs).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_bnnprune import (
    Binarize, GreedyFilterPruning, ImageClassifier, MainSubsidiaryPruning, NpzDataModule,
    ZeroFilterPruning, binarize_model, compression_report, find_channel_groups, remove_filters,
)
from lightning_bnnprune.introspect import example_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRUNING = ("msf", "greedy_l1", "stq", "random")  # strategies run at each target PFR
STRATEGIES = ("baseline",) + PRUNING + ("bdg",)
CRITERIA = {"greedy_l1": "l1", "stq": "binarization_error", "random": "random"}
LABELS = {
    "baseline": "unpruned binary (same budget)",
    "msf": "Main/Subsidiary (learned selector)",
    "greedy_l1": "greedy L1",
    "stq": "STQ binarisation error",
    "random": "random (seeded)",
    "bdg": "BDG {0, 2tau} + zero-filter removal",
}


def label(args: argparse.Namespace, strategy: str) -> str:
    """The table / legend name of a strategy; the greedy rules say how they were scheduled."""
    mode = {"oneshot": "one-shot", "layerwise": "layer-wise"}[args.greedy_mode]
    return f"{LABELS[strategy]}, {mode}" if strategy in CRITERIA else LABELS[strategy]


MARKERS = {"msf": "o", "greedy_l1": "s", "stq": "^", "random": "x", "bdg": "D"}
# Relative cost of one step against a plain training step, for the estimate only: a selector
# step adds the teacher's forward (~1/3 of a step) and selector phases are ~1/3 of MSF's steps.
STEP_COST = {"msf": 1.1, "bdg": 1.05}


# ---------------------------------------------------------------------------- settings
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "cifar10"),
                   help="folder with train.npz / test.npz (never downloaded)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"),
                   help="where <name>.md / .png / .json are written")
    p.add_argument("--work-dir", default=None,
                   help="checkpoints, CSV logs, pruned models (default: lightning_logs/<name> in the repo)")
    p.add_argument("--name", default=None, help="output file stem (default cifar10_cpu, or cifar10_full)")
    p.add_argument("--model", default=None, help="timm name (default resnet20_cifar; --full: resnet18_cifar)")
    p.add_argument("--steps-warmup", type=int, default=1500, help="W: steps of the shared warm start")
    p.add_argument("--steps", type=int, default=300, help="R: steps every run trains from the warm start")
    p.add_argument("--pfrs", type=float, nargs="+", default=[0.4, 0.25], help="target PFRs")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine to 0 in every run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-split", type=float, default=0.1, help="share of train.npz held out")
    p.add_argument("--subset-train", type=int, default=None, help="keep this many training images (tests)")
    p.add_argument("--subset-test", type=int, default=None, help="keep this many test images (tests)")
    p.add_argument("--msf-selector-share", type=float, default=1 / 3,
                   help="share of each group's slot of R spent in its selector phase (code default 200:400)")
    p.add_argument("--msf-layers-per-stage", type=int, default=1, help="groups per selector stage (paper: 1)")
    p.add_argument("--greedy-mode", default="oneshot", choices=("oneshot", "layerwise"),
                   help="greedy rules: cut every group at step 0 and retrain for all of R (oneshot), or cut "
                        "group i when msf fixes its gates, at selector + i x (selector + retrain) (layerwise)")
    p.add_argument("--bdg-ec", type=float, default=0.3, help="BDG's target share EC of upper-value weights")
    p.add_argument("--bdg-gamma", type=float, default=0.5, help="BDG's sparsity_gamma")
    p.add_argument("--warm-start", default=None, help="reuse this warm-start checkpoint instead of training one")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (ignored with --full)")
    p.add_argument("--budget-minutes", type=float, default=70.0, help="what --calibrate fits W and R into")
    p.add_argument("--fit-budget", action="store_true",
                   help="scale W and R down (same ratio) when the measured step time would overrun --budget-minutes")
    p.add_argument("--calibrate", action="store_true", help="measure step and test time, print the estimate, exit")
    p.add_argument("--full", action="store_true",
                   help="the papers' budget on a GPU: resnet18_cifar, unit epochs, --epochs-warmup, "
                        "--msf-phase-epochs per group (R = groups x their sum), accelerator auto")
    p.add_argument("--epochs-warmup", type=int, default=200, help="--full: warm-start epochs")
    p.add_argument("--msf-phase-epochs", type=int, nargs=2, default=[5, 5], metavar=("SELECTOR", "RETRAIN"),
                   help="--full: epochs of each group's selector and retrain phase (official code: 5 and 5)")
    p.add_argument("--epochs", type=int, default=None, help="--full: R in epochs (default groups x phase epochs)")
    p.add_argument("--accelerator", default=None, help="Lightning accelerator (default cpu; --full: auto)")
    args = p.parse_args(argv)
    args.unit = "epochs" if args.full else "steps"
    args.model = args.model or ("resnet18_cifar" if args.full else "resnet20_cifar")
    args.name = args.name or ("cifar10_full" if args.full else "cifar10_cpu")
    args.accelerator = args.accelerator or ("auto" if args.full else "cpu")
    args.work_dir = args.work_dir or os.path.join(ROOT, "lightning_logs", args.name)
    for label, value in (("--steps-warmup", args.steps_warmup), ("--steps", args.steps)):
        if value < 1:
            p.error(f"{label} must be >= 1, got {value}")
    if any(not 0.0 < x < 1.0 for x in args.pfrs):
        p.error(f"--pfrs must lie in (0, 1), got {args.pfrs}")
    if args.greedy_mode == "layerwise" and args.msf_layers_per_stage != 1:
        p.error("--greedy-mode layerwise follows msf one group at a time: it needs --msf-layers-per-stage 1")
    if not 0.0 < args.msf_selector_share < 1.0:
        p.error(f"--msf-selector-share must lie in (0, 1), got {args.msf_selector_share}")
    return args


@dataclass
class Plan:
    """What runs, how long: ``warmup`` and ``length`` in ``unit``, MSF's phases per group."""

    unit: str
    warmup: int
    length: int
    groups: List[str]
    msf_selector: int
    msf_retrain: int
    runs: List[Dict[str, Any]] = field(default_factory=list)


def make_plan(args: argparse.Namespace) -> Plan:
    net = ImageClassifier(args.model, num_classes=10).net
    binarize_model(net)
    groups = [g.name for g in find_channel_groups(net, example_batch(net)).groups]
    stages = math.ceil(len(groups) / args.msf_layers_per_stage)
    if args.full:
        selector, retrain = args.msf_phase_epochs
        length = args.epochs or stages * (selector + retrain)
        warmup = args.epochs_warmup
    else:
        length, warmup = args.steps, args.steps_warmup
        slot = length // stages
        selector = max(1, round(slot * args.msf_selector_share))
        retrain = max(1, slot - selector)
    runs = []
    for strategy in args.strategies:
        for pfr in (args.pfrs if strategy in PRUNING else [None]):
            runs.append({"strategy": strategy, "target_pfr": pfr})
    return Plan(args.unit, warmup, length, groups, selector, retrain, runs)


# ---------------------------------------------------------------------------- building blocks
class ReseedAtTrainStart(Callback):
    """Seed the global RNG when training starts, after every callback's ``setup`` (tracing,
    gates) has run: the data order and the augmentation then match across runs exactly."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_start(self, trainer, pl_module) -> None:
        lightning.seed_everything(self.seed, verbose=False)


def make_datamodule(args: argparse.Namespace) -> NpzDataModule:
    return NpzDataModule(data_dir=args.data_dir, batch_size=args.batch_size, val_split=args.val_split,
                         seed=args.seed, augment=True, subset_train=args.subset_train,
                         subset_test=args.subset_test)


def make_module(args: argparse.Namespace, warm_state: Optional[Dict[str, torch.Tensor]]) -> ImageClassifier:
    lightning.seed_everything(args.seed, verbose=False)
    module = ImageClassifier(args.model, num_classes=10, optimizer="adam", lr=args.lr, scheduler="cosine")
    if warm_state is not None:
        # Latent weights of the binary warm start into the full-precision tree: the Binarize
        # callback of the run turns them into binary layers in its setup (with its own quantizer).
        module.net.load_state_dict(warm_state, strict=True)
    return module


def make_trainer(args: argparse.Namespace, run_dir: str, length: int, callbacks: List[Callback]) -> pl.Trainer:
    duration = {"max_epochs": length} if args.unit == "epochs" else {"max_steps": length, "max_epochs": -1}
    return pl.Trainer(
        accelerator=args.accelerator, devices=1, callbacks=[*callbacks, ReseedAtTrainStart(args.seed)],
        logger=CSVLogger(run_dir, name="", version=""), log_every_n_steps=10, default_root_dir=run_dir,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, **duration,
    )


def pruning_callbacks(args: argparse.Namespace, plan: Plan, strategy: str, pfr: Optional[float]) -> List[Callback]:
    if strategy == "baseline":
        return [Binarize()]
    if strategy == "bdg":
        return [Binarize(kernel_quantizer="bdg", kernel_quantizer_kwargs={"zero_lower": True},
                         sparsity=args.bdg_ec, sparsity_gamma=args.bdg_gamma), ZeroFilterPruning()]
    if strategy == "msf":
        return [Binarize(), MainSubsidiaryPruning(
            target_pfr=pfr, selector=plan.msf_selector, retrain=plan.msf_retrain, warmup=0, unit=plan.unit,
            layers_per_stage=args.msf_layers_per_stage, retrain_lr_factor=1.0)]
    if args.greedy_mode == "layerwise":  # msf's schedule: group i is cut when msf would fix its gates
        stage = plan.msf_selector + plan.msf_retrain
        schedule = dict(mode="layerwise", warmup=plan.msf_selector, retrain=stage)
    else:
        schedule = dict(mode="oneshot", warmup=0)
    return [Binarize(), GreedyFilterPruning(criterion=CRITERIA[strategy], target_pfr=pfr, unit=plan.unit,
                                            seed=args.seed, **schedule)]


def evaluate(args: argparse.Namespace, module: pl.LightningModule, dm: NpzDataModule) -> Dict[str, float]:
    """Top-1 / top-5 on the test split, with a bare trainer (no pruning callback left to run)."""
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    out = trainer.test(module, datamodule=dm, verbose=False)[0]
    return {"test_acc": 100.0 * float(out["test/acc"]), "test_acc_top5": 100.0 * float(out["test/acc_top5"]),
            "test_loss": float(out["test/loss"])}


def unpruned_summary(module: ImageClassifier) -> Dict[str, Any]:
    """The compression report of the unpruned binary network (the same report, nothing cut)."""
    net = copy.deepcopy(module.net).cpu()
    analysis = find_channel_groups(net, example_batch(net))
    record = remove_filters(net, analysis, masks={g.name: torch.ones(g.size, dtype=torch.bool)
                                                  for g in analysis.groups})
    return dict(compression_report(net, record).summary)


# ---------------------------------------------------------------------------- runs
def train_warm_start(args: argparse.Namespace, plan: Plan, dm: NpzDataModule) -> Dict[str, Any]:
    path = os.path.join(args.work_dir, "warm_start.ckpt")
    start = time.perf_counter()
    if args.warm_start:
        state = torch.load(args.warm_start, map_location="cpu", weights_only=True)
        module = make_module(args, state)
        binarize_model(module.net)  # for the test below: the binary network the weights belong to
        path = args.warm_start
    else:
        module = make_module(args, None)
        trainer = make_trainer(args, os.path.join(args.work_dir, "warm_start"), plan.warmup, [Binarize()])
        trainer.fit(module, datamodule=dm)
        os.makedirs(args.work_dir, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in module.net.state_dict().items()}, path)
    fit_s = time.perf_counter() - start
    metrics = evaluate(args, module, dm)
    result = {"strategy": "warm_start", "target_pfr": None, "status": "ok", "checkpoint": path,
              "fit_s": fit_s, "wall_s": time.perf_counter() - start, **metrics}
    print(f"[bench] warm start: {plan.warmup} {plan.unit}, test top-1 {metrics['test_acc']:.2f}% "
          f"({result['wall_s']:.0f} s)", flush=True)
    return result


def run_strategy(args: argparse.Namespace, plan: Plan, dm: NpzDataModule, warm_state: Dict[str, torch.Tensor],
                 strategy: str, pfr: Optional[float]) -> Dict[str, Any]:
    tag = strategy if pfr is None else f"{strategy}_pfr{round(100 * pfr):02d}"
    run_dir = os.path.join(args.work_dir, tag)
    result: Dict[str, Any] = {"strategy": strategy, "target_pfr": pfr, "run_dir": run_dir}
    start = time.perf_counter()
    try:
        module = make_module(args, warm_state)
        callbacks = pruning_callbacks(args, plan, strategy, pfr)
        trainer = make_trainer(args, run_dir, plan.length, callbacks)
        trainer.fit(module, datamodule=dm)
        result["fit_s"] = time.perf_counter() - start
        result["global_step"] = int(trainer.global_step)
        result.update(evaluate(args, module, dm))
        pruner = next((cb for cb in callbacks if hasattr(cb, "summary")), None)
        summary = dict(pruner.summary) if pruner is not None else unpruned_summary(module)
        if pruner is not None:
            result["kept_filters"] = pruner.kept_filters()
        result.update({k: summary.get(k) for k in ("pfr", "mac_ratio", "compression", "inner_compression",
                                                   "params_after", "macs_after", "empty_filter_share")})
        result["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - one failed strategy must not stop the others
        result.update(status="failed", error=f"{type(err).__name__}: {err}".splitlines()[0][:300])
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "error.txt"), "w") as f:
            f.write(traceback.format_exc())
        traceback.print_exc()
    result["wall_s"] = time.perf_counter() - start
    if result["status"] == "ok":
        print(f"[bench] {tag}: test top-1 {result['test_acc']:.2f}%, PFR {_fmt(result['pfr'], '.3f')}, "
              f"MAC ratio {_fmt(result['mac_ratio'], '.2f')}x, compression {_fmt(result['compression'], '.1f')}x "
              f"({result['wall_s']:.0f} s)", flush=True)
    else:
        print(f"[bench] {tag}: FAILED {result['error']} ({result['wall_s']:.0f} s)", flush=True)
    return result


# ---------------------------------------------------------------------------- estimate
def calibrate(args: argparse.Namespace, dm: NpzDataModule, steps: int = 6) -> Dict[str, float]:
    """Seconds per training step (binary net, Adam, real batches) and per test batch."""
    dm.setup("fit")
    module = make_module(args, None)
    binarize_model(module.net)
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
                          else "cpu")
    net = module.net.to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    loader = dm.train_dataloader()
    batches = [batch for _, batch in zip(range(steps + 2), loader)]
    times, cpu_times = [], []
    for i in range(steps + 2):
        x, y = (t.to(device) for t in batches[i % len(batches)])
        t0, c0 = time.perf_counter(), time.process_time()
        loss = torch.nn.functional.cross_entropy(module(x), y)  # the module's forward: its memory format
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first steps pay for allocation and kernel selection
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    net.eval()
    eval_times = []
    with torch.no_grad():
        for i, (x, _) in enumerate(dm.test_dataloader()):
            t0 = time.perf_counter()
            module(x.to(device))
            eval_times.append(time.perf_counter() - t0)
            if i == 3:
                break
    return {"step_s": statistics.median(times), "step_cpu_s": statistics.median(cpu_times),
            "test_batch_s": statistics.median(eval_times)}


def estimate(args: argparse.Namespace, plan: Plan, dm: NpzDataModule, timing: Dict[str, float]) -> Dict[str, float]:
    per_epoch = math.ceil(len(dm.data_train) / args.batch_size)
    test_batches = math.ceil(len(dm.data_test) / args.batch_size)
    to_steps = per_epoch if plan.unit == "epochs" else 1
    train_s = 0.0 if args.warm_start else plan.warmup * to_steps * timing["step_s"]
    for run in plan.runs:
        train_s += plan.length * to_steps * timing["step_s"] * STEP_COST.get(run["strategy"], 1.0)
    n_eval = len(plan.runs) + 1
    test_s = n_eval * test_batches * timing["test_batch_s"]
    overhead_s = 8.0 * n_eval  # trainer start, tracing, removal check, reports (measured: a few s)
    return {"train_s": train_s, "test_s": test_s, "overhead_s": overhead_s,
            "total_s": train_s + test_s + overhead_s}


# ---------------------------------------------------------------------------- outputs
def git_state() -> Dict[str, Any]:
    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.rstrip() if out.returncode == 0 else ""

    modified = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    untracked = [line[3:] for line in git("status", "--porcelain", "--", "lightning_bnnprune", "benchmarks")
                 .splitlines() if line.startswith("??")]
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(modified or untracked),
            "modified": modified, "untracked_code": untracked}


def machine() -> Dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "lightning": lightning.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def _fmt(value: Any, spec: str, none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def _ok(results: List[Dict[str, Any]], strategy: str, pfr: Optional[float] = None) -> Optional[Dict[str, Any]]:
    for r in results:
        if r["strategy"] == strategy and r["target_pfr"] == pfr and r.get("status") == "ok":
            return r
    return None


def verdict(results: List[Dict[str, Any]], pfrs: List[float], n_test: int) -> List[str]:
    """Whether the learned selector beat the greedy rules, read off the numbers."""
    lines, wins, compared = [], 0, 0
    for pfr in pfrs:
        msf = _ok(results, "msf", pfr)
        rules = [r for r in (_ok(results, s, pfr) for s in ("greedy_l1", "stq")) if r is not None]
        if msf is None or not rules:
            lines.append(f"- PFR {pfr:.0%}: no comparison (a run failed or was not part of this benchmark).")
            continue
        best = max(rules, key=lambda r: r["test_acc"])
        gap = msf["test_acc"] - best["test_acc"]
        rnd = _ok(results, "random", pfr)
        se = 100.0 * math.sqrt(max(msf["test_acc"], 1e-9) / 100 * (1 - msf["test_acc"] / 100) / max(n_test, 1))
        compared += 1
        wins += gap > 0
        against_random = ""
        if rnd is not None:
            against_random = (f"; random selection reached {rnd['test_acc']:.2f}%, "
                              f"{'below' if rnd['test_acc'] < msf['test_acc'] else 'not below'} the learned selector")
        lines.append(
            f"- PFR {pfr:.0%}: the learned selector reached {msf['test_acc']:.2f}%, the best greedy rule "
            f"({best['strategy']}) {best['test_acc']:.2f}%: the learned selector is "
            f"{'ahead' if gap > 0 else 'behind' if gap < 0 else 'level'} by {abs(gap):.2f} pt "
            f"(test-set standard error of one accuracy: {se:.2f} pt){against_random}."
        )
    if compared:
        summary = ("the learned selector beat the best greedy rule at every PFR" if wins == compared
                   else "the learned selector did not beat the best greedy rule at any PFR" if wins == 0
                   else f"the learned selector beat the best greedy rule at {wins} of {compared} PFRs")
        lines.insert(0, f"**At this budget {summary}.** One seed per cell: differences within about two "
                        "standard errors are not a ranking, and seed-to-seed variation was not measured.")
    return lines


def write_markdown(path: str, args: argparse.Namespace, plan: Plan, meta: Dict[str, Any],
                   results: List[Dict[str, Any]]) -> None:
    unit = plan.unit
    warm = next((r for r in results if r["strategy"] == "warm_start"), None)
    base = _ok(results, "baseline")
    n_test = meta.get("n_test", 10000)
    lines = [
        f"# CIFAR-10 filter pruning of a binary {args.model}: every strategy on one budget",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"- git commit: `{meta['git']['commit']}`"
        + (f" (tree dirty: {len(meta['git']['modified'])} modified tracked file(s) "
           f"{', '.join(meta['git']['modified'][:8])}; untracked code "
           f"{', '.join(meta['git']['untracked_code'][:8]) or 'none'})" if meta["git"]["dirty"] else " (clean tree)"),
        f"- machine: {meta['machine']['platform']}, {meta['machine']['processor']}, "
        f"{meta['machine']['cpu_count']} CPUs, torch {meta['machine']['torch']} "
        f"({meta['machine']['torch_threads']} thread(s)), lightning {meta['machine']['lightning']}"
        + (f", {meta['machine']['cuda_device']}" if "cuda_device" in meta["machine"] else "")
        + (f"; load average at start {meta['machine'].get('load_average_at_start')}"
           if meta["machine"].get("load_average_at_start") else ""),
        f"- date: {meta['started']}; total wall time: {meta.get('wall_min', float('nan')):.1f} min"
        f" (estimated before the start: {meta['estimate']['total_s'] / 60:.1f} min, "
        f"{meta['timing']['step_s']:.3f} s per training step"
        + (f"; W and R scaled by {meta['fit_budget_factor']:.2f} by --fit-budget"
           if meta.get("fit_budget_factor") else "")
        + ")",
        f"- data: `{args.data_dir}` (CIFAR-10 as npz, decoded from a JPEG copy: not bit-identical to the "
        f"official pickles), {meta.get('n_train', '?')} training images ({args.val_split:.0%} of train.npz held "
        f"out, unused), {n_test} test images; random crop (pad 4) + flip",
        "",
        "## Protocol",
        "",
        f"1. Warm start: binary `{args.model}` (`Binarize()`: ste_sign activations, XNOR weights with a "
        f"per-filter scale, first conv and classifier full precision) trained from scratch for "
        f"**W = {plan.warmup} {unit}**"
        + (f" (test top-1 {warm['test_acc']:.2f}%)" if warm and warm.get("status") == "ok" else "") + ".",
        f"2. Each strategy x target PFR starts from that checkpoint and trains exactly **R = {plan.length} {unit}**, "
        f"its schedule inside them: `msf` splits R over the {len(plan.groups)} prunable channel groups, bottom-up, "
        f"{plan.msf_selector} {unit} of selector (gates only, Adam lr 1e-3, distillation from the open network, "
        f"budget term) then {plan.msf_retrain} {unit} of retraining per group"
        + (f" ({args.msf_layers_per_stage} groups per stage)" if args.msf_layers_per_stage > 1 else "")
        + ("; the greedy rules (`greedy_l1`, `stq`, `random`) rank and cut one-shot at step 0 with the same "
           "per-layer counts (uniform allocation) and retrain for all of R (the papers' greedy baseline). "
           if args.greedy_mode == "oneshot" else
           f"; the greedy rules (`greedy_l1`, `stq`, `random`) follow msf's schedule layer by layer "
           f"(`mode=\"layerwise\"`): group i is cut, with the same per-layer counts (uniform allocation), "
           f"at step {plan.msf_selector} + i x {plan.msf_selector + plan.msf_retrain}, when msf fixes "
           "its gates, and the weights train throughout (msf's freeze during its selector phases). ")
        + "At fit end the pruned filters are removed physically (exactness-checked) and the pruned model is tested.",
        f"3. The unpruned binary network also trains the same R {unit}: drops are measured against it.",
        f"4. BDG: the same start, `Binarize(kernel_quantizer='bdg', zero_lower=True, sparsity={args.bdg_ec}, "
        f"sparsity_gamma={args.bdg_gamma})` for R {unit}, then `ZeroFilterPruning` removes all-zero filters "
        "(its PFR is what that frees, not a target).",
        f"5. All runs: seed {args.seed}, the same data order and augmentation, Adam lr {args.lr:g} with cosine decay "
        f"to 0 over the run, batch {args.batch_size}, no weight decay; Main/Subsidiary's retrain phases use the "
        "same learning rate (`retrain_lr_factor=1`). Model "
        + (f"`{args.model}` for the CPU budget (ResNet-20 instead of the papers' ResNet-18/VGG-11/NIN)."
           if not args.full else f"`{args.model}` (papers' budget)."),
        "",
        "## Results",
        "",
        "| strategy | target PFR | test top-1 (%) | drop vs unpruned (pt, + = worse) | achieved PFR | MAC ratio | "
        "compression vs FP32 | inner binary convs (median) | wall time (min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["strategy"] == "warm_start":
            continue
        target = _fmt(r["target_pfr"], ".0%", "-")
        if r.get("status") != "ok":
            error = str(r.get("error", "?")).replace("|", "/")
            lines.append(f"| {label(args, r['strategy'])} | {target} | **failed**: {error} "
                         f"| | | | | | {_fmt(r.get('wall_s', 0) / 60, '.1f')} |")
            continue
        drop = base["test_acc"] - r["test_acc"] if base is not None and r["strategy"] != "baseline" else None
        lines.append(
            f"| {label(args, r['strategy'])} | {target} | {r['test_acc']:.2f} | {_fmt(drop, '+.2f')} | "
            f"{_fmt(r.get('pfr'), '.3f')} | {_fmt(r.get('mac_ratio'), '.2f')}x | "
            f"{_fmt(r.get('compression'), '.1f')}x | "
            f"{_fmt(r.get('inner_compression'), '.1f', '-')}{'x' if r.get('inner_compression') else ''} | "
            f"{r['wall_s'] / 60:.1f} |"
        )
    bdg = _ok(results, "bdg")
    if bdg is not None:
        lines += ["", f"BDG freed {_fmt(bdg.get('empty_filter_share'), '.1%')} of the prunable filters "
                      f"(all-zero after R {unit} at EC = {args.bdg_ec}); that is the PFR it reaches."]

    def ours(strategy: str, pfr: float, what: str) -> str:
        r = _ok(results, strategy, pfr)
        if r is None or base is None:
            return "not measured (failed or not run)"
        if what == "drop":
            return f"{base['test_acc'] - r['test_acc']:+.2f} pt at PFR {r['pfr']:.1%}"
        return f"{_fmt(r.get('inner_compression'), '.1f')}x (limit 32/(1-PFR)^2 = {32 / (1 - r['pfr']) ** 2:.1f}x)"

    lines += [
        "",
        "## Beside the papers",
        "",
        "| claim (paper, setting) | paper | ours (this run, budget above) |",
        "|---|---|---|",
    ]
    def each(strategy: str, what: str) -> str:
        return "; ".join(f"{strategy} @ {pfr:.0%}: {ours(strategy, pfr, what)}" for pfr in args.pfrs)

    lines += [
        f"| STQ-Nets (BMVC 2020), CIFAR-10 ResNet-18: accuracy loss at 40% PFR | 0.33 pt | {each('stq', 'drop')} |",
        f"| STQ-Nets: layer-wise compression vs FP32 at 40% PFR | 89x (= 32/0.6^2) | "
        f"inner binary convs, {each('stq', 'compression')} |",
        f"| Main/Subsidiary (CVPR 2019), CIFAR-10 VGG-11/NIN/ResNet-18: error increase at 30-40% PFR | 1-2 pt | "
        f"{each('msf', 'drop')} |",
    ]
    lines.append("| Main/Subsidiary: learned selector vs greedy at equal PFR | learned selector better | see below |")
    lines += ["", "## Did the learned selector beat the greedy rules?", ""]
    lines += verdict(results, args.pfrs, n_test)
    work = os.path.abspath(args.work_dir)
    work = os.path.relpath(work, ROOT) if work.startswith(ROOT + os.sep) else work
    lines += ["", f"Raw results: `{args.name}.json`; plot: `{args.name}.png`; logs, pruned models and per-layer "
                  f"reports of every run under `{work}/` (not committed)."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(path: str, args: argparse.Namespace, plan: Plan, results: List[Dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    base = _ok(results, "baseline")
    if base is not None:
        ax.axhline(base["test_acc"], color="k", lw=1, ls="--", label=f"unpruned binary ({base['test_acc']:.2f}%)")
    warm = _ok(results, "warm_start")
    if warm is not None:
        ax.axhline(warm["test_acc"], color="0.6", lw=1, ls=":", label=f"warm start ({warm['test_acc']:.2f}%)")
    for strategy in PRUNING + ("bdg",):
        points = sorted((r["pfr"], r["test_acc"]) for r in results
                        if r["strategy"] == strategy and r.get("status") == "ok")
        if points:
            xs, ys = zip(*points)
            ax.plot([100 * x for x in xs], ys, marker=MARKERS[strategy], ls="-" if len(xs) > 1 else "",
                    label=label(args, strategy))
    ax.set_xlabel("achieved PFR (% of prunable filters removed)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(f"CIFAR-10, binary {args.model}: W={plan.warmup} + R={plan.length} {plan.unit}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(args, plan, meta, results) -> None:
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "plan": asdict(plan), "args": vars(args), "results": results}, f, indent=1,
                  default=str)
    write_markdown(stem + ".md", args, plan, meta, results)
    write_plot(stem + ".png", args, plan, results)


# ---------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not args.full:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|GPU available but not used|"
                                              r"LightningModule.*example_input_array|which may be a bottleneck|"
                                              r"isinstance\(treespec, LeafSpec\)|smaller than the logging interval).*")
    started = time.perf_counter()
    command = "python " + " ".join(shlex.quote(a) for a in ([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]
                                                             if argv is None else ["benchmarks/cifar10_cpu.py", *argv]))
    plan = make_plan(args)
    dm = make_datamodule(args)
    timing = calibrate(args, dm)
    est = estimate(args, plan, dm, timing)
    scaled = None
    if args.fit_budget and plan.unit == "steps" and est["total_s"] > 60 * args.budget_minutes:
        factor = (60 * args.budget_minutes - est["test_s"] - est["overhead_s"]) / est["train_s"]
        args.steps_warmup = max(1, int(args.steps_warmup * factor))
        args.steps = max(1, int(args.steps * factor))
        plan = make_plan(args)
        est = estimate(args, plan, dm, timing)
        scaled = factor
        print(f"[bench] --fit-budget: W and R scaled by {factor:.2f} to fit {args.budget_minutes:.0f} min", flush=True)
    print(f"[bench] {args.model}, {len(plan.groups)} prunable groups; W={plan.warmup} {plan.unit}, "
          f"R={plan.length} {plan.unit} x {len(plan.runs)} runs; msf per group: selector {plan.msf_selector} + "
          f"retrain {plan.msf_retrain}", flush=True)
    print(f"[bench] measured {timing['step_s']:.3f} s per training step (CPU time of the process "
          f"{timing['step_cpu_s']:.3f} s; load average {os.getloadavg()[0]:.1f}), {timing['test_batch_s']:.3f} s per "
          f"test batch -> estimated total {est['total_s'] / 60:.1f} min (train {est['train_s'] / 60:.1f}, "
          f"test {est['test_s'] / 60:.1f}, overhead {est['overhead_s'] / 60:.1f})", flush=True)
    if "msf" in args.strategies and plan.length < 2 * math.ceil(len(plan.groups) / args.msf_layers_per_stage):
        print(f"[bench] WARNING: R={plan.length} {plan.unit} cannot hold one selector and one retrain "
              f"{plan.unit[:-1]} per stage of msf: its runs will fail (recorded as failures)", flush=True)
    if est["total_s"] > 90 * 60 and not args.full:
        print(f"[bench] WARNING: the estimate exceeds 90 min at the measured step time "
              f"(machine busy? load average {os.getloadavg()[0]:.1f}); lower --steps-warmup / --steps "
              "or run when the CPU is quiet", flush=True)
    if args.calibrate:
        if plan.unit == "steps":
            n_runs = len(plan.runs)
            fixed = est["test_s"] + est["overhead_s"]
            steps = (60 * args.budget_minutes - fixed) / (timing["step_s"] * 1.02)
            print(f"[bench] {args.budget_minutes:.0f} min hold about {steps:.0f} training steps: e.g. "
                  f"R={plan.length} leaves W <= {steps - n_runs * plan.length:.0f}", flush=True)
        return 0
    meta = {"command": command, "git": git_state(), "machine": machine(),
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "timing": timing,
            "estimate": est, "fit_budget_factor": scaled, "n_train": len(dm.data_train), "n_test": len(dm.data_test)}
    results: List[Dict[str, Any]] = []
    try:
        warm = train_warm_start(args, plan, dm)
    except Exception as err:  # noqa: BLE001 - nothing else can run; still say so in the outputs
        traceback.print_exc()
        results.append({"strategy": "warm_start", "target_pfr": None, "status": "failed",
                        "error": f"{type(err).__name__}: {err}".splitlines()[0][:300], "wall_s": 0.0})
        meta["wall_min"] = (time.perf_counter() - started) / 60
        write_outputs(args, plan, meta, results)
        return 1
    results.append(warm)
    warm_state = torch.load(warm["checkpoint"], map_location="cpu", weights_only=True)
    for i, run in enumerate(plan.runs):
        print(f"[bench] run {i + 1}/{len(plan.runs)}: {run['strategy']}"
              + (f" at PFR {run['target_pfr']:.0%}" if run["target_pfr"] is not None else "")
              + f" ({(time.perf_counter() - started) / 60:.1f} min elapsed)", flush=True)
        results.append(run_strategy(args, plan, dm, warm_state, run["strategy"], run["target_pfr"]))
        meta["wall_min"] = (time.perf_counter() - started) / 60
        try:  # after every run, so that whatever happens later, what is done is on disk
            write_outputs(args, plan, meta, results)
        except Exception:  # noqa: BLE001 - the final write below raises if this keeps failing
            traceback.print_exc()
    meta["wall_min"] = (time.perf_counter() - started) / 60
    write_outputs(args, plan, meta, results)
    print(f"[bench] done in {meta['wall_min']:.1f} min: {os.path.join(args.out, args.name)}.md", flush=True)
    return 0 if all(r.get("status") == "ok" for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
