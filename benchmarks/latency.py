"""CPU latency of a pruned binary network against the unpruned one, measured in the same run.

Builds a binarised timm model, removes a seeded random ``--pfr`` share of every prunable channel
group with :func:`lightning_bnnprune.remove_filters` (exactness-checked), then
times both models alternately (so load changes on the machine hit both alike) under
``torch.inference_mode``: ``--warmup`` untimed calls, then the median of ``--repeats`` timed ones,
per batch size. The measured speedup is printed beside the MAC ratio the compression report
predicts.

``--round-to`` keeps, per group, a multiple of that many channels (or all) around the ``--pfr``
share (:func:`~lightning_bnnprune.pruning.allocation.round_counts`); an engine's name keeps its
blocks, ``onednn``: 16 (AVX-512's nChw16c), else 8. Several values are timed side by side, every
pruned model round-robin with the unpruned one (issue 20, item 7)::

    python benchmarks/latency.py --threads 1 --round-to onednn 1 8 --batch-sizes 1 64 \\
        --out benchmarks/results/latency_onednn.md

Example::

    python benchmarks/latency.py --model resnet18_cifar --pfr 0.4 --batch-sizes 1 64 \\
        --out benchmarks/results/latency.md
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Dict, List, Tuple

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling _report

from lightning_bnnprune import (  # noqa: E402
    binarize_model, compression_report, find_channel_groups, remove_filters,
)
from lightning_bnnprune.pruning.allocation import ENGINES, round_counts  # noqa: E402
from _report import git_commit, round_to_arg, write_markdown  # noqa: E402


def _time(model: torch.nn.Module, x: torch.Tensor) -> Tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    model(x)
    return time.perf_counter() - wall, time.process_time() - cpu


def build(name: str, pfr: float, size: int, seed: int, round_to=1):
    torch.manual_seed(seed)
    net = timm.create_model(name, num_classes=10)
    binarize_model(net)
    net.eval()
    baseline = copy.deepcopy(net)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
    analysis = find_channel_groups(net, x[:1])
    g = torch.Generator().manual_seed(seed)
    sizes = {group.name: group.size for group in analysis.groups}
    counts = round_counts(sizes, {k: round(pfr * n) for k, n in sizes.items()}, round_to)
    masks = {}
    for group in analysis.groups:
        keep = torch.ones(group.size, dtype=torch.bool)
        keep[torch.randperm(group.size, generator=g)[: counts[group.name]]] = False
        masks[group.name] = keep
    record = remove_filters(net, analysis, masks=masks, example_inputs=x)
    return baseline, net, record


def measure(models: Dict[str, torch.nn.Module], batch: int, size: int, warmup: int,
            repeats: int) -> Dict[str, Dict[str, float]]:
    """``{model: {"wall": median s, "cpu": median s, "cpu_min": min s}}`` per call."""
    x = torch.randn(batch, 3, size, size)
    times: Dict[str, List[Tuple[float, float]]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for _ in range(repeats):
            for k, m in models.items():  # alternate, so a busy moment on the machine hits both
                times[k].append(_time(m, x))
    return {
        k: {"wall": statistics.median(w for w, _ in v), "cpu": statistics.median(c for _, c in v),
            "cpu_min": min(c for _, c in v)}
        for k, v in times.items()
    }


def op_breakdown(models: Dict[str, torch.nn.Module], batch: int, size: int, repeats: int = 3) -> Dict[str, Dict[str, float]]:
    """Self CPU time (s) of the convolutions and of everything else, per model, from
    ``torch.profiler`` (minimum over ``repeats`` profiled calls): where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(batch, 3, size, size)
    out: Dict[str, Dict[str, float]] = {}
    with torch.inference_mode():
        for name, m in models.items():
            m(x)
            best = None
            for _ in range(repeats):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    m(x)
                events = prof.key_averages()
                conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key) / 1e6
                total = sum(e.self_cpu_time_total for e in events) / 1e6
                if best is None or total < best["total"]:
                    best = {"conv": conv, "other": total - conv, "total": total}
            out[name] = best
    return out


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18_cifar", help="timm model name (default: resnet18_cifar)")
    parser.add_argument("--pfr", type=float, default=0.4, help="share of every group's channels removed")
    parser.add_argument("--size", type=int, default=32, help="input height = width")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--round-to", type=round_to_arg, nargs="+", default=[1],
                        help=f"per group, keep a multiple of this (an int, or an engine: {', '.join(ENGINES)}); "
                             "several: timed side by side")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-op breakdown")
    parser.add_argument("--out", default=None, help="markdown file for the results")
    parser.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    load = os.getloadavg()
    built = {r: build(args.model, args.pfr, args.size, args.seed, r) for r in args.round_to}
    baseline, pruned, record = built[args.round_to[0]]
    report = compression_report(pruned, record)
    variants = {r: (p, compression_report(p, rec).summary) for r, (_, p, rec) in built.items()}
    rows = []
    for batch in args.batch_sizes:
        models = {"unpruned": baseline, **{f"r{r}": p for r, (p, _) in variants.items()}}
        t = measure(models, batch, args.size, args.warmup, args.repeats)
        u = t["unpruned"]
        for r, (_, summary) in variants.items():
            p = t[f"r{r}"]
            row = dict(batch=batch, round_to=r, pfr=summary["pfr"], mac_ratio=summary["mac_ratio"],
                       wall_u=u["wall"] * 1e3, wall_p=p["wall"] * 1e3, wall=u["wall"] / p["wall"],
                       cpu=u["cpu"] / p["cpu"], cpu_min=u["cpu_min"] / p["cpu_min"])
            rows.append(row)
            print(f"batch {batch:>3}, round_to={r}: wall {row['wall_u']:8.2f} -> {row['wall_p']:8.2f} ms "
                  f"({row['wall']:.2f}x) | CPU-time speedup median {row['cpu']:.2f}x, min {row['cpu_min']:.2f}x | "
                  f"MAC ratio {row['mac_ratio']:.2f}x", flush=True)
    breakdown = None
    if not args.no_profile:
        breakdown = op_breakdown({"unpruned": baseline, "pruned": pruned}, max(args.batch_sizes), args.size)
    wall = time.perf_counter() - started
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731

    lines = [
        f"## {args.model} at {args.size}x{args.size}, {args.pfr:.0%} of every group removed (CPU)",
        "",
        f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"- git commit: {git_commit(('lightning_bnnprune', 'benchmarks/latency.py'))}",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load average at start {load[0]:.1f} (other processes share the machine)",
        f"- torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}",
        *([f"- **caution**: load average {load[0]:.1f} on {os.cpu_count()} CPUs at the start: other processes "
           "took CPU time and memory bandwidth during the run, so absolute times are inflated and the "
           "speedups vary from run to run; compare the two models only within this run"]
          if load[0] > (os.cpu_count() or 1) else []),
        f"- timing: torch.inference_mode, {args.warmup} warm-up calls, median of {args.repeats}, "
        "the models alternating (round-robin)",
        f"- wall time of the benchmark: {wall:.1f} s",
        f"- exactness of the removal: max |logit diff| {record.max_abs_diff:.2g}",
        f"- {report.headline()}",
        f"- parameters: {params(baseline) / 1e6:.3f}M -> {params(pruned) / 1e6:.3f}M",
        "",
        "Wall: median wall-clock time per call. CPU: CPU time of the process per call (all its threads),",
        "which other processes on a shared machine inflate less; its minimum over the repeats is the",
        "least disturbed estimate (timeit's advice). Speedup = unpruned / pruned.",
        "",
        "| batch | round_to | PFR | wall unpruned (ms) | wall pruned (ms) | wall speedup | CPU speedup (median) "
        "| CPU speedup (min) | MAC ratio | best speedup / MAC ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch']} | {r['round_to']} | {r['pfr']:.1%} | {r['wall_u']:.1f} | {r['wall_p']:.1f} | "
        f"{r['wall']:.2f}x | "
        f"{r['cpu']:.2f}x | {r['cpu_min']:.2f}x | {r['mac_ratio']:.2f}x | "
        f"{max(r['wall'], r['cpu'], r['cpu_min']) / r['mac_ratio']:.2f} |"
        for r in rows
    ]
    if breakdown is not None:
        u, p = breakdown["unpruned"], breakdown["pruned"]
        lines += [
            "",
            f"Where the time goes at batch {max(args.batch_sizes)} (torch.profiler self CPU time, best of 3 "
            "profiled calls): convolutions shrink with the MACs; the rest (activation sign, batch norm, "
            "ReLU, residual adds, and the per-call weight binarisation) shrinks with the channels or the weights.",
            "",
            "| part | unpruned (ms) | pruned (ms) | speedup |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {k} | {u[k] * 1e3:.1f} | {p[k] * 1e3:.1f} | {u[k] / p[k]:.2f}x |" for k in ("conv", "other", "total")]
    text = "\n".join(lines) + "\n"
    write_markdown(text, args.out, args.append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
