"""A latency budget met in Larq Compute Engine: ``target_speedup`` against the measured speedup.

Two checks of issue 20 (items 3 and 4), run on a quiet machine:

- ``--step-points``: one binary 3x3 conv (64 channels on a 16x16 map, as ``export_lce`` writes it)
  at every input count from 16 to 64 (64 outputs) and every output count from 16 to 64 (64
  inputs), timed round-robin in one LCE process: where the time steps is the quantum the engine
  turns into time (input: LCE's 32-bit words; output: the kernel's output block).
- the default: for each ``--networks`` x ``--strategies`` x ``--target-speedups``, a short real
  ``fit`` (random CIFAR-shaped images: the counts, not the accuracy, are measured here) with
  ``MainSubsidiaryPruning`` (learned counts) or ``GreedyFilterPruning`` (L1) given
  ``target_speedup``, its latency table measured on this machine (cached); the pruned network
  and the unpruned binary one exported and timed round-robin in one process
  (:func:`~lightning_bnnprune.pruning.latency_table.check_estimate`): estimated and measured
  speedup, and whether the measured one is within ``--tolerance`` of the target. The fit checks
  its own plan on exported files too (``summary["measured_lce_speedup"]``, "checked in the fit");
  the table's "measured" is an independent timing of the trained, pruned network's file.

Example (the issue's done-when, minutes; times mean nothing while other jobs run, ratios a little
more: the load is written beside them)::

    BNNPRUNE_LCE_PYTHON=.venv-lce/bin/python python benchmarks/lce_speedup.py --networks resnet18_cifar \\
        --strategies msf greedy_l1 --target-speedups 2.0 --out benchmarks/results
    BNNPRUNE_LCE_PYTHON=.venv-lce/bin/python python benchmarks/lce_speedup.py --step-points --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from typing import Any, Dict, List, Optional

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling _report
from _report import git_commit, write_markdown  # noqa: E402

import lightning_bnnprune  # noqa: E402,F401  (registers the CIFAR models)
from lightning_bnnprune import Binarize, GreedyFilterPruning, MainSubsidiaryPruning, export_lce  # noqa: E402
from lightning_bnnprune.binarize import binarize_model  # noqa: E402
from lightning_bnnprune.layers import BinaryConv2d  # noqa: E402
from lightning_bnnprune.module import ImageClassifier  # noqa: E402
from lightning_bnnprune.pruning.allocation import ENGINES  # noqa: E402
from lightning_bnnprune.pruning.latency_table import check_estimate  # noqa: E402
from lightning_bnnprune.pruning.lce_runtime import lce_latency  # noqa: E402

STRATEGIES = ("msf", "greedy_l1")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--name", default=None, help="output file stem (default lce_speedup / lce_step_points)")
    p.add_argument("--step-points", action="store_true", help="time one conv at every count from 16 to 64")
    p.add_argument("--networks", nargs="+", default=["resnet18_cifar"])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--target-speedups", type=float, nargs="+", default=[2.0])
    p.add_argument("--round-to", default="1", help=f"an int or an engine ({', '.join(ENGINES)})")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of each fit")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not all(t > 1 for t in args.target_speedups):
        p.error(f"--target-speedups must be > 1, got {args.target_speedups}")
    if args.round_to not in ENGINES:
        try:
            args.round_to = int(args.round_to)
        except ValueError:
            p.error(f"--round-to must be an int or one of {', '.join(ENGINES)}, got {args.round_to!r}")
    return args


def _load() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def step_points(args: argparse.Namespace, tmp: str) -> Dict[str, Any]:
    counts = list(range(16, 65))
    files = []
    for side in ("in", "out"):
        for c in counts:
            cin, cout = (c, 64) if side == "in" else (64, c)
            conv = torch.nn.Sequential(BinaryConv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout))
            path = os.path.join(tmp, f"{side}{c}.tflite")
            export_lce(conv.eval(), path, input_size=(cin, 16, 16))
            files.append((side, c, path))
    load = _load()
    timed = lce_latency([f for _, _, f in files], threads=args.threads, rounds=args.rounds)
    return {"load_before": load, "load_after": _load(),
            "rows": [{"side": s, "channels": c, "min_ms": t["min_ms"], "median_ms": t["median_ms"]}
                     for (s, c, _), t in zip(files, timed)]}


def _data(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g))
    return DataLoader(data, batch_size=16)


def pruning_for(strategy: str, target: float, round_to, steps: int):
    if strategy == "msf":
        third = max(1, steps // 3)
        return MainSubsidiaryPruning(target_speedup=target, round_to=round_to, warmup=third, selector=third,
                                     retrain=max(1, steps - 2 * third), final_retrain=0)
    return GreedyFilterPruning(target_speedup=target, round_to=round_to, warmup=max(1, steps // 2))


def target_check(args: argparse.Namespace, network: str, strategy: str, target: float, tmp: str) -> Dict[str, Any]:
    seed_everything(args.seed)
    module: LightningModule = ImageClassifier(network, num_classes=10, channels_last=False, scheduler=None)
    unpruned = os.path.join(tmp, f"{network}-binary.tflite")
    if not os.path.isfile(unpruned):
        reference = ImageClassifier(network, num_classes=10, channels_last=False, scheduler=None).net
        binarize_model(reference)
        export_lce(reference.eval(), unpruned, input_size=(3, 32, 32))
    pruning = pruning_for(strategy, target, args.round_to, args.steps)
    trainer = Trainer(max_steps=args.steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=tmp, callbacks=[Binarize(), pruning])
    trainer.fit(module, _data(args.seed))
    pruned = os.path.join(tmp, f"{network}-{strategy}-{target:g}.tflite")
    export_lce(module.net.eval(), pruned, input_size=(3, 32, 32))
    kept = {name: len(keep) for name, keep in pruning.record.groups.items()}
    load = _load()
    check = check_estimate(pruning.latency(module), pruning._sites, kept, pruned, unpruned, threads=args.threads,
                           rounds=args.rounds)
    return {"network": network, "strategy": strategy, "target_speedup": target, "round_to": args.round_to,
            "pfr": pruning.summary.get("pfr"), "mac_ratio": pruning.summary.get("mac_ratio"), **check,
            "fit_measured_speedup": pruning.summary.get("measured_lce_speedup"),
            "within": abs(check["measured_speedup"] / target - 1) <= args.tolerance,
            "load_before": load, "load_after": _load()}


def _speedup(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def to_markdown(results: Dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [f"# {meta['title']}", "", f"`{meta['command']}` at commit {meta['commit']}; LCE "
             "indirect BGEMM + XNNPack, batch 1, round-robin in one process, minimum over rounds; "
             "load average (1/5/15 min) before and after each timing in the table.", ""]
    if "rows" in results:
        lines += ["| side | channels | min ms | median ms |", "|---|---:|---:|---:|"]
        lines += [f"| {r['side']} | {r['channels']} | {r['min_ms']:.4f} | {r['median_ms']:.4f} |"
                  for r in results["rows"]]
        lines += ["", f"load: {results['load_before']} -> {results['load_after']}"]
    else:
        lines += ["| network | strategy | target | round_to | PFR | MAC ratio | estimated | checked in the fit | "
                  f"measured | within {meta['tolerance']:.0%} | load |", "|---|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
        for r in results["checks"]:
            lines.append(f"| {r['network']} | {r['strategy']} | {r['target_speedup']:g}x | {r['round_to']} | "
                         f"{r['pfr']:.1%} | {r['mac_ratio']:.2f}x | {r['estimated_speedup']:.2f}x | "
                         f"{_speedup(r.get('fit_measured_speedup'))} | "
                         f"{r['measured_speedup']:.2f}x | {'yes' if r['within'] else 'no'} | {r['load_before']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/lce_speedup.py " + " ".join(shlex.quote(a) for a in given)
    name = args.name or ("lce_step_points" if args.step_points else "lce_speedup")
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.step_points:
            results = step_points(args, tmp)
            title = "LCE binary conv time against channel counts (step points)"
        else:
            results = {"checks": [target_check(args, n, s, t, tmp) for n in args.networks for s in args.strategies
                                  for t in args.target_speedups]}
            title = "target_speedup against the measured LCE speedup"
    results["meta"] = {"title": title, "command": command, "commit": git_commit(), "tolerance": args.tolerance,
                       "threads": args.threads, "rounds": args.rounds}
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    write_markdown(to_markdown(results), os.path.join(args.out, f"{name}.md"))
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
