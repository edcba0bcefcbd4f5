"""Larq Compute Engine export check: pruned binary networks run by LCE's own interpreter.

For each network (``resnet20_cifar``, ``resnet18_cifar``, ``vgg11_cifar`` at 32x32 and timm's
ImageNet-style ``resnet18`` on CIFAR-10 upsampled to 64x64):

1. built by timm with 10 classes (random init, seeded), binarised (``Binarize`` defaults:
   ``ste_sign`` inputs, XNOR kernels, first conv and classifier full precision);
2. batch-norm statistics calibrated on ``--calib`` CIFAR-10 training images (cumulative
   averages, no gradient step), so the activations the binary layers see are realistic;
3. pruned at ``--pfr`` of its filters: uniform allocation (:func:`allocation.allocate`, optionally
   ``--round-to``), the lowest latent-weight L1 filters of each group removed
   (:func:`remove_filters`), then the batch norms calibrated again;
4. exported with :func:`export_lce` and with :func:`export_packed`; LCE's interpreter runs the
   ``.tflite`` on the first ``--n-test`` CIFAR-10 test images, PyTorch (eval mode) runs the
   pruned network on the same tensors, and the logits are compared.

Sizes: the ``.tflite`` file against the packed export's payload (the compression report's stored
bits: binary kernels at 1 bit, every float tensor at 32 bits) and against the same bits with each
kernel row padded to LCE's 32-channel words.

Example (a few minutes on 2 shared cores; the LCE interpreter needs numpy<2, see lce_predict)::

    BNNPRUNE_LCE_PYTHON=/path/to/venv-with-numpy1/bin/python \\
        python benchmarks/lce_export.py --data-dir ../shared/data/cifar10 --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lightning_bnnprune  # noqa: E402,F401  (registers the CIFAR models)
from lightning_bnnprune import (  # noqa: E402
    BinaryConv2d, binarize_model, export_lce, export_packed, find_channel_groups, lce_predict,
    remove_filters,
)
from lightning_bnnprune.stats import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from lightning_bnnprune.pruning import criteria  # noqa: E402
from lightning_bnnprune.pruning.allocation import allocate  # noqa: E402
from lightning_bnnprune.pruning.report import storage_plan  # noqa: E402
from lightning_bnnprune.pruning.criteria import scores_for  # noqa: E402
from lightning_bnnprune.pruning.lce_runtime import KERNELS  # noqa: E402

NETWORKS = {"resnet20_cifar": 32, "resnet18_cifar": 32, "vgg11_cifar": 32, "resnet18": 64}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "cifar10"),
                   help="folder with train.npz / test.npz (never downloaded)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--name", default="lce_export", help="output file stem")
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--pfr", type=float, default=0.4)
    p.add_argument("--round-to", type=int, nargs="+", default=[1, 8, 32],
                   help="budget rounding; the interpreter check runs on the first, sizes on all")
    p.add_argument("--n-test", type=int, default=2000, help="test images run by both")
    p.add_argument("--calib", type=int, default=512, help="training images for batch-norm statistics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kernels", default="indirect_bgemm", choices=list(KERNELS),
                   help="LCE's kernel path that runs the files (lce_predict)")
    return p.parse_args(argv)


def images(path: str, n: int, size: int) -> torch.Tensor:
    x = torch.from_numpy(np.load(path)["x"][:n]).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) if size != 32 else x


@torch.no_grad()
def calibrate(net: nn.Module, x: torch.Tensor, batch: int = 128) -> None:
    """Batch-norm running statistics as the plain average over ``x`` (momentum ``None``)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    for i in range(0, len(x), batch):
        net(x[i:i + batch])
    net.eval()


