"""CIFAR-10 pruning benchmark, protocol v2: every strategy from the kept warm start, a grid of
(strategy, PFR, seed) cells filled over as many sittings as it takes.

Protocol (issue 9):

* *Start*: the committed warm start (``benchmarks/assets/resnet20_cifar_binary.pt``, written by
  ``benchmarks/warm_start.py``), binarised exactly as it was trained (its manifest's ``binarize``).
* *Cells*: the unpruned network (``baseline``) and each strategy (``greedy_l1``, ``stq``,
  ``random``, and Main/Subsidiary in one or more named configurations ``msf:<name>``, see
  :data:`MSF_CONFIGS`) at each PFR, for each seed, train exactly ``--steps`` (R) steps from the
  start: Adam at ``--lr``, cosine to 0 over R, batch 128, crop + flip, all 50 000 training images.
  The seed changes the data order (and, for ``random``, the selection). The greedy rules cut
  one-shot at step 0 and retrain for R; ``msf`` runs its stages and, where its configuration says
  so, a final retrain inside the same R. At the end the pruned filters are removed physically and
  the pruned model is tested on the 10 000 test images.
* *Resumable*: each cell is written to ``<cells-dir>/<cell>.json`` when it ends (by default beside
  the results, ``benchmarks/results/cifar10_cpu_v2_cells/``, so the grid committed with them
  continues from a clean clone; logs go to ``--work-dir``, not committed); a cell
  whose file exists is skipped, so rerunning the same command continues the grid. Inside a cell,
  a checkpoint at every epoch's end (``<work-dir>/ckpt/<cell>/last.ckpt``, with the random states)
  lets a cell cut short resume where it stopped and end with the weights of an uninterrupted one.
  A cell being run is claimed (``<cell>.running`` with the pid), so several processes can share one cells dir. The
  summary (``<out>/<name>.{md,json,png}``) is rewritten after every cell from all finished cells in
  the cells dir: mean +- std over seeds per (strategy, PFR), and msf (best configuration) minus the
  best greedy rule with the standard error of that difference.

Example (one sitting of the real grid; it takes hours on 2 CPU cores)::

    python benchmarks/cifar10_cpu_v2.py --data-dir ../shared/data/cifar10 --out benchmarks/results

On 2 cores, two processes of one thread each fill the grid faster than one of two threads (1.34x,
measured: ``benchmarks/README.md``): start the same command twice with ``--threads 1``.

*Protocol v3* (issue 21) is this grid from the warm start trained from the full-precision weights
(``--warm-start benchmarks/assets/resnet20_cifar_binary_fp.pt``), every cell distilling from the
full-precision network (``--teacher benchmarks/assets/resnet20_cifar_fp.pt``, Binarize's teacher)
and the distilling strategies' retraining from it too (``--distill-teacher full_precision``), at
``--steps 700`` and ``--steps 3900``, each under its own ``--name``: ``benchmarks/cifar10_cpu_v3.py``
runs it and draws the curve across R.

*At an equal LCE speedup* (issue 20): ``--target-speedups`` adds cells that prune to a speedup in
Larq Compute Engine instead of a PFR (``target_speedup``, a latency table measured on the machine
that runs the cell, cached in ``~/.cache/lightning_bnnprune``), for the strategies that take one:
``msf`` with learned counts (``msf:final_learned_l1init``, ``msf:final_learned``...) and the greedy
rules with uniform shares (``greedy_l1``, ``greedy_l1:distill``). Each such cell exports the pruned
network and the unpruned binary one to ``.tflite`` and times them round-robin in LCE (needs
``BNNPRUNE_LCE_PYTHON`` under numpy 2): the summary compares msf with greedy at each target,
with the measured speedups beside. E.g. (on a quiet machine)::

    BNNPRUNE_LCE_PYTHON=.venv-lce/bin/python python benchmarks/cifar10_cpu_v2.py --data-dir ../shared/data/cifar10 \\
        --strategies msf:final_learned_l1init greedy_l1 --pfrs 0.4 --target-speedups 1.2 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_bnnprune import (
    Binarize, GreedyFilterPruning, ImageClassifier, MainSubsidiaryPruning, NpzDataModule, RandomStateCheckpoint,
    binarize_model, find_channel_groups,
)
from lightning_bnnprune.introspect import example_batch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling _report
from _report import git_commit, write_json, write_png, write_text  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = {"greedy_l1": "l1", "stq": "binarization_error", "random": "random"}
#: ``<greedy rule>:<variant>``: the rule with other ``GreedyFilterPruning`` arguments, e.g.
#: ``greedy_l1:global`` (one L1 ranking across layers) or ``greedy_l1:distill`` (distillation from
#: the start network while retraining, as ``msf:*_distill`` gets it)
GREEDY_VARIANTS: Dict[str, Dict[str, Any]] = {
    "uniform": {}, "size": {"allocation": "size"}, "macs": {"allocation": "macs"},
    "global": {"allocation": "global"}, "distill": {"distill": 1.0},
}
#: Main/Subsidiary configurations for the ablation. ``paper``: Xu et al.'s layer-wise schedule,
#: gates from open, uniform shares; ``final_learned_l1init``: the library's defaults, the best
#: measured. ``final_share``: share of R given to the final retrain; ``layers_per_stage`` 0 = all groups.
MSF_CONFIGS: Dict[str, Dict[str, Any]] = {
    "paper": {},
    "final": {"final_share": 0.5},
    "final_l1init": {"final_share": 0.5, "gate_init_criterion": "l1"},
    "final_learned": {"final_share": 0.5, "allocation": "learned", "layers_per_stage": 0, "layer_floor": 0.25},
    "final_distill": {"final_share": 0.5, "distill": 1.0},
    # one selector over all groups from the L1 ranking, then most of R retraining: the greedy rule's
    # schedule with a learned correction of its selection
    "onestage_l1init": {"final_share": 0.7, "gate_init_criterion": "l1", "layers_per_stage": 0},
    "final_learned_l1init": {"final_share": 0.5, "allocation": "learned", "layers_per_stage": 0, "layer_floor": 0.25,
                             "gate_init_criterion": "l1"},
    # the same with most of R in the final retrain (a shorter selector and retrain before it)
    "long_final_learned_l1init": {"final_share": 0.8, "allocation": "learned", "layers_per_stage": 0,
                                  "layer_floor": 0.25, "gate_init_criterion": "l1"},
    "final_learned_l1init_distill": {"final_share": 0.5, "allocation": "learned", "layers_per_stage": 0,
                                     "layer_floor": 0.25, "gate_init_criterion": "l1", "distill": 1.0},
}
DEFAULT_STRATEGIES = ["baseline", "msf:final_learned_l1init", "greedy_l1", "stq", "random"]


def is_greedy(strategy: str) -> bool:
    """``greedy_l1``, ``stq``, ``random``, with or without a ``:<variant>``."""
    return strategy.partition(":")[0] in GREEDY


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "cifar10"))
    p.add_argument("--warm-start", default=os.path.join(ROOT, "benchmarks", "assets", "resnet20_cifar_binary.pt"),
                   help="weights from benchmarks/warm_start.py (its .json manifest beside it)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="where <name>.md/.json go")
    p.add_argument("--name", default="cifar10_cpu_v2")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "lightning_logs", "cifar10_cpu_v2"),
                   help="each cell's logs")
    p.add_argument("--cells-dir", default=None, help="finished cells, one JSON each (default <out>/<name>_cells)")
    p.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES,
                   help=f"baseline, {', '.join(GREEDY)} (optionally :<variant>, variant in "
                        f"{', '.join(GREEDY_VARIANTS)}), msf:<config> with config in {', '.join(MSF_CONFIGS)}")
    p.add_argument("--pfrs", type=float, nargs="+", default=[0.4, 0.25])
    p.add_argument("--target-speedups", type=float, nargs="+", default=[],
                   help="also cells at these LCE speedups (target_speedup), for msf with learned counts and the "
                        "greedy rules with uniform shares")
    p.add_argument("--retime-lce", action="store_true",
                   help="train nothing: time the finished speedup cells' .tflite files again, round-robin in one "
                        "process (run it on a quiet machine); each cell keeps its first figure as lce_speedup_in_cell")
    p.add_argument("--latency-table", default=None,
                   help="target_speedup cells: a LatencyTable JSON instead of measuring one (tests)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=700, help="R: steps every cell trains (about 2 epochs)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--distill", type=float, default=0.0,
                   help="distillation weight from the start network for every pruning strategy "
                        "(msf configs may set their own)")
    p.add_argument("--teacher", default=None,
                   help="full-precision weights (benchmarks/assets/resnet20_cifar_fp.pt) distilled into every cell "
                        "through its whole fit (Binarize's teacher; protocol v3)")
    p.add_argument("--teacher-weight", type=float, default=1.0, help="weight of --teacher's KL term")
    p.add_argument("--distill-teacher", default="binary_start", choices=("binary_start", "full_precision"),
                   help="what the pruning strategies' retraining distils from (with --distill or a distilling "
                        "variant): the start network, or --teacher")
    p.add_argument("--msf-selector-share", type=float, default=1 / 3, help="share of a stage's slot in its selector")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--subset-train", type=int, default=None, help="tests")
    p.add_argument("--subset-test", type=int, default=None, help="tests")
    p.add_argument("--stop-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests: a killed sitting
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.cells_dir = args.cells_dir or os.path.join(args.out, args.name + "_cells")
    for s in args.strategies:
        name, _, config = s.partition(":")
        greedy_ok = name in GREEDY and (not config or config in GREEDY_VARIANTS)
        if not (s == "baseline" or greedy_ok or (name == "msf" and config in MSF_CONFIGS)):
            p.error(f"unknown strategy {s!r}: choose baseline, <{'|'.join(GREEDY)}>[:<{'|'.join(GREEDY_VARIANTS)}>] "
                    f"or msf:<{'|'.join(MSF_CONFIGS)}>")
    if any(not 0.0 < x < 1.0 for x in args.pfrs):
        p.error(f"--pfrs must lie in (0, 1), got {args.pfrs}")
    if any(t <= 1 for t in args.target_speedups):
        p.error(f"--target-speedups must be > 1, got {args.target_speedups}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.teacher is not None and not os.path.isfile(args.teacher):
        p.error(f"--teacher: no file {args.teacher!r}")
    if args.distill_teacher == "full_precision" and args.teacher is None:
        p.error("--distill-teacher full_precision distils from --teacher: give the full-precision weights")
    if not os.path.isfile(args.warm_start):
        p.error(f"--warm-start {args.warm_start} does not exist: run benchmarks/warm_start.py to the end first")
    return args


def cells(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Seed by seed, so that a grid stopped part-way has every strategy at its first seeds."""
    out = []
    for seed in args.seeds:
        for strategy in args.strategies:
            for pfr in [None] if strategy == "baseline" else args.pfrs:
                tag = strategy.replace(":", "-") + ("" if pfr is None else f"_pfr{round(100 * pfr):02d}")
                out.append({"strategy": strategy, "target_pfr": pfr, "seed": seed, "key": f"{tag}_seed{seed}"})
            for speedup in args.target_speedups if takes_speedup(strategy) else []:
                tag = strategy.replace(":", "-") + f"_speedup{speedup:g}x"
                out.append({"strategy": strategy, "target_pfr": None, "target_speedup": speedup, "seed": seed,
                            "key": f"{tag}_seed{seed}"})
    return out


