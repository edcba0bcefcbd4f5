"""The compression report of a removal: filters, parameters, MACs and stored bits, per layer and in total.

Figures (``docs/method.md``, section 6):

- **PFR** = pruned group channels / prunable group channels.
- **MAC ratio** = MACs of the original / MACs of the pruned network (a reduction factor, like
  the measured speedup it is compared with), counted by forward hooks on every conv and linear
  layer at the input size the removal was checked at: ``MACs = output positions x weight.numel()``.
- **Stored bits** of the pruned network, as :func:`~.export.export_packed` writes it: the kernel
  quantizer's ``precision`` (1) bits per binary weight; 32 bits per full-precision value: the
  per-filter scales of the exported kernels (XNOR's, one per output filter), the quantizers' own
  parameters (BDG's ``tau``, ``phi``), biases, full-precision layers, and
  batch norms at **4 values per channel** (weight, bias, running mean, running variance: what a
  state dict holds; folding them into 2 would be a deployment optimisation, not the network).
  Integer counters (``num_batches_tracked``) are not stored.
- **Compression** = FP32 bits of the original, unbinarised network (every float value of its
  state dict, norms counted alike) / stored bits of the result.
- **Layer-wise compression** of an inner binary conv (both its filters and its input channels
  pruned): FP32 bits of the original layer / stored bits of the pruned one. Its physical limit
  is ``32 / ((1 - p_out)(1 - p_in))``, i.e. ``32 / (1 - p)^2`` = 88.9x at 40% PFR (STQ-Nets'
  89x), reached up to the scales' share.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..introspect import DEFAULT_INPUT_SIZE
from ..layers import BinaryConv2d
from .gates import is_gate_key
from .record import PruningRecord

__all__ = ["CompressionReport", "compression_report", "storage_plan", "StoredTensor"]

_QUANTIZER_CHILDREN = ("input_quantizer", "kernel_quantizer")


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the deployed network: ``key`` in the state dict (or ``<conv>.scale`` for a
    per-filter scale computed from the latent weights), the layer it is counted under, its kind
    (``"binary"``: ``precision`` bits per value; ``"fp32"``: 32 bits) and its number of values."""

    key: str
    layer: str
    kind: str
    numel: int
    precision: int = 1

    @property
    def bits(self) -> int:
        return self.numel * (self.precision if self.kind == "binary" else 32)


def _layer_of(key: str, binary: set) -> str:
    """The layer a state-dict key is counted under: a binary conv owns its quantizers' parameters."""
    owner = key.rsplit(".", 1)[0] if "." in key else ""
    for child in _QUANTIZER_CHILDREN:
        marker = f".{child}."
        if marker in f".{key}":
            parent = f".{key}".split(marker)[0][1:]
            if parent in binary:
                return parent
    return owner


def _exported_scale(conv: BinaryConv2d) -> Optional[torch.Tensor]:
    """The per-filter scale the deployed layer stores: its exported kernel's, or for a kernel that
    cannot be exported (more than two values: the packed export refuses it) the quantizer's."""
    try:
        return conv.export_kernel().scale
    except ValueError:
        return conv.quantized_kernel()[1]


