"""Training and inference throughput of binary networks on CPU, every mode timed in one run.

Training: one SGD step (forward, cross-entropy, backward, optimizer step) of the same network in
several modes, round-robin (one step of each mode, then the next round), so load changes on a shared
machine hit every mode alike. Modes:

- ``fp``: the full-precision timm network (the reference of every ratio);
- ``binary (before #10)``: ``binarize_model`` with the binary layer as it was before issue #10
  (``torch.where`` sign, STE mask multiply, XNOR scale on the output), rebuilt here for the comparison;
- ``binary``: ``binarize_model`` as it is now (eager);
- ``fp channels_last`` / ``binary channels_last``: the same in ``torch.channels_last`` memory format
  (what ``ImageClassifier(channels_last=True)``, the default, runs);
- ``binary compiled`` / ``fp compiled`` (``--compile``): ``torch.compile`` (inductor); the first step
  (compilation) is timed on its own.

Each step is timed as wall time and as CPU time of the process (all its threads; load from other
processes inflates it less than the wall time); ratios are medians over rounds of (mode step / fp
step of the same round). GFLOP/s counts a training step as 3x the forward multiply-accumulates
x 2 FLOP.

``--msf`` adds MainSubsidiaryPruning's selector and retrain steps against plain binary steps
(``benchmarks/step_time.py``, two real Trainers taking turns). ``--infer-model`` adds inference of
an unpruned against a 40 %-pruned binary network at batch 1 and 64 (``benchmarks/latency.py``).

Example::

    python benchmarks/throughput.py --threads 1 --compile --msf --out benchmarks/results/throughput.md
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
from typing import Dict, List, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmarks

from lightning_bnnprune import BinaryConv2d, binarize_model  # noqa: E402
from _report import git_commit, write_markdown  # noqa: E402


class _SignBefore(torch.autograd.Function):
    """The activation/weight sign and clipped STE as they were before issue #10."""

    @staticmethod
    def forward(ctx, x: Tensor, clip: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.clip = clip
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


class BinaryConv2dBefore(BinaryConv2d):
    """``BinaryConv2d.forward`` before issue #10 (XNOR weights, ``ste_sign`` inputs, no mask)."""

    def forward(self, x: Tensor) -> Tensor:
        x = _SignBefore.apply(x, 1.0)
        w = self.weight
        alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True).flatten()
        y = self._conv_forward(x, _SignBefore.apply(w, 1.0), None) * alpha.view(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def forward_macs(net: nn.Module, x: Tensor) -> int:
    """Multiply-accumulates of the convolutions and linear layers in one forward of ``x``."""
    total = [0]

    def hook(module, inputs, out):
        if isinstance(module, nn.Conv2d):
            total[0] += out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            total[0] += out.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = net.training
    with torch.no_grad():
        net.eval()(x)
    net.train(was_training)
    for h in handles:
        h.remove()
    return total[0]


def build_modes(model: str, compile_: bool, seed: int) -> Dict[str, nn.Module]:
    torch.manual_seed(seed)
    fp = timm.create_model(model, num_classes=10)
    binary = copy.deepcopy(fp)
    binarize_model(binary)
    before = copy.deepcopy(binary)
    for name, m in list(before.named_modules()):
        if isinstance(m, BinaryConv2d):
            old = BinaryConv2dBefore(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                                     padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None)
            old.load_state_dict(m.state_dict(), strict=False)
            before.set_submodule(name, old)
    modes = {"fp": fp, "binary (before #10)": before, "binary": binary,
             "fp channels_last": copy.deepcopy(fp).to(memory_format=torch.channels_last),
             "binary channels_last": copy.deepcopy(binary).to(memory_format=torch.channels_last)}
    if compile_:
        modes["binary compiled"] = torch.compile(copy.deepcopy(binary))
        modes["fp compiled"] = torch.compile(copy.deepcopy(fp))
    return modes


def time_training(modes: Dict[str, nn.Module], batch: int, size: int, warmup: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    inputs = {k: x.contiguous(memory_format=torch.channels_last) if "channels_last" in k else x for k in modes}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in modes.items()}

    def step(k: str) -> Tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        opts[k].zero_grad(set_to_none=True)
        F.cross_entropy(modes[k](inputs[k]), y).backward()
        opts[k].step()
        return time.perf_counter() - wall, time.process_time() - cpu

    first = {k: step(k)[0] for k in modes}  # includes the compilation of the compiled modes
    for _ in range(warmup - 1):
        for k in modes:
            step(k)
    times: Dict[str, List[Tuple[float, float]]] = {k: [] for k in modes}
    for _ in range(steps):
        for k in modes:
            times[k].append(step(k))
    return first, times


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20_cifar")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="input height = width")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one step of every mode each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (the first compiles)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--compile", action="store_true", help="add torch.compile modes (minutes of compilation)")
    parser.add_argument("--msf", action="store_true", help="add MSF's selector/retrain steps (benchmarks/step_time.py)")
    parser.add_argument("--infer-model", default=None, help="add pruned vs unpruned inference of this model")
    parser.add_argument("--infer-repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="markdown file for the results")
    parser.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load = os.getloadavg()[0]

    modes = build_modes(args.model, args.compile, args.seed)
    probe = torch.randn(1, 3, args.size, args.size)
    gflop = 3 * 2 * forward_macs(modes["fp"], probe) * args.batch_size / 1e9
    first, times = time_training(modes, args.batch_size, args.size, args.warmup, args.steps, args.seed)
    med = statistics.median
    fp = times["fp"]
    before = times["binary (before #10)"]
    lines = [
        f"### Training step: {args.model}, batch {args.batch_size} at {args.size}x{args.size}, "
        f"{args.threads} thread(s), {gflop:.2f} GFLOP per step",
        "",
        "| mode | wall (ms) | CPU (ms) | images/s (CPU) | GFLOP/s (CPU) | CPU ratio to fp | wall ratio to fp "
        "| speedup over binary before #10 (CPU) | first step (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, t in times.items():
        cpu = med(c for _, c in t)
        lines.append(
            f"| {k} | {med(w for w, _ in t) * 1e3:.0f} | {cpu * 1e3:.0f} | {args.batch_size / cpu:.0f} | "
            f"{gflop / cpu:.1f} | {med(a[1] / b[1] for a, b in zip(t, fp)):.2f}x | "
            f"{med(a[0] / b[0] for a, b in zip(t, fp)):.2f}x | {med(b[1] / a[1] for a, b in zip(t, before)):.2f}x | "
            f"{first[k]:.1f} |"
        )
    print("\n".join(lines), flush=True)
    sections = ["\n".join(lines)]
    del modes

    if args.msf:
        import step_time

        msf_out = os.path.join(os.path.dirname(os.path.abspath(args.out or "x")), ".step_time.md")
        step_time.main(["--model", args.model, "--batch-size", str(args.batch_size), "--size", str(args.size),
                        "--threads", str(args.threads), "--steps", "4", "--warmup", "1", "--out", msf_out])
        with open(msf_out) as f:
            body = f.read().split("\n")
        os.remove(msf_out)
        table = [line for line in body if line.startswith("|")]
        sections.append("\n".join([
            f"### MSF phases against plain binary steps: {args.model}, batch {args.batch_size}, {args.threads} thread(s)",
            "",
            "Two real Trainers (`Binarize` and `Binarize` + `MainSubsidiaryPruning`) taking turns step by step "
            "(`benchmarks/step_time.py --steps 4 --warmup 1`); the ratio is to the plain binary step.",
            "",
            *table,
        ]))

    if args.infer_model:
        import latency

        baseline, pruned, record = latency.build(args.infer_model, 0.4, args.size, args.seed)
        from lightning_bnnprune.pruning.report import compression_report

        mac_ratio = compression_report(pruned, record).summary["mac_ratio"]
        rows = [
            f"### Inference: {args.infer_model} binary, unpruned vs 40 % of every group removed, "
            f"{args.threads} thread(s), MAC ratio {mac_ratio:.2f}x",
            "",
            f"torch.inference_mode, eval mode (cached binary kernels), 3 warm-up calls, median of "
            f"{args.infer_repeats}, the two models alternating. Speedup = unpruned / pruned.",
            "",
            "| batch | wall unpruned (ms) | wall pruned (ms) | wall speedup | CPU speedup | CPU speedup (min) "
            "| best speedup / MAC ratio |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for batch in (1, 64):
            t = latency.measure({"u": baseline, "p": pruned}, batch, args.size, 3, args.infer_repeats)
            u, p = t["u"], t["p"]
            speed = (u["wall"] / p["wall"], u["cpu"] / p["cpu"], u["cpu_min"] / p["cpu_min"])
            rows.append(f"| {batch} | {u['wall'] * 1e3:.1f} | {p['wall'] * 1e3:.1f} | {speed[0]:.2f}x | "
                        f"{speed[1]:.2f}x | {speed[2]:.2f}x | {max(speed) / mac_ratio:.2f} |")
            print(rows[-1], flush=True)
        sections.append("\n".join(rows))

    command = "python benchmarks/throughput.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    header = "\n".join([
        f"## Throughput, {args.threads} thread(s)",
        "",
        f"- command: `{command}`",
        f"- git commit: {git_commit()}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load average at start {load:.1f}, at end {os.getloadavg()[0]:.1f} (other processes share the machine: "
        "compare modes only within this run, by the CPU-time ratios)",
        f"- torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}",
        f"- training: {args.warmup} untimed rounds, then {args.steps} timed rounds of one SGD step per mode; "
        "medians; ratios are medians of per-round ratios",
        f"- wall time of the benchmark: {time.perf_counter() - started:.0f} s",
    ])
    text = header + "\n\n" + "\n\n".join(sections) + "\n"
    write_markdown(text, args.out, args.append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