def takes_speedup(strategy: str) -> bool:
    """msf with learned counts and the greedy rules with uniform shares take ``target_speedup``."""
    name, _, config = strategy.partition(":")
    if name == "msf":
        return MSF_CONFIGS[config].get("allocation") == "learned"
    return is_greedy(strategy) and "allocation" not in GREEDY_VARIANTS[config or "uniform"]


def lce_speedup(net: torch.nn.Module, unpruned: torch.nn.Module, folder: str) -> Dict[str, Any]:
    """The pruned network's measured LCE speedup against the unpruned binary one, timed round-robin."""
    from lightning_bnnprune import export_lce, lce_latency

    try:
        paths = [os.path.join(folder, "pruned.tflite"), os.path.join(folder, "unpruned.tflite")]
        for model, path in zip((net, unpruned), paths):
            export_lce(model.eval(), path, input_size=(3, 32, 32))
        return {**speedup_fields(*lce_latency(paths)), "lce_load": list(os.getloadavg())}
    except (ImportError, RuntimeError, ValueError) as err:
        return {"lce_error": str(err).splitlines()[0]}


class ReseedAtTrainStart(Callback):
    """The cell's seed, after every callback's setup: data order and augmentation per seed. A
    resumed cell keeps the random states its checkpoint restored (``RandomStateCheckpoint``)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is None:
            lightning.seed_everything(self.seed, verbose=False)


class CellClock(Callback):
    """Seconds the cell has trained over all its sittings, carried in its checkpoints; and the step
    this sitting started from (0 unless resumed)."""

    def __init__(self) -> None:
        self.earlier, self.trained, self.began, self.start_step = 0.0, 0.0, None, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.began, self.trained, self.start_step = time.perf_counter(), self.earlier, trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self.trained, self.began = self.elapsed(), None

    def elapsed(self) -> float:
        return self.trained + (0.0 if self.began is None else time.perf_counter() - self.began)

    def state_dict(self) -> Dict[str, float]:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.earlier = state["elapsed"]


class StopAtStep(Callback):
    """Tests: the cell dies at this step, as a killed sitting would (its checkpoints stay)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"stopped at step {trainer.global_step} (--stop-at-step)")