@torch.no_grad()
def storage_plan(model: nn.Module) -> List[StoredTensor]:
    """What the deployed form of ``model`` stores, tensor by tensor (the report's bit counts and
    :func:`~.export.export_packed`'s file are both built from this list)."""
    binary = {n: m for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    plan: List[StoredTensor] = []
    for key, value in model.state_dict().items():
        if is_gate_key(key) or not value.is_floating_point():
            continue
        layer = _layer_of(key, set(binary))
        if layer in binary and key == f"{layer}.weight":
            conv = binary[layer]
            plan.append(StoredTensor(key, layer, "binary", value.numel(), getattr(conv.kernel_quantizer, "precision", 1)))
            scale = _exported_scale(conv)
            if scale is not None:
                plan.append(StoredTensor(f"{layer}.scale", layer, "fp32", scale.numel()))
        else:
            plan.append(StoredTensor(key, layer, "fp32", value.numel()))
    return plan


def _positions(model: nn.Module, input_size: List[int]) -> Dict[str, int]:
    """Output positions per conv / linear layer (``H_out * W_out``, tokens for a linear layer)."""
    found: Dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            channels = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features

            def hook(mod, args, out, name=name, channels=channels):
                found[name] = found.get(name, 0) + out.numel() // (out.shape[0] * channels)

            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *input_size, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape is not None else 0


@dataclass
class CompressionReport:
    """Rows per layer (dicts, see :data:`COLUMNS`) and the model's ``summary``."""

    rows: List[Dict[str, Any]]
    summary: Dict[str, float]
    inner: List[Dict[str, Any]] = field(default_factory=list)
    refused: Dict[str, str] = field(default_factory=dict)  # groups left whole: {owner conv: reason}

    COLUMNS = ("layer", "kind", "filters_before", "filters_after", "in_before", "in_after",
               "params_before", "params_after", "macs_before", "macs_after",
               "bits_before_fp32", "bits_after", "compression", "limit")

    # ------------------------------------------------------------ text
    def headline(self) -> str:
        s = self.summary
        inner = ""
        if s.get("inner_compression") is not None:
            inner = (f"; inner binary layers {s['inner_compression']:.1f}x "
                     f"(limit 32/(1-{s['pfr']:.2f})^2 = {s['inner_limit']:.1f}x)")
        at = f" at {'x'.join(str(v) for v in s['input_size'])} input" if s.get("input_size") else ""
        return (f"PFR {s['pfr']:.1%} | MAC ratio {s['mac_ratio']:.2f}x ({s['macs_before']/1e6:.1f}M -> "
                f"{s['macs_after']/1e6:.1f}M MACs{at}) | params {s['params_before']/1e6:.3f}M -> "
                f"{s['params_after']/1e6:.3f}M | compression {s['compression']:.1f}x vs FP32 "
                f"({s['bits_before'] / 8e6:.2f} MB -> {s['bits_after'] / 8e6:.3f} MB){inner}")

    def layer_rows(self) -> List[Dict[str, Any]]:
        """The rows of the conv and linear layers (norms and other tensors left out)."""
        return [r for r in self.rows if r["kind"] in ("binary conv", "conv", "linear")]

    def to_markdown(self) -> str:
        out = io.StringIO()
        out.write(f"**{self.headline()}**\n\n")
        cols = ("layer", "kind", "filters_before", "filters_after", "in_before", "in_after",
                "params_after", "macs_after", "bits_after", "compression", "limit")
        out.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in self.layer_rows():
            out.write("| " + " | ".join(_fmt(r[c]) for c in cols) + " |\n")
        out.write(self._refused_markdown())
        return out.getvalue()

    def _refused_markdown(self) -> str:
        if not self.refused:
            return ""
        rows = "".join(f"| {name} | {why} |\n" for name, why in self.refused.items())
        return (f"\nPFR over all binary filters: {self.summary.get('binary_pfr', float('nan')):.1%}. "
                f"Groups left whole ({len(self.refused)}):\n\n| group | reason |\n|---|---|\n{rows}")

    def __str__(self) -> str:
        lines = [self.headline(), f"{'layer':<40} {'kind':<11} {'filters':>11} {'in':>11} "
                 f"{'MACs':>9} {'bits':>10} {'compr.':>7} {'limit':>6}"]
        for r in self.layer_rows():
            lines.append(
                f"{r['layer'][:40]:<40} {r['kind']:<11} {r['filters_before']:>5}->{r['filters_after']:<5} "
                f"{r['in_before']:>5}->{r['in_after']:<5} {r['macs_after']:>9} {r['bits_after']:>10} "
                f"{_fmt(r['compression']):>7} {_fmt(r['limit']):>6}"
            )
        return "\n".join(lines)

    # ------------------------------------------------------------ files
    def to_csv(self, path: str) -> str:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def plot(self, path: str) -> str:
        """A bar chart of filters before (light) and after (dark) per conv / linear layer."""
        # The object-oriented Agg canvas: no pyplot, so the user's global backend is untouched.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        rows = [r for r in self.layer_rows() if r["filters_before"]]
        fig = Figure(figsize=(max(6.0, 0.18 * len(rows) + 2), 4.0), layout="tight")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        xs = range(len(rows))
        ax.bar(xs, [r["filters_before"] for r in rows], color="#c6dbef", label="before")
        ax.bar(xs, [r["filters_after"] for r in rows], color="#08519c", label="kept")
        ax.set_xticks(list(xs), [r["layer"] for r in rows], rotation=90, fontsize=6)
        ax.set_ylabel("filters")
        ax.set_title(f"Kept filters per layer (PFR {self.summary['pfr']:.1%}, "
                     f"compression {self.summary['compression']:.1f}x)", fontsize=9)
        ax.legend(fontsize=8)
        fig.savefig(path, dpi=120)
        return path

    def save(self, stem: str) -> Dict[str, str]:
        """Write ``stem.csv``, ``stem.md`` and ``stem.png``; returns the paths by suffix."""
        paths = {"csv": self.to_csv(f"{stem}.csv"), "png": self.plot(f"{stem}.png")}
        with open(f"{stem}.md", "w") as f:
            f.write(self.to_markdown())
        paths["md"] = f"{stem}.md"
        return paths


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.1f}"
    return str(v)