def lce_padded_bytes(net: nn.Module) -> int:
    """The packed payload with every binary kernel row padded to 32-bit words, floats at 4 bytes."""
    layers = {n: m for n, m in net.named_modules() if isinstance(m, BinaryConv2d)}
    state = net.state_dict()
    total = 0
    for t in storage_plan(net):
        if t.kind == "binary":
            m = layers[t.layer]
            total += m.out_channels * m.kernel_size[0] * m.kernel_size[1] * -(-m.in_channels // 32) * 4
        elif t.key in state:
            total += state[t.key].numel() * 4
        else:
            total += layers[t.key[:-len(".scale")]].out_channels * 4
    return total


def run_network(args: argparse.Namespace, name: str, size: int, work: str) -> Dict[str, Any]:
    torch.manual_seed(args.seed)
    base = timm.create_model(name, num_classes=10)
    binarize_model(base)
    calib = images(os.path.join(args.data_dir, "train.npz"), args.calib, size)
    test = images(os.path.join(args.data_dir, "test.npz"), args.n_test, size)
    calibrate(base, calib)
    row: Dict[str, Any] = {"network": name, "input": [3, size, size], "sizes": {}}
    for k, round_to in enumerate(args.round_to):
        net = timm.create_model(name, num_classes=10)
        binarize_model(net)
        net.load_state_dict(base.state_dict())
        net.eval()
        analysis = find_channel_groups(net, calib[:1])
        sizes = {g.name: g.size for g in analysis.groups}
        try:
            counts = allocate(sizes, args.pfr, "uniform", 1, round_to=round_to)
        except ValueError as err:
            row["sizes"][str(round_to)] = {"error": str(err)}
            continue
        l1 = criteria.get("l1")
        masks = {}
        for g in analysis.groups:
            keep = torch.ones(g.size, dtype=torch.bool)
            keep[torch.argsort(scores_for(l1, net, g), stable=True)[: counts[g.name]]] = False
            masks[g.name] = keep
        record = remove_filters(net, analysis, masks=masks, example_inputs=calib[:4])
        calibrate(net, calib)
        tfl, packed = os.path.join(work, f"{name}-{round_to}.tflite"), os.path.join(work, f"{name}-{round_to}.bnnpack")
        start = time.perf_counter()
        info = export_lce(net, tfl, input_size=(3, size, size))
        export_s = time.perf_counter() - start
        packed_info = export_packed(net, packed, record)
        padded = lce_padded_bytes(net)
        kept = {g: sizes[g] - counts[g] for g in sizes}
        row["sizes"][str(round_to)] = {
            "pfr": sum(counts.values()) / sum(sizes.values()),
            "kept": kept,
            "tflite_bytes": info["file_bytes"],
            "packed_payload_bytes": packed_info["payload_bytes"],
            "packed_file_bytes": packed_info["file_bytes"],
            "lce_word_padded_bytes": padded,
            "tflite_over_packed": info["file_bytes"] / packed_info["payload_bytes"],
            "tflite_over_word_padded": info["file_bytes"] / padded,
            "export_s": round(export_s, 2),
        }
        if k == 0:
            with torch.no_grad():
                ref = torch.cat([net(test[i:i + 250]) for i in range(0, len(test), 250)]).numpy()
            start = time.perf_counter()
            got = lce_predict(tfl, test, kernels=args.kernels)
            row.update({
                "round_to": round_to,
                "n_test": len(test),
                "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                "max_abs_logit_diff": float(np.abs(got - ref).max()),
                "logit_scale": float(np.abs(ref).max()),
                "lce_seconds": round(time.perf_counter() - start, 1),
                "operators": info["operators"],
                "binary_layers": info["binary_layers"],
            })
    return row


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def to_markdown(rows: List[Dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# Larq Compute Engine export: LCE's interpreter against PyTorch",
        "",
        f"Command: `{command}`",
        "",
        f"Commit: {_commit()}",
        "",
        f"Machine: {platform.machine()}, {platform.python_version()}, torch {torch.__version__}, "
        f"larq-compute-engine 0.16.0, kernel path `{args.kernels}`; 2 shared cores.",
        "",
        f"Networks: random init (seed {args.seed}), binarised (XNOR, ste_sign), batch norms calibrated "
        f"on {args.calib} CIFAR-10 training images, pruned at PFR {args.pfr} (uniform allocation, "
        "lowest latent-weight L1 removed), batch norms calibrated again. Logits of the first "
        f"{args.n_test} CIFAR-10 test images (resnet18: upsampled to 64x64).",
        "",
        "| network | input | top-1 agreement | max abs logit diff (logit scale) | LCE ops | binary convs | LCE s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "top1_agreement" not in r:
            continue
        lines.append(
            f"| {r['network']} | {r['input'][1]}x{r['input'][2]} | {100 * r['top1_agreement']:.2f} % "
            f"({r['n_test']} images) | {r['max_abs_logit_diff']:.2e} ({r['logit_scale']:.2f}) | "
            f"{r['operators']} | {r['binary_layers']} | {r['lce_seconds']} |")
    lines += [
        "",
        "Sizes: `.tflite` file against the packed export's payload (binary kernels at 1 bit, float "
        "tensors at 32 bits: the compression report's stored bits) and against the same with each "
        "binary kernel row padded to LCE's 32-channel words.",
        "",
        "| network | round_to | PFR | .tflite bytes | packed payload bytes | ratio | word-padded bytes | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for rt, s in r["sizes"].items():
            if "error" in s:
                lines.append(f"| {r['network']} | {rt} | - | refused: {s['error']} | | | | |")
                continue
            lines.append(
                f"| {r['network']} | {rt} | {100 * s['pfr']:.1f} % | {s['tflite_bytes']:,} | "
                f"{s['packed_payload_bytes']:,} | {s['tflite_over_packed']:.3f} | "
                f"{s['lce_word_padded_bytes']:,} | {s['tflite_over_word_padded']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/lce_export.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.networks:
            start = time.perf_counter()
            rows.append(run_network(args, name, NETWORKS[name], work))
            rows[-1]["wall_s"] = round(time.perf_counter() - start, 1)
            print(json.dumps(rows[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump({"command": command, "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(to_markdown(rows, args, command))


if __name__ == "__main__":
    main()
