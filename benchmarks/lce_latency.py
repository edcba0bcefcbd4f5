"""Larq Compute Engine latency: what pruning a binary network buys in time in a real 1-bit engine.

For each network (``resnet20_cifar``, ``resnet18_cifar``, ``vgg11_cifar`` at 32x32, timm's
``resnet18`` at 64x64, and ``mobilenetv2_050`` at 64x64 when it exports; random init, seeded),
``.tflite`` files written with :func:`export_lce`:

- ``float``: the network as timm builds it, not binarised (TFLite float ops, the same engine);
- ``binary``: binarised (``Binarize`` defaults: XNOR kernels, ``ste_sign`` inputs, first conv and
  classifier full precision);
- one pruned network per ``--strategies`` x ``--pfrs`` x ``--round-to``: the binary network with
  a one-shot greedy rule (``greedy_l1``, ``stq``, ``random``) cutting each group's lowest-scored
  filters, counts allocated by ``:<allocation>`` (``uniform``, ``size``, ``macs``, ``global``;
  a rule changes the counts only under ``global``, so the others share one file, timed once),
  every group keeping a multiple of ``round_to`` filters (or all); ``--round-to lce`` (or
  ``onednn``) keeps the engine's blocks per group (:data:`~lightning_bnnprune.pruning.allocation.ENGINES`),
  the option ``export=lce`` makes the app's default;
- for ``resnet20_cifar``, msf's *learned* counts (``msf_learned:v2_seed<s>@<pfr>/r1``): the kept
  filters per group that ``benchmarks/cifar10_cpu_v2.py``'s ``msf:final_learned_l1init`` cells
  reached on CIFAR-10 (``--msf-cells``), every seed and PFR there is, cut into the network;
- depthwise networks (``mobilenetv2_050``) with ``export_lce(grouped="float")``: the grouped
  binary convs run as float convolutions of the +-1 tensors (LCE runs grouped ``LceBconv2d``
  only on one path), the 1x1 convs as ``LceBconv2d``.

The default grid holds the engine-aware check of issue 20 (40 % of resnet18_cifar and vgg11_cifar,
``round_to=1`` against ``"lce"``, side by side in one process); alone::

      python benchmarks/lce_latency.py --networks resnet18_cifar vgg11_cifar --strategies greedy_l1 \
          --pfrs 0.4 --round-to 1 lce --threads 1 --name lce_engine_counts

All files of one network are timed together in one LCE interpreter process, round-robin
(:func:`lce_latency`: ``--warmup`` calls each, then ``--rounds`` rounds of ``--calls`` calls of
every file in turn), on LCE's fastest path on x86-64 (``--kernels indirect_bgemm``:
``use_indirect_bgemm=True`` for ``LceBconv2d``, ``use_xnnpack=True`` for the float ops), batch 1,
once per ``--threads``. Each row: the MAC ratio against the unpruned binary network (the
compression report's), the minimum and median per-call time, the measured speedup against the
unpruned binary network (minimum over minimum; the median's in the JSON) and speedup / MAC ratio.

Resumable: the files and their export facts stay in ``--work-dir`` (one ``.json`` beside each
``.tflite``), and ``<out>/<name>.json`` keeps every timed group (network x threads); a rerun
skips what is there and times the rest. A results file written with other timing settings is
refused rather than mixed.

Example (the full grid; export takes seconds per file, and the timings mean nothing while other
processes run on the machine)::

    BNNPRUNE_LCE_PYTHON=.venv-lce/bin/python python benchmarks/lce_latency.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from importlib import metadata
from typing import Any, Dict, List, Optional

import timm
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling _report
from _report import git_commit, round_to_arg, write_markdown  # noqa: E402

import lightning_bnnprune  # noqa: E402,F401  (registers the CIFAR models)
from lightning_bnnprune import (  # noqa: E402
    binarize_model, compression_report, export_lce, find_channel_groups, lce_latency, remove_filters,
)
from lightning_bnnprune.pruning import criteria  # noqa: E402
from lightning_bnnprune.pruning.allocation import (  # noqa: E402
    ALLOCATIONS as FIXED_ALLOCATIONS, ENGINES, GLOBAL, allocate, macs_per_channel,
)
from lightning_bnnprune.pruning.export_lce import LceExportError  # noqa: E402
from lightning_bnnprune.pruning.lce_runtime import KERNELS  # noqa: E402

NETWORKS = {"resnet20_cifar": 32, "resnet18_cifar": 32, "vgg11_cifar": 32, "resnet18": 64, "mobilenetv2_050": 64}
GREEDY = {"greedy_l1": "l1", "stq": "binarization_error", "random": "random"}
ALLOCATIONS = list(FIXED_ALLOCATIONS) + [GLOBAL]
TIMING = ("kernels", "rounds", "calls", "warmup", "batch", "seed")  # settings a results file must share


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--name", default="lce_latency", help="output file stem")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "lightning_logs", "lce_latency"),
                   help="the .tflite files and their export facts (not committed)")
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--strategies", nargs="+", default=[f"{r}:{a}" for r in GREEDY for a in ALLOCATIONS],
                   help=f"<{'|'.join(GREEDY)}>[:<{'|'.join(ALLOCATIONS)}>] (default allocation uniform)")
    p.add_argument("--pfrs", type=float, nargs="+", default=[0.25, 0.4, 0.48])
    p.add_argument("--round-to", type=round_to_arg, nargs="+", default=[1, 8, 32, "lce"],
                   help=f"an int >= 1 or an engine: {', '.join(ENGINES)}")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--export-only", action="store_true",
                   help="write the files and their facts, time nothing (timing wants a quiet machine; export does not)")
    p.add_argument("--msf-cells", default=os.path.join(ROOT, "benchmarks", "results", "cifar10_cpu_v2_cells"),
                   help="resnet20_cifar: also msf's learned counts from these v2 cells (empty: none)")
    p.add_argument("--kernels", default="indirect_bgemm", choices=list(KERNELS), help="LCE's kernel path")
    p.add_argument("--batch", type=int, default=1, choices=[1], help="images per call (export_lce writes batch 1)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=5, help="calls per round; a round's time is their mean")
    p.add_argument("--warmup", type=int, default=5, help="calls per file before the rounds")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for s in args.strategies:
        rule, _, allocation = s.partition(":")
        if rule not in GREEDY or (allocation and allocation not in ALLOCATIONS):
            p.error(f"unknown strategy {s!r}: choose <{'|'.join(GREEDY)}>[:<{'|'.join(ALLOCATIONS)}>]")
    args.strategies = [s if ":" in s else f"{s}:uniform" for s in args.strategies]
    if not all(0 < v < 1 for v in args.pfrs):
        p.error(f"--pfrs must lie in (0, 1), got {args.pfrs}")
    if min(getattr(args, "threads")) < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if any(isinstance(r, int) and r < 1 for r in args.round_to):
        p.error(f"--round-to must be >= 1, got {args.round_to} (or an engine: {', '.join(ENGINES)})")
    for flag, low in (("rounds", 1), ("calls", 1), ("warmup", 0)):
        if getattr(args, flag) < low:
            p.error(f"--{flag} must be >= {low}, got {getattr(args, flag)}")
    return args


# ------------------------------------------------------------------ the files
def build(name: str, seed: int, binary: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = timm.create_model(name, num_classes=10)
    if binary:
        binarize_model(net)
    return net.eval()


def prune(net: torch.nn.Module, strategy: str, pfr: float, round_to, size: int, seed: int):
    """``strategy`` = ``<rule>:<allocation>`` one-shot on ``net`` (in place); its record."""
    rule, allocation = strategy.split(":")
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
    analysis = find_channel_groups(net, x[:1])
    groups = {g.name: g for g in analysis.groups}
    torch.manual_seed(seed)
    criterion = criteria.get(GREEDY[rule])
    scores = {g.name: criteria.scores_for(criterion, net, g) for g in analysis.groups}
    extra: Dict[str, Any] = {}
    if allocation == "macs":
        extra["macs_per_channel"] = macs_per_channel(net, analysis, x[:1])
    if allocation == GLOBAL:
        extra.update(scores=scores, groups=groups)
    counts = allocate({g: groups[g].size for g in groups}, pfr, allocation, 1, round_to=round_to,
                      quanta={g: groups[g].num_parts for g in groups}, **extra)
    masks = {}
    for g in analysis.groups:
        keep = torch.ones(g.size, dtype=torch.bool)
        keep[torch.argsort(scores[g.name], stable=True)[: counts[g.name]]] = False
        masks[g.name] = keep
    return remove_filters(net, analysis, masks=masks, example_inputs=x)


def cut(net: torch.nn.Module, kept: Dict[str, int], size: int, seed: int):
    """Cut every group of ``net`` named in ``kept`` to that many filters (its first: an op's time
    does not depend on which), in place; its record."""
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
    analysis = find_channel_groups(net, x[:1])
    unknown = set(kept) - {g.name for g in analysis.groups}
    if unknown:
        raise ValueError(f"the learned counts name groups the network does not have: {sorted(unknown)}")
    masks = {g.name: torch.arange(g.size) < kept.get(g.name, g.size) for g in analysis.groups}
    return remove_filters(net, analysis, masks=masks, example_inputs=x)


def learned_counts(cells: str, pfrs: List[float]) -> List[Dict[str, Any]]:
    """msf's learned counts (``msf:final_learned_l1init``) from the v2 grid's finished cells."""
    rows = []
    for path in sorted(glob.glob(os.path.join(cells, "msf-final_learned_l1init_pfr*_seed*.json"))) if cells else []:
        with open(path) as f:
            cell = json.load(f)
        pfr = cell.get("target_pfr")
        if cell.get("status") != "ok" or "kept_filters" not in cell or not any(abs(pfr - p) < 1e-9 for p in pfrs):
            continue
        rows.append({"key": f"msf_learned:v2_seed{cell['seed']}@{pfr:g}/r1", "strategy": "msf:learned",
                     "target_pfr": pfr, "round_to": 1, "kept": cell["kept_filters"],
                     "source": os.path.relpath(path, ROOT)})
    return rows


def variants(args: argparse.Namespace, network: str) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = [{"key": "float"}, {"key": "binary"}]
    for strategy in args.strategies:
        for pfr in args.pfrs:
            for round_to in args.round_to:
                rows.append({"key": f"{strategy}@{pfr:g}/r{round_to}", "strategy": strategy, "target_pfr": pfr,
                             "round_to": round_to})
    if network == "resnet20_cifar":  # the network the v2 cells trained
        rows += learned_counts(args.msf_cells, args.pfrs)
    return rows


def _counts_digest(record) -> str:
    """One name per distinct set of kept counts: prunings that keep the same counts share a file."""
    kept = sorted((name, len(keep)) for name, keep in record.groups.items())
    return hashlib.sha1(json.dumps(kept).encode()).hexdigest()[:12]


def export_file(args: argparse.Namespace, network: str, variant: Dict[str, Any]) -> Dict[str, Any]:
    """Write (or find) the variant's ``.tflite``; its facts, or the one-line reason it has none."""
    folder = os.path.join(args.work_dir, f"{network}-seed{args.seed}")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, variant["key"].replace(":", "_").replace("/", "_").replace("@", "_"))
    if os.path.isfile(stem + ".json"):
        with open(stem + ".json") as f:
            return json.load(f)
    size = NETWORKS[network]
    info: Dict[str, Any] = {k: v for k, v in variant.items() if k != "kept"}
    info["path"] = stem + ".tflite"
    start = time.perf_counter()
    try:
        net = build(network, args.seed, binary=variant["key"] != "float")
        if "strategy" in variant:
            record = (cut(net, variant["kept"], size, args.seed) if "kept" in variant else
                      prune(net, variant["strategy"], variant["target_pfr"], variant["round_to"], size, args.seed))
            summary = compression_report(net, record).summary
            info.update(pfr=summary["pfr"], mac_ratio=summary["mac_ratio"])
            info["path"] = os.path.join(folder, f"counts-{_counts_digest(record)}.tflite")
        else:
            info.update(pfr=0.0, mac_ratio=1.0)
        facts = info["path"][: -len(".tflite")] + ".facts.json"
        if os.path.isfile(facts):  # the same counts, exported for another strategy already
            with open(facts) as f:
                info.update(json.load(f), shared=True)
        else:
            exported = export_lce(net, info["path"], input_size=(3, size, size), grouped="float")
            with open(facts, "w") as f:
                json.dump(exported, f)
            info.update(exported)
    except (LceExportError, ValueError) as err:
        info = dict(variant, error=str(err).splitlines()[0])
    info["export_s"] = round(time.perf_counter() - start, 1)
    with open(stem + ".json", "w") as f:
        json.dump(info, f, indent=1)
    return info