def state_sha256(net: torch.nn.Module) -> str:
    """A digest of the pruned network's weights and buffers: equal digests, equal networks."""
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def speedup_fields(pruned: Dict[str, Any], whole: Dict[str, Any]) -> Dict[str, float]:
    """A cell's LCE figures from the two files' timings (``lce_latency``'s results)."""
    return {"lce_ms": pruned["min_ms"], "lce_unpruned_ms": whole["min_ms"],
            "lce_speedup": whole["min_ms"] / pruned["min_ms"]}


def retime_lce(args: argparse.Namespace, cell_dir: str) -> int:
    """Time every finished speedup cell's two files again, all round-robin in one LCE process (on a
    quiet machine: a cell times its files beside whatever else runs). The cell keeps its first
    figure as ``lce_speedup_in_cell``; the number of cells retimed is returned."""
    from lightning_bnnprune import lce_latency

    done = [c for c in finished_cells(cell_dir) if c.get("target_speedup") is not None and "lce_speedup" in c]
    pairs = [(c, os.path.join(args.work_dir, c["key"], "pruned.tflite"), os.path.join(args.work_dir, c["key"],
                                                                                        "unpruned.tflite"))
             for c in done]
    pairs = [(c, p, u) for c, p, u in pairs if os.path.isfile(p) and os.path.isfile(u)]
    if not pairs:
        return 0
    load = [round(x, 2) for x in os.getloadavg()]
    timed = lce_latency([f for _, p, u in pairs for f in (p, u)], rounds=15)
    for i, (cell, _, _) in enumerate(pairs):
        cell.setdefault("lce_speedup_in_cell", cell["lce_speedup"])
        cell.update(speedup_fields(timed[2 * i], timed[2 * i + 1]), lce_load=load, lce_retimed=git_commit())
        write_json(os.path.join(cell_dir, cell["key"] + ".json"), cell)
    return len(pairs)