def _kind(m: nn.Module) -> str:
    if isinstance(m, BinaryConv2d):
        return "binary conv"
    if isinstance(m, nn.Conv2d):
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "norm"
    return type(m).__name__


def compression_report(model: nn.Module, record: PruningRecord) -> CompressionReport:
    """Compare the pruned ``model`` with the original it was cut from (known from ``record``).

    Args:
        model: the pruned network (after :func:`~.surgery.remove_filters` or a reload).
        record: its :class:`~.record.PruningRecord`.
    """
    plan = storage_plan(model)
    modules = dict(model.named_modules())
    binary = {n for n, m in modules.items() if isinstance(m, BinaryConv2d)}
    params = {k for k, _ in model.named_parameters()}
    state = model.state_dict()
    input_size = list(record.input_size or DEFAULT_INPUT_SIZE)  # a record without one predates the field
    positions = _positions(model, input_size)

    layers: Dict[str, Dict[str, Any]] = {}

    def row(layer: str) -> Dict[str, Any]:
        if layer not in layers:
            m = modules.get(layer)
            layers[layer] = dict(layer=layer, kind=_kind(m) if m is not None else "other",
                                 filters_before=0, filters_after=0, in_before=0, in_after=0,
                                 params_before=0, params_after=0, macs_before=0, macs_after=0,
                                 bits_before_fp32=0, bits_after=0)
        return layers[layer]

    for key, shape in record.shapes_before.items():
        layer = _layer_of(key, binary)
        r = row(layer)
        after = record.shapes.get(key, shape)
        if key in params:
            r["params_before"] += _numel(shape)
            r["params_after"] += _numel(after)
        owned_by_quantizer = layer in binary and key != f"{layer}.weight" and key != f"{layer}.bias"
        is_float = state[key].is_floating_point() if key in state else True
        if not owned_by_quantizer and is_float:  # the original FP network's float values
            r["bits_before_fp32"] += 32 * _numel(shape)
        if key == f"{layer}.weight" or (r["kind"] == "norm" and key == f"{layer}.running_mean"):
            r["filters_before"], r["filters_after"] = shape[0], after[0]
            if len(shape) > 1:
                r["in_before"], r["in_after"] = shape[1], after[1]
            if layer in positions:
                r["macs_before"] = positions[layer] * _numel(shape)
                r["macs_after"] = positions[layer] * _numel(after)
    for t in plan:
        row(t.layer)["bits_after"] += t.bits

    rows = []
    inner = []
    for r in layers.values():
        r["compression"] = r["bits_before_fp32"] / r["bits_after"] if r["bits_after"] else float("nan")
        keep_out = r["filters_after"] / r["filters_before"] if r["filters_before"] else 1.0
        keep_in = r["in_after"] / r["in_before"] if r["in_before"] else 1.0
        r["limit"] = float("nan")
        if r["kind"] == "binary conv":
            r["limit"] = 32.0 / (keep_out * keep_in)
            if keep_out < 1 and keep_in < 1:
                inner.append(r)
        rows.append(r)

    bits_before = sum(r["bits_before_fp32"] for r in rows)
    bits_after = sum(r["bits_after"] for r in rows)
    macs_before = sum(r["macs_before"] for r in rows)
    macs_after = sum(r["macs_after"] for r in rows)
    pfr = record.pfr
    summary = dict(
        pfr=pfr,
        mac_ratio=macs_before / macs_after if macs_after else float("nan"),
        compression=bits_before / bits_after if bits_after else float("nan"),
        params_before=record.params_before,
        params_after=record.params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        bits_before=bits_before,
        bits_after=bits_after,
        inner_compression=statistics.median(r["compression"] for r in inner) if inner else None,
        inner_limit=32.0 / (1.0 - pfr) ** 2,
        input_size=input_size,
    )
    binary_rows = [r for r in rows if r["kind"] == "binary conv"]  # refused groups count here, whole
    binary_before = sum(r["filters_before"] for r in binary_rows)
    summary["binary_pfr"] = 1.0 - sum(r["filters_after"] for r in binary_rows) / binary_before if binary_before else 0.0
    return CompressionReport(rows=rows, summary=summary, inner=inner, refused=dict(record.refused))
