"""LCE's binary convolutions timed on this machine, per layer geometry, and a network estimate from them.

A :class:`LatencyTable` holds, for each binary-conv geometry (kernel, stride, padding, dilation,
input map), the measured time of one ``LceBconv2d`` (with its input's bit-packing and its batch
norm, as ``export_lce`` writes them) at a few ``(C_in, C_out)`` points. Between the points it
follows the engine's cost model, fitted by least squares to that geometry's points:

    ``t(C_in, C_out) = a + b * ceil(C_in / 32) * ceil(C_out / B) + c * C_in + d * C_out``

LCE packs input channels 32 to a 32-bit word and computes output channels in blocks of ``B``
(``larq_compute_engine/core/indirect_bgemm``: the portable x86 kernel is 4 output channels x 2
pixels per word, ``kernel_4x2_portable.h``; ARM64's are 8 x 4, ``kernel_8x4x*_aarch64.h``); the
linear terms are the packing of the input and the output transform. Measured on this machine
(``benchmarks/lce_latency.py --step-points``): a 64-channel 3x3 conv on a 16x16 map takes the same
time for 16 to 32 input channels and for 40 to 64 (one word, two words), and its time grows with
the output channels in steps of 4.

The network estimate (:func:`network_ms`) is the sum over the binary convs at the kept counts plus
the float layers: their time (``float_ms``: the stem, the classifier, and the batch norms, adds,
activations and bit-packing between the binary convs) is *measured* as the unpruned file's time
minus its binary convs timed alone in the same process, and again on the network with every group
cut to about half; between those two points it is a line in the binary convs' output elements
kept (``C_out x pixels``), its slope clamped between "fixed" and "proportional" (most of it is
elementwise work on those outputs; on resnet18_cifar it measured 0.2 to 6 ms of 6 to 12 ms on the
shared machine: the load's noise, which the clamp keeps out of the estimate). Without the groups,
proportional. :func:`check_estimate` compares the estimate with an exported file's measured time.

Tables are measured once (:func:`measure_table`, a few seconds) and cached as JSON under
``~/.cache/lightning_bnnprune/lce_latency/`` (``$BNNPRUNE_CACHE_DIR`` or ``cache_dir=``), keyed by
LCE's version, the kernel path, the threads and the geometry; tests build a table from numbers
(``LatencyTable(points)``) and time nothing.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..introspect import forward_with_hooks
from .groups import GroupAnalysis
from .slicing import IN, OUT

__all__ = ["BinaryConvSite", "LatencyTable", "WORD", "binary_conv_sites", "check_estimate", "measure_table",
           "measured_speedup", "network_ms"]

WORD = 32  # LCE's bit-packing word: input channels per TBitpacked (core/types.h)
OUTPUT_BLOCK = 4  # output channels per block of the x86 indirect BGEMM kernel (kernel_4x2_portable.h)

Point = Tuple[int, int]  # (C_in, C_out)


def _features(cin: int, cout: int) -> List[float]:
    return [1.0, math.ceil(cin / WORD) * math.ceil(cout / OUTPUT_BLOCK), float(cin), float(cout)]


class LatencyTable:
    """Measured milliseconds of binary convs: ``{geometry key: {(C_in, C_out): ms}}``, plus the
    float layers' ``float_ms``; :meth:`conv_ms` gives any count through the fitted cost model."""

    def __init__(self, points: Mapping[str, Mapping[Point, float]], float_ms: float = 0.0,
                 meta: Optional[Dict[str, Any]] = None,
                 float_half: Optional[Tuple[float, float]] = None) -> None:
        self.points = {g: {(int(i), int(o)): float(ms) for (i, o), ms in p.items()} for g, p in points.items()}
        self.float_ms = float(float_ms)
        # a second measured point of the float part: (output elements kept / all, ms), else None
        self.float_half = None if float_half is None else (float(float_half[0]), float(float_half[1]))
        self.meta = dict(meta or {})
        self._fits: Dict[str, np.ndarray] = {}

    def _fit(self, geometry: str) -> np.ndarray:
        if geometry not in self._fits:
            if geometry not in self.points or not self.points[geometry]:
                raise KeyError(f"the latency table has no binary conv of geometry {geometry!r}; "
                               f"it has {sorted(self.points)}")
            pts = self.points[geometry]
            x = np.array([_features(i, o) for i, o in pts])
            y = np.array(list(pts.values()))
            if len(pts) < x.shape[1]:  # too few points for four terms: time proportional to the work
                coef = np.array([0.0, float(y.sum() / x[:, 1].sum()), 0.0, 0.0])
            else:
                coef = np.linalg.lstsq(x, y, rcond=None)[0]
                if (coef[1:] < 0).any():  # a negative slope is noise: refit time ~ work
                    coef = np.array([0.0, float(y.sum() / x[:, 1].sum()), 0.0, 0.0])
            self._fits[geometry] = coef
        return self._fits[geometry]

    def float_part(self, kept_share: float) -> float:
        """The float layers' time when the binary convs keep ``kept_share`` of their output
        elements: on the line through the two measured points (the whole network, a pruned one),
        its slope clamped between fixed and proportional (what elementwise work on the outputs
        plus a fixed part can do; a steeper or rising line is the load's noise); with one point,
        proportional to the share."""
        if self.float_half is None or not 0 < self.float_half[0] < 1:
            return self.float_ms * kept_share
        r, ms = self.float_half
        slope = min(self.float_ms, max(0.0, (self.float_ms - ms) / (1.0 - r)))
        return max(0.0, self.float_ms + slope * (kept_share - 1.0))

    def conv_ms(self, geometry: str, cin: int, cout: int) -> float:
        """One binary conv of ``geometry`` at ``cin`` inputs and ``cout`` outputs: the measured time
        when the table has the point, else the fitted model's."""
        hit = self.points.get(geometry, {}).get((cin, cout))
        if hit is not None:
            return hit
        return float(max(0.0, np.dot(self._fit(geometry), _features(cin, cout))))

    def to_dict(self) -> Dict[str, Any]:
        return {"float_ms": self.float_ms, "float_half": self.float_half, "meta": self.meta,
                "points": {g: [[i, o, ms] for (i, o), ms in sorted(p.items())] for g, p in self.points.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatencyTable":
        return cls({g: {(i, o): ms for i, o, ms in p} for g, p in data["points"].items()}, data.get("float_ms", 0.0),
                   data.get("meta"), data.get("float_half"))


@dataclass(frozen=True)
class BinaryConvSite:
    """One binary conv of a network: its geometry, full counts, and the groups that set them."""

    name: str
    geometry: str
    in_channels: int
    out_channels: int
    in_group: Optional[str]  # the group whose kept count is this conv's C_in (None: not pruned)
    out_group: Optional[str]  # the group whose kept count is its C_out
    out_pixels: int = 1  # H x W of its output

    def counts(self, kept: Mapping[str, int]) -> Point:
        cin = kept.get(self.in_group, self.in_channels) if self.in_group else self.in_channels
        cout = kept.get(self.out_group, self.out_channels) if self.out_group else self.out_channels
        return cin, cout


def _geometry(conv: nn.Conv2d, hw: Sequence[int]) -> str:
    pad = "same" if getattr(conv, "same_padding", False) else "x".join(map(str, conv.padding))
    return (f"k{conv.kernel_size[0]}x{conv.kernel_size[1]}-s{conv.stride[0]}x{conv.stride[1]}-p{pad}"
            f"-d{conv.dilation[0]}x{conv.dilation[1]}-in{hw[0]}x{hw[1]}")


@torch.no_grad()
def binary_conv_sites(net: nn.Module, analysis: GroupAnalysis, example_inputs: torch.Tensor) -> List[BinaryConvSite]:
    """The ungrouped binary convs of ``net`` (what :class:`LatencyTable` times), in module order,
    with the input map each sees on ``example_inputs`` and the channel groups they belong to."""
    from ..layers import BinaryConv2d  # the layer below pruning/, imported where it is needed

    convs = {n: m for n, m in net.named_modules() if isinstance(m, BinaryConv2d) and m.groups == 1}
    seen: Dict[str, Sequence[int]] = {}
    pixels: Dict[str, int] = {}

    def hook(name, args, out):
        seen[name], pixels[name] = args[0].shape[-2:], out[0, 0].numel()

    forward_with_hooks(net, convs, hook, example_inputs)
    role = {(m.module, m.role): g.name for g in analysis.groups for m in g.members}
    return [BinaryConvSite(n, _geometry(m, seen[n]), m.in_channels, m.out_channels, role.get((n, IN)),
                           role.get((n, OUT)), pixels[n]) for n, m in convs.items() if n in seen]


def network_ms(table: LatencyTable, sites: Sequence[BinaryConvSite], kept: Mapping[str, int]) -> float:
    """The network's estimated time at ``kept`` (``{group: kept channels}``; groups not named are
    whole): its binary convs from the table plus ``float_ms`` scaled by the binary convs' output
    elements kept (see the module docstring)."""
    return table.float_part(output_share(sites, kept)) + sum(table.conv_ms(s.geometry, *s.counts(kept))
                                                             for s in sites)


def output_share(sites: Sequence[BinaryConvSite], kept: Mapping[str, int]) -> float:
    """The binary convs' output elements (``C_out x pixels``) kept, as a share of all."""
    whole = sum(s.out_channels * s.out_pixels for s in sites)
    return sum(s.counts(kept)[1] * s.out_pixels for s in sites) / whole if whole else 1.0


# ------------------------------------------------------------------ measurement
def _candidates(n: int) -> List[int]:
    """Counts to time for a layer of ``n`` channels: the narrowest word (or ``n``), the middle one, ``n``."""
    low = min(n, WORD)
    mid = max(low, WORD * round(n / 2 / WORD))
    return sorted({low, mid, n})


def _half(n: int) -> int:
    """About half of ``n`` channels: whole words from 64 on, else multiples of 4."""
    return WORD * max(1, round(n / 2 / WORD)) if n >= 2 * WORD else max(1, 4 * round(n / 8))


def _cache_file(cache_dir: Optional[str], key: Dict[str, Any]) -> str:
    root = cache_dir or os.path.join(os.environ.get("BNNPRUNE_CACHE_DIR")
                                     or os.path.join(os.path.expanduser("~"), ".cache", "lightning_bnnprune"),
                                     "lce_latency")
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(root, f"{key['geometry']}-{digest}.json")


def _lce_version(python: Optional[str]) -> str:
    """larq-compute-engine's version in the Python that runs it (part of the cache key)."""
    import subprocess
    import sys

    from .lce_runtime import lce_python

    ask = "from importlib import metadata; print(metadata.version('larq-compute-engine'))"
    done = subprocess.run([lce_python(python) or sys.executable, "-I", "-c", ask], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def _conv_file(path: str, geometry_of: nn.Conv2d, cin: int, cout: int, hw: Sequence[int]) -> None:
    from ..layers import BinaryConv2d
    from .export_lce import export_lce

    c = geometry_of
    conv = BinaryConv2d(cin, cout, c.kernel_size, c.stride, c.padding, c.dilation, bias=False,
                        same_padding=getattr(c, "same_padding", False))
    export_lce(nn.Sequential(conv, nn.BatchNorm2d(cout)).eval(), path, input_size=(cin, *hw))


def measure_table(net: nn.Module, sites: Sequence[BinaryConvSite], example_inputs: torch.Tensor, *,
                  threads: int = 1, kernels: str = "indirect_bgemm", python: Optional[str] = None,
                  cache_dir: Optional[str] = None, rounds: int = 7, calls: int = 5,
                  network_file: Optional[str] = None, analysis: Optional[GroupAnalysis] = None) -> LatencyTable:
    """Time ``net``'s binary-conv geometries at their candidate counts in LCE (cached per geometry),
    and its float layers: the unpruned ``net`` exported whole (``network_file``, default a
    temporary file) minus its binary convs at full counts, timed in the *same* round-robin process
    (so a load that differs from the cached points' does not leak into the float part); the float
    part is cached per network too, and a second call times nothing. With ``analysis`` (``net``'s
    channel groups) a second network is timed too, every group cut to its middle candidate count,
    for a second point of the float part (:meth:`LatencyTable.float_part`)."""
    from .export_lce import export_lce
    from .lce_runtime import lce_latency

    modules = dict(net.named_modules())
    version = _lce_version(python)
    points: Dict[str, Dict[Point, float]] = {}
    todo: Dict[str, Tuple[nn.Conv2d, Sequence[int], List[Point], str]] = {}
    for s in sites:
        hw = [int(v) for v in s.geometry.split("-in")[1].split("x")]
        wanted = [(i, o) for i in _candidates(s.in_channels) for o in _candidates(s.out_channels)]
        key = {"lce": version, "kernels": kernels, "threads": threads, "geometry": s.geometry}
        path = _cache_file(cache_dir, key)
        cached = {}
        if os.path.isfile(path):
            with open(path) as f:
                cached = {(i, o): ms for i, o, ms in json.load(f)["points"]}
        points.setdefault(s.geometry, {}).update(cached)
        entry = todo.setdefault(s.geometry, (modules[s.name], hw, [], path))
        entry[2].extend(p for p in wanted if p not in points[s.geometry] and p not in entry[2])
    network_key = {"lce": version, "kernels": kernels, "threads": threads, "geometry": "network",
                   "sites": [[s.geometry, s.in_channels, s.out_channels, s.out_pixels] for s in sites]}
    float_path = _cache_file(cache_dir, network_key)
    float_ms, float_half = None, None
    if os.path.isfile(float_path):
        with open(float_path) as f:
            saved = json.load(f)
        float_ms, float_half = saved["float_ms"], saved.get("float_half")
    half = {g.name: _half(g.size) for g in analysis.groups} if analysis is not None else None
    full = sorted({(s.geometry, s.in_channels, s.out_channels) for s in sites})
    with tempfile.TemporaryDirectory() as tmp:
        files: List[Tuple[str, Point]] = []
        timing = [(g, p) for g, (_, _, wanted, _) in todo.items() for p in wanted]
        if float_ms is None:  # the full counts again, beside the network, in one process
            timing += [(g, (i, o)) for g, i, o in full if (g, (i, o)) not in timing]
            if half is not None:
                timing += [(g, p) for g, p in sorted({(s.geometry, s.counts(half)) for s in sites})
                           if (g, p) not in timing]
        for geometry, (i, o) in timing:
            conv, hw = todo[geometry][0], todo[geometry][1]
            path = os.path.join(tmp, f"{len(files)}.tflite")
            _conv_file(path, conv, i, o, hw)
            files.append((geometry, (i, o)))
        paths = [os.path.join(tmp, f"{k}.tflite") for k in range(len(files))]
        if float_ms is None:
            whole = network_file or os.path.join(tmp, "network.tflite")
            if not os.path.isfile(whole):
                export_lce(net, whole, input_size=tuple(example_inputs.shape[1:]))
            paths.append(whole)
            if half is not None:
                paths.append(_cut_network(net, analysis, half, example_inputs, os.path.join(tmp, "half.tflite")))
        timed = lce_latency(paths, threads=threads, kernels=kernels, rounds=rounds, calls=calls,
                            python=python) if paths else []
    now = {(g, p): t["min_ms"] for (g, p), t in zip(files, timed)}
    for (geometry, point), ms in now.items():
        points[geometry].setdefault(point, ms)  # a cached point stays what it was
    for geometry, (_, _, wanted, path) in todo.items():
        if wanted:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump({"geometry": geometry, "lce": version, "kernels": kernels, "threads": threads,
                           "points": [[i, o, ms] for (i, o), ms in sorted(points[geometry].items())]}, f)
    meta = {"lce": version, "kernels": kernels, "threads": threads}
    if float_ms is None:
        network_ms_now = timed[len(files)]["min_ms"]
        binary_now = sum(now[(s.geometry, (s.in_channels, s.out_channels))] for s in sites)
        float_ms = max(0.0, network_ms_now - binary_now)
        meta["network_ms"] = network_ms_now
        if half is not None:
            half_ms = timed[len(files) + 1]["min_ms"]
            float_half = (output_share(sites, half),
                          max(0.0, half_ms - sum(now[(s.geometry, s.counts(half))] for s in sites)))
            meta["half_network_ms"] = half_ms
        os.makedirs(os.path.dirname(float_path), exist_ok=True)
        with open(float_path, "w") as f:
            json.dump({**network_key, "float_ms": float_ms, "float_half": float_half,
                       "network_ms": network_ms_now}, f)
    return LatencyTable(points, float_ms=float_ms, meta=meta, float_half=float_half)


def _cut_network(net: nn.Module, analysis: GroupAnalysis, kept: Mapping[str, int], example_inputs: torch.Tensor,
                  path: str) -> str:
    """``net`` with every group named in ``kept`` cut to that many channels (its first ones; an
    op's time does not depend on which), exported to ``path``."""
    import copy

    from .export_lce import export_lce
    from .surgery import remove_filters

    cut = copy.deepcopy(net).eval()
    masks = {g.name: torch.arange(g.size) < kept[g.name] for g in analysis.groups if g.name in kept}
    remove_filters(cut, analysis, masks=masks, example_inputs=example_inputs)
    export_lce(cut, path, input_size=tuple(example_inputs.shape[1:]))
    return path


def measured_speedup(net: nn.Module, analysis: GroupAnalysis, kept: Mapping[str, int], example_inputs: torch.Tensor,
                     *, whole_file: Optional[str] = None, threads: int = 1, kernels: str = "indirect_bgemm",
                     python: Optional[str] = None, rounds: int = 15) -> float:
    """The LCE speedup of ``net`` cut to ``kept`` (``{group: kept channels}``) against ``net``
    whole, both exported and timed round-robin in one process (minimum over minimum): what
    ``target_speedup`` is checked against (:meth:`FilterPruning.latency_counts`). ``whole_file``:
    where ``net`` whole is exported, or read when it exists (several plans checked against one
    export); default a temporary file."""
    from .export_lce import export_lce
    from .lce_runtime import lce_latency

    with tempfile.TemporaryDirectory() as tmp:
        whole = whole_file or os.path.join(tmp, "whole.tflite")
        if not os.path.isfile(whole):
            export_lce(net, whole, input_size=tuple(example_inputs.shape[1:]))
        cut = _cut_network(net, analysis, kept, example_inputs, os.path.join(tmp, "cut.tflite"))
        pruned, unpruned = lce_latency([cut, whole], threads=threads, kernels=kernels, python=python, rounds=rounds)
    return unpruned["min_ms"] / pruned["min_ms"]


def check_estimate(table: LatencyTable, sites: Sequence[BinaryConvSite], kept: Mapping[str, int], pruned_file: str,
                   unpruned_file: str, *, threads: int = 1, kernels: str = "indirect_bgemm",
                   python: Optional[str] = None, rounds: int = 15) -> Dict[str, float]:
    """The estimate against the measurement: both files timed round-robin in one process;
    ``{"estimated_ms", "measured_ms", "estimated_speedup", "measured_speedup", "error"}``
    (``error``: measured speedup / estimated - 1)."""
    from .lce_runtime import lce_latency

    pruned, whole = lce_latency([pruned_file, unpruned_file], threads=threads, kernels=kernels, python=python,
                                rounds=rounds)
    est, est_whole = network_ms(table, sites, kept), network_ms(table, sites, {})
    measured = whole["min_ms"] / pruned["min_ms"]
    return {"estimated_ms": est, "measured_ms": pruned["min_ms"], "estimated_speedup": est_whole / est,
            "measured_speedup": measured, "error": measured / (est_whole / est) - 1.0}
