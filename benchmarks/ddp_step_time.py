"""DDP training-step time with channels_last inputs: contiguous weights (before) against
channels_last weights (after, what ``ImageClassifier`` does under DDP since issue 23), in one run.

``--world-size`` CPU processes (gloo) each hold three ``DistributedDataParallel`` copies of the
same binarised network (``binarize_model``, ApproxSign inputs as the app's ``bireal``) and take
one SGD step of each in turn, round after round, so load changes on a shared machine hit every
mode alike:

- ``contiguous inputs``: inputs and weights contiguous (``ImageClassifier(channels_last=False)``);
- ``channels_last, contiguous weights`` (before): channels_last inputs, weights as built; DDP's
  buckets follow the weights' strides and every conv weight gradient (channels_last) is copied
  into them ("Grad strides do not match bucket view strides");
- ``channels_last, channels_last weights`` (after): the 4-D weights made channels_last before DDP
  wraps them, so gradients and buckets share one layout.

A step (forward, cross-entropy, backward with DDP's all-reduce, optimizer step) is timed on every
rank between two barriers; the first ``--warmup`` rounds are dropped. The table gives per mode the
median wall time per step (the slowest rank's) and the median ratio to the ``before`` step of the
same round.

Example::

    OMP_NUM_THREADS=1 python benchmarks/ddp_step_time.py --world-size 2 --threads 1 \\
        --model resnet20_cifar --batch-size 64 --rounds 40 --warmup 5
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import socket
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import lightning_bnnprune  # noqa: F401  (registers the *_cifar networks in timm)
from lightning_bnnprune import binarize_model

BEFORE = "channels_last, contiguous weights (before)"
MODES = ("contiguous inputs", BEFORE, "channels_last, channels_last weights (after)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, args: argparse.Namespace, port: int, out: Dict[str, List[float]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    warnings.filterwarnings("ignore", message="Grad strides do not match")  # the "before" mode's, expected
    torch.manual_seed(0)
    net = timm.create_model(args.model, num_classes=10)
    binarize_model(net, input_quantizer="approx_sign")
    models, optimizers = {}, {}
    for mode in MODES:
        copy_ = copy.deepcopy(net)
        if mode != BEFORE and mode != MODES[0]:
            copy_.to(memory_format=torch.channels_last)
        models[mode] = DistributedDataParallel(copy_)
        optimizers[mode] = torch.optim.SGD(copy_.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    times: Dict[str, List[float]] = {mode: [] for mode in MODES}
    for round_ in range(args.warmup + args.rounds):
        for mode in MODES:
            inputs = x if mode == MODES[0] else x.contiguous(memory_format=torch.channels_last)
            dist.barrier()
            start = time.perf_counter()
            loss = F.cross_entropy(models[mode](inputs), y)
            optimizers[mode].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[mode].step()
            dist.barrier()
            if round_ >= args.warmup:
                times[mode].append(time.perf_counter() - start)
    slowest = [None] * args.world_size
    dist.all_gather_object(slowest, times)
    if rank == 0:
        for mode in MODES:
            out[mode] = [max(rank_times[mode][i] for rank_times in slowest) for i in range(args.rounds)]
    dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> Dict[str, List[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--model", default="resnet20_cifar")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(args, _free_port(), out), nprocs=args.world_size, join=True)
        times = dict(out)
    before = times[BEFORE]
    print(f"DDP step, {args.world_size} gloo CPU processes x {args.threads} thread(s), binary {args.model}, "
          f"batch {args.batch_size} per process, {args.rounds} rounds ({platform.processor() or platform.machine()}, "
          f"torch {torch.__version__})")
    print("| mode | median step (ms) | median ratio to before |\n| --- | --- | --- |")
    for mode in MODES:
        ratio = statistics.median(t / b for t, b in zip(times[mode], before))
        print(f"| {mode} | {1e3 * statistics.median(times[mode]):.1f} | {ratio:.3f} |")
    return times


if __name__ == "__main__":
    main(sys.argv[1:])