# ------------------------------------------------------------------ timing
def time_group(args: argparse.Namespace, files: Dict[str, Dict[str, Any]], threads: int) -> Dict[str, Any]:
    """Every exported file of one network, round-robin in one interpreter process."""
    keys = [k for k, info in files.items() if "error" not in info]
    paths = list(dict.fromkeys(files[k]["path"] for k in keys))  # a file shared by strategies is timed once
    load = os.getloadavg()
    started = time.time()
    measured = lce_latency(paths, threads=threads, kernels=args.kernels, batch=args.batch,
                           rounds=args.rounds, calls=args.calls, warmup=args.warmup)
    by_path = dict(zip(paths, measured))
    times = {k: {key: by_path[files[k]["path"]][key] for key in ("min_ms", "median_ms", "round_ms")} for k in keys}
    return {"threads": threads, "commit": git_commit(), "load_before": [round(v, 2) for v in load],
            "load_after": [round(v, 2) for v in os.getloadavg()], "seconds": round(time.time() - started, 1),
            "flags": measured[0]["flags"] if measured else None, "files_timed": len(paths), "times": times}


def rows_of(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per (network, threads, file): times, MAC ratio, speedup against the binary network."""
    rows = []
    for network, entry in results["networks"].items():
        for threads, group in sorted(entry["timings"].items(), key=lambda kv: int(kv[0])):
            base = group["times"].get("binary")
            for key, info in entry["files"].items():
                row = {"network": network, "threads": int(threads), **{k: v for k, v in info.items() if k != "path"}}
                t = group["times"].get(key)
                if t is not None:
                    row.update(min_ms=t["min_ms"], median_ms=t["median_ms"])
                    if base is not None:
                        row["speedup"] = base["min_ms"] / t["min_ms"]
                        row["speedup_median"] = base["median_ms"] / t["median_ms"]
                        if key != "float":
                            row["speedup_over_mac_ratio"] = row["speedup"] / info["mac_ratio"]
                rows.append(row)
    return rows


# ------------------------------------------------------------------ outputs
def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} ({len(names)} logical cores)" if names else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def to_markdown(results: Dict[str, Any]) -> str:
    meta = results["meta"]
    flags = ", ".join(f"{k}={v}" for k, v in zip(("use_reference_bconv", "use_indirect_bgemm", "use_xnnpack"),
                                                 KERNELS[meta["kernels"]]))
    threads = sorted({int(t) for e in results["networks"].values() for t in e["timings"]})
    lines = [
        "# Larq Compute Engine latency: pruned binary networks in a 1-bit engine",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Commit: {meta['commit']}",
        "",
        f"Machine: {meta['cpu']}, {meta['platform']}, Python {meta['python']}, torch {meta['torch']}, "
        f"larq-compute-engine {meta['lce']}.",
        "",
        f"LCE kernel path `{meta['kernels']}` ({flags}), batch {meta['batch']}. Every file of a network is "
        f"timed in one interpreter process, round-robin: {meta['warmup']} warm-up calls each, then "
        f"{meta['rounds']} rounds of {meta['calls']} calls of every file in turn; the time of a call is a "
        "round's mean, min and median over rounds. Speedup: the unpruned binary network's minimum over the "
        "row's minimum (`float` row: how much faster the float network is than the binary one). MAC ratio: "
        "the compression report's, against the unpruned network. Random init (seed "
        f"{meta['seed']}): weights do not change an LCE op's time.",
        "",
    ]
    head = "| network | file | PFR | MAC ratio |" + "".join(
        f" {t} thr: min ms (median) | speedup | speedup / MAC |" for t in threads)
    lines += [head, "|---|---|---|---|" + "---|---|---|" * len(threads)]
    timed = {(r["network"], r["key"], r["threads"]): r for r in rows_of(results)}
    for network, entry in results["networks"].items():
        for key, info in entry["files"].items():
            if info.get("error") == "as the binary network":
                continue
            if "error" in info:
                lines.append(f"| {network} | {key} | - | - | refused: {info['error']} |"
                             + " |" * (3 * len(threads) - 1))
                continue
            note = (f" ({info['float_binary_layers']} grouped binary convs as float)"
                    if info.get("float_binary_layers") else "")
            cells = f"| {network} | {key}{note} | {100 * info['pfr']:.1f} % | {info['mac_ratio']:.2f}x |"
            for t in threads:
                r = timed.get((network, key, t), {})
                ratio = r.get("speedup_over_mac_ratio")
                cells += (" - | - | - |" if "speedup" not in r else
                          f" {r['min_ms']:.3f} ({r['median_ms']:.3f}) | {r['speedup']:.2f}x | "
                          f"{'-' if ratio is None else f'{ratio:.2f}'} |")
            lines.append(cells)
    lines.append("")
    for network, entry in results["networks"].items():
        for t in threads:
            f, b = timed.get((network, "float", t), {}), timed.get((network, "binary", t), {})
            if "min_ms" in f and "min_ms" in b:
                lines.append(f"- {network}, {t} thread(s): binary against float in LCE {f['min_ms']:.3f} -> "
                             f"{b['min_ms']:.3f} ms ({f['min_ms'] / b['min_ms']:.2f}x).")
    for network, entry in results["networks"].items():
        for threads, group in sorted(entry["timings"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"- {network}, {threads} thread(s): load average {group['load_before']} before, "
                         f"{group['load_after']} after; {group['seconds']} s of timing at commit {group['commit']}.")
    return "\n".join(lines) + "\n"


def plot(results: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows_of(results) if "speedup" in r and r["key"] not in ("float", "binary")]
    threads = sorted({r["threads"] for r in rows}) or [1]
    fig, axes = plt.subplots(1, len(threads), figsize=(5.5 * len(threads), 4.5), squeeze=False)
    markers = {1: "o", 8: "s", 32: "^", "lce": "*", "onednn": "P"}
    networks = list(results["networks"])
    for ax, t in zip(axes[0], threads):
        top = 1.0
        for i, network in enumerate(networks):
            for r in (r for r in rows if r["threads"] == t and r["network"] == network):
                ax.scatter(r["mac_ratio"], r["speedup"], color=f"C{i}", marker=markers.get(r["round_to"], "D"),
                           label=f"{network}, round_to={r['round_to']}")
                top = max(top, r["mac_ratio"], r["speedup"])
        ax.plot([1, top], [1, top], "k--", lw=0.8, label="speedup = MAC ratio")
        ax.set_xlabel("MAC ratio (compression report)")
        ax.set_ylabel("measured LCE speedup (min)")
        ax.set_title(f"{t} thread(s), {results['meta']['kernels']}")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/lce_latency.py " + " ".join(shlex.quote(a) for a in given)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"{args.name}.json")
    settings = {k: getattr(args, k) for k in TIMING}
    results: Dict[str, Any] = {"meta": {}, "networks": {}}
    if os.path.isfile(json_path):
        with open(json_path) as f:
            results = json.load(f)
        theirs = {k: results["meta"].get(k) for k in TIMING}
        if theirs != settings:
            sys.stderr.write(f"lce_latency: error: {json_path} was timed with {theirs}, not {settings}; "
                             "pass another --name or --out\n")
            return 2
    try:
        lce = metadata.version("larq-compute-engine")
    except metadata.PackageNotFoundError:
        lce = "unknown"
    results["meta"].update(settings, command=command, commit=git_commit(), cpu=_cpu(), platform=platform.platform(),
                           python=platform.python_version(), torch=torch.__version__, lce=lce)

    def write() -> None:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        write_markdown(to_markdown(results), os.path.join(args.out, f"{args.name}.md"))
        plot(results, os.path.join(args.out, f"{args.name}.png"))

    for network in args.networks:
        entry = results["networks"].setdefault(network, {"input": [3, NETWORKS[network], NETWORKS[network]],
                                                         "files": {}, "timings": {}})
        for variant in variants(args, network):
            binary = entry["files"].get("binary", {})
            if "error" in binary and "strategy" in variant:  # what refuses the binary network refuses its prunings
                entry["files"][variant["key"]] = dict(variant, error="as the binary network")
            if variant["key"] not in entry["files"]:
                info = export_file(args, network, variant)
                entry["files"][variant["key"]] = info
                print(f"{network} {variant['key']}: " + (info["error"] if "error" in info else
                                                         f"{info['file_bytes']:,} bytes"), flush=True)
        wanted = [v["key"] for v in variants(args, network) if "error" not in entry["files"][v["key"]]]
        for threads in [] if args.export_only else args.threads:
            done = entry["timings"].get(str(threads), {}).get("times", {})
            if not wanted or all(k in done for k in wanted):
                print(f"{network}, {threads} thread(s): "
                      + ("timed already, skipped" if wanted else "nothing exported"), flush=True)
                continue
            subset = {k: entry["files"][k] for k in wanted}
            entry["timings"][str(threads)] = time_group(args, subset, threads)
            write()
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