def load_start(args: argparse.Namespace) -> tuple:
    state = torch.load(args.warm_start, map_location="cpu", weights_only=True)
    manifest_path = args.warm_start[: -len(".pt")] + ".json"
    manifest = json.load(open(manifest_path)) if os.path.isfile(manifest_path) else {}
    binarize = manifest.get("binarize", {"input_quantizer": "ste_sign", "kernel_quantizer": "xnor", "keep_fp": []})
    model = manifest.get("settings", {}).get("model", "resnet20_cifar")
    return state, binarize, model, manifest


#: What each config in :data:`MSF_CONFIGS` changes is relative to the paper (the callback's own
#: defaults are the measured best configuration, so they are not what the configs start from).
PAPER_ARGS: Dict[str, Any] = {"allocation": "uniform", "gate_init_criterion": None}


def msf_callback(args: argparse.Namespace, config: Dict[str, Any], pfr: Optional[float], groups: int,
                 speedup: Optional[float] = None) -> MainSubsidiaryPruning:
    config = {**PAPER_ARGS, **config}
    share = config.pop("final_share", 0.0)
    per_stage = config.pop("layers_per_stage", 1) or groups
    stages = math.ceil(groups / per_stage)
    final = round(args.steps * share)
    slot = (args.steps - final) // stages
    if slot < 2:
        raise ValueError(f"R={args.steps} steps cannot hold {stages} stages of a selector and a retrain step")
    selector = max(1, round(slot * args.msf_selector_share))
    retrain = slot - selector
    if share:
        final = args.steps - stages * slot  # the remainder goes to the final retrain
    config.setdefault("distill", args.distill)
    config.setdefault("distill_teacher", args.distill_teacher)
    target = {"target_pfr": pfr} if speedup is None else {"target_speedup": speedup,
                                                          "latency_table": args.latency_table}
    return MainSubsidiaryPruning(**target, selector=selector, retrain=retrain, warmup=0, unit="steps",
                                 layers_per_stage=per_stage, retrain_lr_factor=1.0, final_retrain=final, **config)


def cell_ckpt_dir(args: argparse.Namespace, cell: Dict[str, Any]) -> str:
    """Where a cell's epoch checkpoint lives until the cell ends (its settings beside, ``.settings.json``)."""
    return os.path.join(args.work_dir, "ckpt", cell["key"])


def cell_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """What a cell's checkpoint must have been made with to be resumed."""
    keys = ("warm_start", "steps", "lr", "batch_size", "distill", "teacher", "teacher_weight", "distill_teacher",
            "msf_selector_share", "latency_table", "subset_train", "subset_test")
    return {k: getattr(args, k) for k in keys}


def run_cell(args: argparse.Namespace, cell: Dict[str, Any], dm: NpzDataModule, start: tuple) -> Dict[str, Any]:
    state, binarize_cfg, model, _ = start
    strategy, pfr, seed = cell["strategy"], cell["target_pfr"], cell["seed"]
    speedup = cell.get("target_speedup")
    target = {"target_pfr": pfr} if speedup is None else {"target_speedup": speedup,
                                                          "latency_table": args.latency_table}
    run_dir = os.path.join(args.work_dir, cell["key"])
    lightning.seed_everything(seed, verbose=False)
    module = ImageClassifier(model, num_classes=10, optimizer="adam", lr=args.lr, scheduler="cosine")
    module.net.load_state_dict(state, strict=True)  # latent weights into the tree Binarize swaps
    teacher = {} if args.teacher is None else {"teacher": args.teacher, "teacher_weight": args.teacher_weight}
    binarize = Binarize(**binarize_cfg, **teacher)
    if strategy == "baseline":
        pruner = None
    elif is_greedy(strategy):
        rule, _, variant = strategy.partition(":")
        options = {"distill": args.distill, "distill_teacher": args.distill_teacher,
                   **GREEDY_VARIANTS[variant or "uniform"]}
        pruner = GreedyFilterPruning(**target, criterion=GREEDY[rule], mode="oneshot", warmup=0, seed=seed,
                                     **options)
    else:
        probe = copy.deepcopy(module.net)
        binarize_model(probe, **{k: v for k, v in binarize_cfg.items() if k in ("input_quantizer", "kernel_quantizer",
                                                                                "keep_fp")})
        groups = len(find_channel_groups(probe, example_batch(probe)).groups)
        pruner = msf_callback(args, MSF_CONFIGS[strategy.split(":", 1)[1]], pfr, groups, speedup)
    unpruned = None
    if speedup is not None:  # the start network, binarised as the cell binarises it, for the LCE timing
        unpruned = copy.deepcopy(module.net)
        binarize_model(unpruned, **{k: v for k, v in binarize_cfg.items()
                                    if k in ("input_quantizer", "kernel_quantizer", "keep_fp")})
    # a checkpoint at every epoch's end: a cell cut short (a sitting ends) resumes from its last one,
    # if it was started with the same settings (else it starts over)
    ckpt_dir = cell_ckpt_dir(args, cell)
    last, settings = os.path.join(ckpt_dir, "last.ckpt"), cell_settings(args)
    resume = None
    if os.path.isfile(last):
        try:
            same = json.load(open(ckpt_dir + ".settings.json")) == settings
        except (OSError, ValueError):
            same = False
        if same:
            resume = last
        else:
            print(f"[v2] {cell['key']}: its checkpoint was made with other settings; starting over", flush=True)
            shutil.rmtree(ckpt_dir)
    os.makedirs(os.path.dirname(ckpt_dir), exist_ok=True)
    write_json(ckpt_dir + ".settings.json", settings)
    clock = CellClock()
    callbacks = [binarize] + ([pruner] if pruner else []) + [
        ReseedAtTrainStart(seed), RandomStateCheckpoint(), clock,
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, every_n_epochs=1, save_on_train_epoch_end=True,
                        enable_version_counter=False)]
    if args.stop_at_step:
        callbacks.append(StopAtStep(args.stop_at_step))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, max_epochs=-1, callbacks=callbacks,
                         logger=CSVLogger(run_dir, name=""), log_every_n_steps=25,  # version_<k>: one per sitting
                         default_root_dir=run_dir, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    began = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    fit_s = clock.elapsed()  # training seconds over every sitting of this cell
    tester = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    out = tester.test(module, datamodule=dm, verbose=False)[0]
    result = {**cell, "status": "ok", "test_acc": 100.0 * float(out["test/acc"]), "global_step": trainer.global_step,
              "fit_s": fit_s, "wall_s": clock.earlier + time.perf_counter() - began,
              "resumed_from_step": clock.start_step if resume else None, "weights_sha256": state_sha256(module.net),
              "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if pruner is not None:
        result.update(pfr=pruner.pfr(), kept_filters=pruner.kept_filters(),
                      mac_ratio=pruner.summary.get("mac_ratio"), compression=pruner.summary.get("compression"))
    if unpruned is not None:
        result.update(estimated_lce_speedup=pruner.summary.get("estimated_lce_speedup"),
                      **lce_speedup(module.net, unpruned, run_dir))
    return result


def mean_std(values: List[float]) -> tuple:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan"), len(values))


def diff_se(a: List[float], b: List[float]) -> tuple:
    """Mean of ``a`` minus mean of ``b`` and the standard error of that difference (nan with one seed)."""
    se = math.sqrt((statistics.variance(a) / len(a) if len(a) > 1 else math.nan)
                   + (statistics.variance(b) / len(b) if len(b) > 1 else math.nan))
    return statistics.fmean(a) - statistics.fmean(b), se


def summary_command(args: argparse.Namespace) -> str:
    return " ".join(shlex.quote(a) for a in ["python", os.path.relpath(__file__, ROOT), *args.argv])


def summarise(args: argparse.Namespace, done: List[Dict[str, Any]], manifest: Dict[str, Any],
              sitting_s: float) -> Dict[str, Any]:
    cells_of: Dict[tuple, List[Dict[str, Any]]] = {}
    at_speedup: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in done:
        if r.get("status") == "ok" and r.get("target_speedup") is not None:
            at_speedup.setdefault((r["strategy"], r["target_speedup"]), []).append(r)
        elif r.get("status") == "ok":
            cells_of.setdefault((r["strategy"], r["target_pfr"]), []).append(r)
    by = {key: [r["test_acc"] for r in rs] for key, rs in cells_of.items()}

    def mean_of(key, field):  # the pruned networks' PFR, MAC ratio, compression (None: unpruned)
        vals = [r[field] for r in cells_of[key] if r.get(field) is not None]
        return statistics.fmean(vals) if vals else None

    rows = {f"{s}@{p}": dict(zip(("mean", "std", "n"), mean_std(v)), strategy=s, target_pfr=p, values=v,
                             **{field: mean_of((s, p), field) for field in ("pfr", "mac_ratio", "compression")})
            for (s, p), v in sorted(by.items(), key=lambda kv: (str(kv[0][1]), kv[0][0]))}
    base = by.get(("baseline", None))
    comparisons = []
    for pfr in sorted({p for (_, p) in by if p is not None}, reverse=True):
        msf = {s: v for (s, p), v in by.items() if p == pfr and s.startswith("msf")}
        greedy = {s: v for (s, p), v in by.items() if p == pfr and is_greedy(s)}
        if not msf or not greedy:
            continue
        # the best mean among the configurations run over the most seeds (a one-seed lead is an anecdote)
        best_msf = max(msf, key=lambda s: (len(msf[s]), statistics.fmean(msf[s])))
        best_greedy = max(greedy, key=lambda s: (len(greedy[s]), statistics.fmean(greedy[s])))
        a, b = msf[best_msf], greedy[best_greedy]
        diff, se = diff_se(a, b)
        comparisons.append({"target_pfr": pfr, "msf": best_msf, "greedy": best_greedy, "diff": diff, "se": se,
                            "n": [len(a), len(b)], "drop_vs_unpruned": (statistics.fmean(base) - statistics.fmean(a))
                            if base else None})
    # At equal compute: each msf row against the greedy rows (any PFR) that save no more MACs than it
    # does, the closest in MACs (within 2 % of the highest such ratio), the best of them by seeds
    # then mean: a lead cannot come from keeping more of the network.
    equal_macs = []
    for key, r in rows.items():
        if not r["strategy"].startswith("msf") or r.get("mac_ratio") is None:
            continue
        rivals = [g for g in rows.values() if is_greedy(g["strategy"])
                  and g.get("mac_ratio") is not None and g["mac_ratio"] <= r["mac_ratio"] * (1 + 1e-3)]
        if rivals:
            top = max(g["mac_ratio"] for g in rivals)
            g = max((g for g in rivals if g["mac_ratio"] >= 0.98 * top), key=lambda g: (g["n"], g["mean"]))
            diff, se = diff_se(r["values"], g["values"])
            equal_macs.append({"msf": key, "greedy": f"{g['strategy']}@{g['target_pfr']}", "diff": diff, "se": se,
                               "mac_ratio": [r["mac_ratio"], g["mac_ratio"]], "n": [r["n"], g["n"]]})
    equal_speedup = []
    for t in sorted({t for (_, t) in at_speedup}):
        here = {s: rs for (s, tt), rs in at_speedup.items() if tt == t}
        for s, rs in sorted(here.items()):
            accs = [r["test_acc"] for r in rs]
            measured = [r["lce_speedup"] for r in rs if r.get("lce_speedup") is not None]
            estimated = [r["estimated_lce_speedup"] for r in rs if r.get("estimated_lce_speedup") is not None]
            mean, std, n = mean_std(accs)
            equal_speedup.append({"target_speedup": t, "strategy": s, "mean": mean, "std": std, "n": n,
                                  "values": accs, "pfr": statistics.fmean(r["pfr"] for r in rs),
                                  "mac_ratio": statistics.fmean(r["mac_ratio"] for r in rs),
                                  "estimated": statistics.fmean(estimated) if estimated else None,
                                  "measured": statistics.fmean(measured) if measured else None})
    commands = sorted({(r.get("command", "?"), r.get("commit", "?")) for r in done})
    return {"command": summary_command(args), "cell_commands": [{"command": c, "commit": k} for c, k in commands],
            "warm_start": {"path": os.path.relpath(args.warm_start, ROOT), "test_acc": manifest.get("test_acc"),
                           "sha256": manifest.get("weights_sha256")},
            "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "distill": args.distill,
            "msf_configs": MSF_CONFIGS, "rows": rows, "comparisons": comparisons, "equal_macs": equal_macs,
            "equal_speedup": equal_speedup,
            "cells_done": len(done), "cells_wall_s": sum(r.get("wall_s", 0.0) for r in done),
            "sitting_wall_s": sitting_s, "load_average": [round(x, 2) for x in os.getloadavg()],
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "commit": git_commit()}


def num(x: Optional[float], spec: str = ".2f") -> str:
    """A number for a markdown table; ``-`` for none or nan (one seed has no spread)."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(summary: Dict[str, Any]) -> str:
    def times(x, spec):
        return "-" if x is None else format(x, spec) + "x"

    lines = [f"# CIFAR-10 pruning benchmark, protocol v2 ({summary['cells_done']} cells)", "",
             f"Summary written by `{summary['command']}` at `{summary['commit']}`; torch {summary['torch']}, "
             f"{summary['cpus']} CPUs  ",
             f"Warm start: `{summary['warm_start']['path']}` "
             f"(test top-1 {num(summary['warm_start']['test_acc'], '.4f')}); "
             f"R = {summary['steps']} steps per cell, Adam lr {summary['lr']}, cosine, batch {summary['batch_size']}  ",
             f"Wall time of the finished cells: {summary['cells_wall_s'] / 60:.1f} min (every cell's command, "
             "commit, threads and load are in the JSON)", "",
             "Cells came from:", "",
             *[f"- `{c['command']}` at `{c['commit']}`" for c in summary["cell_commands"]], "",
             "| strategy | target PFR | test top-1 (%) mean | std | seeds | PFR reached | MAC ratio | compression |",
             "|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"].values():
        pfr = "-" if row["target_pfr"] is None else f"{row['target_pfr']:.2f}"
        lines.append(f"| {row['strategy']} | {pfr} | {num(row['mean'])} | {num(row['std'])} | {row['n']} | "
                     f"{num(row.get('pfr'), '.3f')} | {times(row.get('mac_ratio'), '.2f')} | {times(row.get('compression'), '.1f')} |")
    lines += ["", "*PFR reached*: removed / prunable filters; *MAC ratio*: MACs before / after the removal; "
              "*compression*: inner binary layers' bits before / after (as in the pruning summary). At the same "
              "PFR, learned per-layer counts keep more of the residual trunk and remove more inside the blocks, "
              "so they save fewer MACs and bits than the uniform shares of the greedy rules."]
    lines += ["", "Goal (issue 9): msf - best greedy >= 1.0 pt with the difference above two standard errors, "
              "and msf at most 1.5 pt below the unpruned network.", "",
              "| PFR | best msf | best greedy | msf - greedy (pt) | std. error | msf drop vs unpruned (pt) | goal met | "
              "MAC ratio msf / greedy |", "|---|---|---|---|---|---|---|---|"]

    def macs(strategy, pfr):
        return summary["rows"].get(f"{strategy}@{pfr}", {}).get("mac_ratio")

    for c in summary["comparisons"]:
        met = (c["diff"] >= 1.0 and c["diff"] > 2 * c["se"] and c["drop_vs_unpruned"] is not None
               and c["drop_vs_unpruned"] <= 1.5)
        lines.append(f"| {c['target_pfr']:.2f} | {c['msf']} | {c['greedy']} | {num(c['diff'])} | {num(c['se'])} | "
                     f"{num(c['drop_vs_unpruned'])} | {'yes' if met else 'no'} | "
                     f"{times(macs(c['msf'], c['target_pfr']), '.2f')} / {times(macs(c['greedy'], c['target_pfr']), '.2f')} |")
    if summary.get("equal_macs"):
        lines += ["", "At equal compute: each msf row against the greedy rows, at any PFR, whose pruned networks "
                  "save no more MACs: the closest in MACs (within 2 %), then most seeds, then best mean.", "",
                  "| msf (strategy@PFR) | MAC ratio | greedy (strategy@PFR) | MAC ratio | msf - greedy (pt) | "
                  "std. error | seeds |", "|---|---|---|---|---|---|---|"]
        for c in summary["equal_macs"]:
            lines.append(f"| {c['msf']} | {times(c['mac_ratio'][0], '.2f')} | {c['greedy']} | "
                         f"{times(c['mac_ratio'][1], '.2f')} | {num(c['diff'])} | {num(c['se'])} | "
                         f"{c['n'][0]} / {c['n'][1]} |")
    if summary.get("equal_speedup"):
        lines += ["", "At an equal LCE speedup (`target_speedup`, a latency table measured on the machine that ran "
                  "the cell; *measured*: the pruned file against the unpruned binary one, round-robin in LCE, "
                  "mean over seeds). The best at each target wins by its mean over seeds.", "",
                  "| target speedup | strategy | test top-1 (%) mean | std | seeds | PFR reached | MAC ratio | "
                  "estimated | measured |", "|---|---|---|---|---|---|---|---|---|"]
        for c in summary["equal_speedup"]:
            lines.append(f"| {c['target_speedup']:g}x | {c['strategy']} | {num(c['mean'])} | {num(c['std'])} | "
                         f"{c['n']} | {num(c['pfr'], '.3f')} | {times(c['mac_ratio'], '.2f')} | "
                         f"{times(c['estimated'], '.2f')} | {times(c['measured'], '.2f')} |")
        lines.append("")
        for t in sorted({c["target_speedup"] for c in summary["equal_speedup"]}):
            here = {c["strategy"]: c for c in summary["equal_speedup"] if c["target_speedup"] == t}
            msf = [c for s, c in here.items() if s.startswith("msf")]
            greedy = [c for s, c in here.items() if not s.startswith("msf")]
            for m in msf:
                for g in greedy:
                    diff, se = diff_se(m["values"], g["values"])
                    verdict = "msf leads" if diff > 0 else "greedy leads"
                    lines.append(f"- At {t:g}x: {m['strategy']} minus {g['strategy']}: {diff:+.2f} pt (SE "
                                 f"{num(se)}; {verdict}{', above two SE' if abs(diff) > 2 * se else ''}).")
    lines += ["", "Main/Subsidiary configurations (`MainSubsidiaryPruning` arguments on top of the paper's: layer by layer, "
              "gates from open, uniform shares, no final retrain; "
              "`final_share`: share of R in the final retrain, `layers_per_stage` 0: all groups in one stage):", ""]
    lines += [f"- `msf:{name}`: {json.dumps(config) if config else 'the paper (layer by layer, gates from open, uniform shares)'}"
              for name, config in summary["msf_configs"].items()]
    return "\n".join(lines) + "\n"


def write_plot(path: str, summary: Dict[str, Any]) -> None:
    """Test top-1 per strategy (mean, std as error bar, each seed as a dot) per PFR; the unpruned
    network trained the same R steps as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"].values() if r["target_pfr"] is not None]
    pfrs = sorted({r["target_pfr"] for r in rows}, reverse=True)
    panels = max(1, len(pfrs)) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    for ax, pfr in zip(axes[0], pfrs):
        here = sorted((r for r in rows if r["target_pfr"] == pfr), key=lambda r: -r["mean"])
        xs = range(len(here))
        ax.bar(xs, [r["mean"] for r in here], yerr=[0 if math.isnan(r["std"]) else r["std"] for r in here],
               color=["tab:blue" if r["strategy"].startswith("msf") else "tab:gray" for r in here], capsize=3)
        for x, r in zip(xs, here):
            ax.plot([x] * len(r["values"]), r["values"], "k.", ms=4)
        base = summary["rows"].get("baseline@None")
        if base:
            ax.axhline(base["mean"], ls="--", color="tab:green", label=f"unpruned {base['mean']:.2f}")
            ax.legend(loc="lower left")
        low = min(min(r["values"]) for r in here)
        ax.set_ylim(max(0.0, low - 3.0), max([base["mean"]] if base else []
                                              + [max(r["values"]) for r in here]) + 1.0)
        ax.set_xticks(list(xs), [r["strategy"] for r in here], rotation=30, ha="right")
        ax.set_ylabel("CIFAR-10 test top-1 (%)")
        ax.set_title(f"PFR {pfr:.2f}, R = {summary['steps']} steps")
    ax = axes[0][-1]  # accuracy against compute saved: equal-MAC comparisons read off vertically
    for r in rows:
        if r.get("mac_ratio") is not None:
            msf = r["strategy"].startswith("msf")
            ax.errorbar(r["mac_ratio"], r["mean"], yerr=0 if math.isnan(r["std"]) else r["std"], capsize=3,
                        fmt="o" if msf else "s", color="tab:blue" if msf else "tab:gray")
            ax.annotate(f"{r['strategy']}@{r['target_pfr']:.2f}", (r["mac_ratio"], r["mean"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("MAC ratio (before / after removal)")
    ax.set_ylabel("CIFAR-10 test top-1 (%)")
    ax.set_title("accuracy against MACs saved (msf: circles)")
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)


def claim(path: str) -> bool:
    """Take the cell ``path`` (``<cell>.running`` holds the pid of the process running it), unless a
    live process holds it: several processes of this script on the same ``--cells-dir`` (each with
    ``--threads 1`` on a 2-core machine) share the grid without running a cell twice."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            with open(path) as f:
                pid = int(f.read().strip() or 0)
            os.kill(pid, 0)
            if pid != os.getpid():
                return False  # another live process runs it
        except (OSError, ValueError):
            pass  # its process is gone (killed): take the cell over
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def start_digest(args: argparse.Namespace, manifest: Dict[str, Any]) -> str:
    """The warm start's sha256 (from its manifest, else from the file)."""
    if manifest.get("weights_sha256"):
        return manifest["weights_sha256"]
    with open(args.warm_start, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_one_start(args: argparse.Namespace, cell_dir: str, manifest: Dict[str, Any]) -> None:
    """A grid is from one warm start: cells from another in the same cells dir would be averaged
    together (cells written before issue 21 carry no digest and are not checked)."""
    mine = start_digest(args, manifest)
    other = next((c for c in finished_cells(cell_dir) if c.get("warm_start_sha256", mine) != mine), None)
    if other is not None:
        raise SystemExit(f"error: {cell_dir} holds cells from another warm start ({other['key']}: "
                         f"{other['warm_start_sha256'][:12]}, this run's {args.warm_start}: {mine[:12]}); "
                         "give another --name or --cells-dir")


def finished_cells(cell_dir: str) -> List[Dict[str, Any]]:
    """Every finished cell in the cells dir, whichever sitting or process ran it."""
    return [json.load(open(os.path.join(cell_dir, name))) for name in sorted(os.listdir(cell_dir))
            if name.endswith(".json")]


def write_summary(args: argparse.Namespace, cell_dir: str, manifest: Dict[str, Any], sitting_s: float) -> None:
    done = finished_cells(cell_dir)
    if not done:
        return
    summary = summarise(args, done, manifest, sitting_s)
    write_json(os.path.join(args.out, args.name + ".json"), {**summary, "cells": done})
    write_text(os.path.join(args.out, args.name + ".md"), markdown(summary))
    write_plot(os.path.join(args.out, args.name + ".png"), summary)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    cell_dir = args.cells_dir
    os.makedirs(cell_dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    start = load_start(args)
    check_one_start(args, cell_dir, start[3])
    if args.retime_lce:
        print(f"[v2] {retime_lce(args, cell_dir)} speedup cells' files timed again", flush=True)
        write_summary(args, cell_dir, start[3], time.perf_counter() - began)
        return {"ran": 0, "skipped": 0, "grid": 0}
    dm = NpzDataModule(data_dir=args.data_dir, batch_size=args.batch_size, val_split=0, seed=0, augment=True,
                       subset_train=args.subset_train, subset_test=args.subset_test)
    grid = cells(args)
    ran = skipped = busy = 0
    for cell in grid:
        path = os.path.join(cell_dir, cell["key"] + ".json")
        lock = path[: -len(".json")] + ".running"
        if os.path.isfile(path):
            skipped += 1
            continue
        if not claim(lock):
            busy += 1
            continue
        try:
            result = run_cell(args, cell, dm, start)
        except Exception as err:  # noqa: BLE001  one failed cell must not stop the grid; it is retried next time
            traceback.print_exc()
            print(f"[v2] {cell['key']}: FAILED {type(err).__name__}: {err}", flush=True)
            continue
        finally:
            os.remove(lock)
        write_json(path, {**result, "command": summary_command(args), "commit": git_commit(),
                          "warm_start_sha256": start_digest(args, start[3]),
                          "threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()]})
        ckpt_dir = cell_ckpt_dir(args, cell)  # the finished cell is its JSON
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        os.remove(ckpt_dir + ".settings.json")
        ran += 1
        print(f"[v2] {cell['key']}: test top-1 {result['test_acc']:.2f}% ({result['wall_s']:.0f} s)", flush=True)
        write_summary(args, cell_dir, start[3], time.perf_counter() - began)
    if not ran:  # a sitting with nothing left to run still rebuilds the summary from the cells
        write_summary(args, cell_dir, start[3], time.perf_counter() - began)
    failed = len(grid) - ran - skipped - busy
    print(f"[v2] {ran} cells run, {skipped} skipped (finished before), {busy} run by another process, "
          f"{failed} failed", flush=True)
    return {"ran": ran, "skipped": skipped, "grid": len(grid)}


if __name__ == "__main__":
    main()
