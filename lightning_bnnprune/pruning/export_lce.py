"""Larq Compute Engine export: a (pruned) binary network as a ``.tflite`` flatbuffer that LCE runs.

Binary convolutions become LCE's ``LceQuantize -> LceBconv2d`` with bit-packed kernels; the
full-precision first conv, the classifier and everything between the binary convs become TFLite
float ops (NHWC). The file is written directly from the TFLite schema that the
``larq-compute-engine`` wheel ships (``mlir/python/tflite_schema.py``), not through LCE's
converter: the converter needs TensorFlow 2.16 and larq 0.13, whose ``numpy<2`` pin cannot be
installed beside this package's numpy 2 (measured: pip reports ``ResolutionImpossible``), while the
schema and LCE's interpreter load without TensorFlow (the extra installs ``flatbuffers`` and
``tqdm`` only).

What LCE computes (``core/bconv2d/output_transform.h``): ``y = conv_pm1(x_b, k_b) * m + b`` per
output channel, where ``conv_pm1`` is the convolution of the +-1 input and kernel bits (bit 1 =
negative, channel ``c`` in bit ``c % 32`` of word ``c // 32``), with zero padding corrected for
``SAME``. A :class:`~lightning_bnnprune.layers.BinaryConv2d` with XNOR kernel
``sign(W) * alpha`` followed by a BatchNorm ``y * g + h`` is therefore exactly
``m = alpha * g``, ``b = bias * g + h``: scales and batch norms are folded, nothing approximated.

PyTorch pads symmetrically; TFLite's ``SAME`` puts the odd pixel after (bottom/right). A strided
binary conv whose PyTorch padding equals ``SAME``'s *trailing* pad (a 3x3 stride-2 conv on an even
map) is exported on the spatially reversed input with the reversed kernel, and its output reversed
back (``REVERSE_V2``, exact), because a zero pad cannot be written into a +-1 bit tensor. LCE's
own zero-padding correction is wrong on maps smaller than the kernel (measured: a 3x3 conv on a
2x2 map is off by ~0.7); there the bit tensor is padded with +1 (``PAD`` of zero words) and a
constant ``-m * conv(border, k)`` is added after the convolution, which is exact too.

LCE's reference kernel zero-pads only an even number of input channels (it counts half the
channels' bits as the zero of a padded tap); the other kernels take any count. A zero-padded
binary conv with an odd count ``c`` is therefore declared with ``c + 1`` channels: the extra one
is the +1 tail bit of the packed input and kernel, zero-padded like the others, so it adds the
number of the window's in-map taps ``T`` to each output, and ``m * T`` is subtracted afterwards
(a ``MUL`` of the conv's multiplier by ``T``, one ``[1, Ho, Wo, 1]`` constant per conv geometry,
and a ``SUB``). Every file loads under LCE's three kernel paths.

Running the files (LCE's interpreter, its kernel paths, latency) is
:mod:`~lightning_bnnprune.pruning.lce_runtime`'s.

Numerically the file computes what PyTorch computes up to float rounding (max |diff| ~1e-6 on
logits of order 1), except that a pre-activation within ~1e-7 of zero can take the other sign
under the folded batch norm's rounding and flip one bit (see ``benchmarks/results/lce_export.md``).

Around the binary convolutions: timm's ``BatchNormAct2d`` is the batch norm (folded as above
where it follows a conv alone, else a per-channel ``MUL``/``ADD``) and then its activation, each a
TFLite float op of the same formula; max pooling in ``ceil_mode`` pads with the lowest float
(which no window's maximum takes); constants that a forward computes from parameters (timm's
standardised weights, layer scales) are computed once with PyTorch at export. A grouped binary
conv (depthwise included) cannot be an ``LceBconv2d`` that loads everywhere: LCE runs groups only
on its indirect-BGEMM path and only with 32-channel groups (measured: the other paths refuse the
file); with ``grouped="float"`` it is written as TFLite float convolutions of the +-1 input
(``LceQuantize`` -> ``LceDequantize``) and the +-1 kernel, exact (integer sums) but float
arithmetic.

What a quantizer exports is its own declaration (:mod:`~lightning_bnnprune.quantizers`): an input
quantizer lowers to ``LceQuantize`` if it declares ``is_sign``, a kernel is its quantizer's
``export()``, ``{-s, +s}`` times the per-filter scale. Refused, in one line naming the layer (and
the quantizer): kernels whose two values are not ``{-s, +s}`` (BDG's ``{phi - tau, phi + tau}``) or
that are not two-valued, inputs not quantised by a sign (real inputs), grouped binary convs
(unless ``grouped="float"``), layer and group norms, layers with gates still attached, and any
module or function without a TFLite/LCE op here; a call inside a module is named by that module.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from timm.layers import BatchNormAct2d, Conv2dSame, DropBlock2d, DropPath, LayerNorm2d

from .. import quantizers
from ..layers import BinaryConv2d
from ..paths import PathLike
from .lce_runtime import lce_predict  # noqa: F401  (its home before lce_runtime; still exported here)

__all__ = ["export_lce", "lce_predict", "LceExportError", "lce_available"]

_INSTALL = "install the extra: pip install 'lightning-bnnprune[lce]'"


class LceExportError(ValueError):
    """A network (or one of its layers) that LCE cannot run as exported here."""


# --- the larq-compute-engine wheel, without its TensorFlow-importing __init__ -------------------

def _lce_dir() -> str:
    spec = importlib.util.find_spec("larq_compute_engine")  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"larq-compute-engine is not installed; {_INSTALL}")
    return list(spec.submodule_search_locations)[0]


def lce_available() -> bool:
    """Whether the ``lce`` extra (``larq-compute-engine``) is installed."""
    return importlib.util.find_spec("larq_compute_engine") is not None


@lru_cache(maxsize=None)
def _schema():
    path = os.path.join(_lce_dir(), "mlir", "python", "tflite_schema.py")
    spec = importlib.util.spec_from_file_location("_bnnprune_tflite_schema", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- flatbuffer writing -------------------------------------------------------------------------

class _Graph:
    """Tensors, buffers and operators of one TFLite subgraph, packed by :meth:`finish`."""

    def __init__(self) -> None:
        self.s = _schema()
        self.tensors: List[Any] = []
        self.buffers: List[Any] = [self.s.BufferT()]  # buffer 0: the empty one, by convention
        self.operators: List[Any] = []
        self.codes: Dict[Tuple[int, str], int] = {}
        self.const_bytes = 0

    def tensor(self, shape: Sequence[int], dtype: str = "float32", data: Optional[np.ndarray] = None,
               name: str = "") -> int:
        t = self.s.TensorT()
        t.shape = [int(d) for d in shape]
        t.type = {"float32": self.s.TensorType.FLOAT32, "int32": self.s.TensorType.INT32}[dtype]
        t.name = name
        t.buffer = 0
        if data is not None:
            raw = np.asarray(data, dtype=np.dtype(dtype).newbyteorder("<"))
            assert list(raw.shape) == t.shape, (raw.shape, t.shape)
            buf = self.s.BufferT()
            buf.data = np.frombuffer(raw.tobytes(), dtype=np.uint8)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
            self.const_bytes += raw.nbytes
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const(self, data: np.ndarray, dtype: str = "float32") -> int:
        data = np.asarray(data)
        return self.tensor(data.shape, dtype, data)

    def op(self, builtin: str, inputs: Sequence[int], outputs: Sequence[int], options: Any = None,
           custom: str = "", custom_options: bytes = b"") -> None:
        s = self.s
        code = s.BuiltinOperator.CUSTOM if custom else getattr(s.BuiltinOperator, builtin)
        key = (code, custom)
        if key not in self.codes:
            self.codes[key] = len(self.codes)
        o = s.OperatorT()
        o.opcodeIndex = self.codes[key]
        o.inputs, o.outputs = list(inputs), list(outputs)
        if options is not None:
            o.builtinOptionsType = getattr(s.BuiltinOptions, type(options).__name__[:-1])
            o.builtinOptions = options
        if custom:
            o.customOptions = np.frombuffer(custom_options, dtype=np.uint8) if custom_options else None
            o.customOptionsFormat = s.CustomOptionsFormat.FLEXBUFFERS
        self.operators.append(o)

    def finish(self, inputs: List[int], outputs: List[int], description: str) -> bytes:
        import flatbuffers

        s = self.s
        sub = s.SubGraphT()
        sub.tensors, sub.inputs, sub.outputs, sub.operators = self.tensors, inputs, outputs, self.operators
        sub.name = "main"
        model = s.ModelT()
        model.version = 3
        codes = [None] * len(self.codes)
        for (code, custom), i in self.codes.items():
            oc = s.OperatorCodeT()
            oc.builtinCode, oc.customCode, oc.version = code, custom or None, 1
            oc.deprecatedBuiltinCode = min(code, s.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
            codes[i] = oc
        model.operatorCodes = codes
        model.subgraphs = [sub]
        model.description = description
        model.buffers = self.buffers
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _bitpack(negative: np.ndarray) -> np.ndarray:
    """LCE's bit-packing of the last axis: bit ``c % 32`` of int32 word ``c // 32`` is 1 where the
    value is negative; the tail of the last word is 0 (= +1, ignored via ``channels_in``)."""
    *lead, c = negative.shape
    words = -(-c // 32)
    padded = np.zeros((*lead, words * 32), dtype=bool)
    padded[..., :c] = negative
    packed = np.packbits(padded.reshape(*lead, words, 4, 8), axis=-1, bitorder="little")
    return packed.reshape(*lead, words * 4).view("<i4").reshape(*lead, words)


# --- the network walk ---------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    # timm's norm-act layers (a BatchNorm2d with its dropout and activation inside, asserting
    # ``x.ndim`` in forward) are leaves: lowered as the batch norm, then the activation; so is
    # timm's Linear (an nn.Linear whose forward checks for TorchScript) and Conv2dSame (TensorFlow's
    # SAME padding computed from the input's shape: TFLite's SAME).
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # timm's LayerNorm2d too, so that its refusal names the layer, not a permute inside it.
        return (isinstance(m, (BinaryConv2d, BatchNormAct2d, LayerNorm2d, nn.Linear, Conv2dSame))
                or super().is_leaf_module(m, qualname))


_PASS = (nn.Identity, nn.Dropout, nn.Dropout2d, DropBlock2d, DropPath)  # identities in eval mode
_SUPPORTED = ("BinaryConv2d (sign inputs, {-s, +s} kernels; grouped ones with grouped='float'), Conv2d "
              "(plain or depthwise, also functional with a constant weight), BatchNorm2d, timm's BatchNormAct2d, "
              "Linear, ReLU, ReLU6, Hardtanh(-1, 1), LeakyReLU, SiLU, Hardswish, Hardsigmoid, Sigmoid, Tanh, "
              "MaxPool2d, AvgPool2d (TFLite's windows), global average pooling, nearest Upsample by whole "
              "factors, Flatten (of a 1x1 map), add / sub / mul (broadcast), cat / split / slices along "
              "channels, pad (constant, reflect), Identity, Dropout")


class _Values(dict):
    """Node -> its tensor in the file; a constant's tensor is written on first use."""

    def __init__(self, materialize) -> None:
        super().__init__()
        self.materialize = materialize

    def __missing__(self, node: fx.Node) -> int:
        self[node] = self.materialize(node)
        return self[node]


def _fetch(module: nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _pairs(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _padding_mode(size: Sequence[int], kernel, stride, dilation, padding) -> str:
    """``"VALID"``, ``"SAME"`` (PyTorch's padding is TFLite's), ``"REVERSED"`` (it is ``SAME``'s
    mirror image) or ``"EXPLICIT"`` (neither)."""
    if isinstance(padding, str):
        return {"valid": "VALID", "same": "SAME"}[padding]
    modes = set()
    for n, k, s, d, p in zip(size, _pairs(kernel), _pairs(stride), _pairs(dilation), _pairs(padding)):
        k_eff = d * (k - 1) + 1
        if p == 0:
            modes.add("VALID")
            continue
        torch_out = (n + 2 * p - k_eff) // s + 1
        out = -(-n // s)
        total = max((out - 1) * s + k_eff - n, 0)
        before = total // 2
        if out != torch_out:
            modes.add("EXPLICIT")
        elif p == before:
            modes.add("SAME")
        elif p == total - before:
            modes.add("REVERSED")
        else:
            modes.add("EXPLICIT")
    if len(modes) == 1:
        return modes.pop()
    # One unpadded axis and one padded: VALID and SAME agree on the unpadded axis when SAME needs
    # no pad there (a 1-wide kernel at stride 1); anything else is written as explicit padding.
    return "EXPLICIT"


class _Exporter:
    def __init__(self, gm: fx.GraphModule, grouped: str = "refuse") -> None:
        self.gm = gm
        self.grouped = grouped
        self.float_binary_layers = 0  # grouped binary convs written as float convs of +-1 tensors
        self.signs: Dict[fx.Node, int] = {}  # tensor -> its +-1 float copy (LceDequantize)
        self.g = _Graph()
        self.consts: Dict[fx.Node, Any] = {}  # parameters read in forward, and what is computed from them
        self.env: Dict[fx.Node, Any] = _Values(self.materialize)
        self.quantized: Dict[Tuple[fx.Node, bool], int] = {}
        self.folded: Dict[fx.Node, Tuple[np.ndarray, np.ndarray]] = {}  # conv -> its BN's (g, h)
        self.binary_layers = 0
        self.tap_maps: Dict[Tuple, int] = {}  # conv geometry -> its in-map tap counts (a constant)

    # shapes: PyTorch NCHW in the node's metadata, NHWC in the file
    @staticmethod
    def shape(node: fx.Node) -> List[int]:
        s = list(node.meta["tensor_meta"].shape)
        return [s[0], s[2], s[3], s[1]] if len(s) == 4 else s

    def out(self, node: fx.Node) -> int:
        t = self.g.tensor(self.shape(node))
        self.env[node] = t
        return t

    def refuse(self, node: fx.Node, why: str) -> None:
        raise LceExportError(f"cannot export {self.layer_of(node)} to LCE: {why}")

    @staticmethod
    def layer_of(node: fx.Node) -> str:
        """The layer a node belongs to, as a user finds it in ``named_modules()``: the module it
        calls, or the innermost module whose forward makes the call (with the call's name)."""
        if node.op == "call_module":
            return repr(node.target)
        stack = node.meta.get("nn_module_stack") or {}
        owner = list(stack.values())[-1][0] if stack else ""
        return f"{owner!r} (its {node.name!r})" if owner else repr(node.name)

    def run(self) -> bytes:
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), nn.BatchNorm2d):
                src = node.args[0]
                if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                        and isinstance(self.gm.get_submodule(src.target), nn.Conv2d)):
                    self.folded[src] = self.bn_affine(self.gm.get_submodule(node.target))
        inputs: List[int] = []
        outputs: List[int] = []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                inputs.append(self.g.tensor(self.shape(node), name="input"))
                self.env[node] = inputs[-1]
            elif node.op == "output":
                result = node.args[0]
                if not isinstance(result, fx.Node):
                    self.refuse(node, "the network must return one tensor (the logits)")
                outputs.append(self.env[result])
                self.g.tensors[outputs[-1]].name = "logits"
            elif node.op == "get_attr":
                self.consts[node] = _fetch(self.gm, node.target)
            elif node.op in ("call_function", "call_method") and self.constant_call(node):
                continue
            elif node.op == "call_module":
                self.module(node, self.gm.get_submodule(node.target))
            elif node.op in ("call_function", "call_method"):
                self.function(node)
            else:
                self.refuse(node, f"fx op {node.op!r} has no export here")
        return self.g.finish(inputs, outputs, "lightning-bnnprune export for Larq Compute Engine")

    def constant_call(self, node: fx.Node) -> bool:
        """Evaluate a call whose inputs are all constants (a standardised weight, a reshaped layer
        scale) with PyTorch, once, at export; ``False`` where an input is a network tensor."""
        shape_of = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if shape_of is not None and shape_of not in self.consts and (
                (node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim"))
                or (node.op == "call_method" and node.target in ("size", "dim"))):
            # A network tensor's shape is static in the file (batch 1): a constant, as timm's
            # ``F.interpolate(y, size=x.shape[-2:])`` needs.
            size = torch.Size(shape_of.meta["tensor_meta"].shape)
            if node.op == "call_function":
                value: Any = size if node.args[1] == "shape" else len(size)
            elif node.target == "dim":
                value = len(size)
            else:
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                dim = self.consts.get(dim, dim) if isinstance(dim, fx.Node) else dim
                value = size if dim is None else size[dim]
            self.consts[node] = value
            return True
        inputs: List[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        if not inputs or not all(n in self.consts for n in inputs):
            return False
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.consts.__getitem__)
        if node.op == "call_function":
            self.consts[node] = node.target(*args, **kwargs)
        else:
            self.consts[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        return True

    def call_args(self, node: fx.Node, names: Sequence[str]) -> Dict[str, Any]:
        """A call's arguments by name; constants that are not tensors (``w.shape[0]``) as values."""
        given = dict(zip(names, node.args), **node.kwargs)
        return {k: self.consts[v] if isinstance(v, fx.Node) and v in self.consts
                and not isinstance(self.consts[v], Tensor) else v for k, v in given.items()}

    def materialize(self, node: fx.Node) -> int:
        """A constant's tensor in the file (NHWC when it has 4 dimensions), written when an op
        first reads it."""
        if node not in self.consts or not isinstance(self.consts[node], Tensor):
            self.refuse(node, "an input that is neither a network tensor nor a constant tensor")
        value = self.consts[node].detach().cpu().float().numpy()
        return self.g.const(value.transpose(0, 2, 3, 1) if value.ndim == 4 else value)

    @staticmethod
    def bn_affine(bn: nn.BatchNorm2d) -> Tuple[np.ndarray, np.ndarray]:
        var = bn.running_var.double()
        g = (bn.weight.double() if bn.affine else torch.ones_like(var)) / torch.sqrt(var + bn.eps)
        h = (bn.bias.double() if bn.affine else torch.zeros_like(var)) - bn.running_mean.double() * g
        return g.cpu().numpy(), h.cpu().numpy()

    def affine_of(self, node: fx.Node, conv: nn.Conv2d, mult: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(m, b)`` with ``output = conv_unscaled * m + b``: conv scale, bias and folded BN."""
        bias = conv.bias.detach().cpu().double().numpy() if conv.bias is not None else np.zeros(conv.out_channels)
        g, h = self.folded.get(node, (np.ones(conv.out_channels), np.zeros(conv.out_channels)))
        return mult * g, bias * g + h

    def arg(self, node: fx.Node, i: int = 0) -> fx.Node:
        a = node.args[i]
        if not isinstance(a, fx.Node):
            self.refuse(node, f"argument {i} is a constant ({a!r}), not a tensor")
        return a

    # --- modules ---

    def module(self, node: fx.Node, m: nn.Module) -> None:
        if isinstance(m, BinaryConv2d):
            return self.binary_conv(node, m)
        if isinstance(m, nn.BatchNorm2d):
            src = self.arg(node)
            if isinstance(m, BatchNormAct2d) and not isinstance(m.drop, _PASS):
                self.refuse(node, f"its dropout {type(m.drop).__name__} has no LCE/TFLite op here")
            if src in self.folded:
                y = self.env[src]
            else:
                y = self.scale_shift(self.env[src], self.shape(node), *self.bn_affine(m))
            if isinstance(m, BatchNormAct2d):
                y = self.activation(node, m.act, y)
                if y is None:
                    self.refuse(node, f"its activation {type(m.act).__name__} has no LCE/TFLite op here; "
                                      f"supported: {_SUPPORTED}")
            self.env[node] = y
            return
        if isinstance(m, nn.Conv2d):
            return self.float_conv(node, m)
        if isinstance(m, nn.Linear):
            x = self.env[self.arg(node)]
            if len(self.shape(self.arg(node))) != 2:
                self.refuse(node, "a Linear over a tensor that is not [batch, features]")
            w = self.g.const(m.weight.detach().cpu().numpy())
            b = self.g.const(m.bias.detach().cpu().numpy() if m.bias is not None else np.zeros(m.out_features))
            opt = self.g.s.FullyConnectedOptionsT()
            self.g.op("FULLY_CONNECTED", [x, w, b], [self.out(node)], opt)
            return
        y = self.activation(node, m, self.env[self.arg(node)]) if node.args else None
        if y is not None:  # Identity, Dropout and the activations
            self.env[node] = y
            return
        if isinstance(m, nn.MaxPool2d):
            return self.max_pool(node, m)
        if isinstance(m, nn.AvgPool2d):
            return self.avg_pool(node, m)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self.global_pool(node)
        if isinstance(m, nn.Flatten):
            return self.flatten(node, m.start_dim)
        if isinstance(m, nn.Upsample):
            return self.resize(node, m.mode, m.align_corners)
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            self.refuse(node, f"{type(m).__name__} (a normalisation over channels at inference; only batch "
                              "norms, folded or per-channel affine, are written here)")
        self.refuse(node, f"{type(m).__name__} has no LCE/TFLite op here; supported: {_SUPPORTED}")

    def binary_conv(self, node: fx.Node, m: BinaryConv2d) -> None:
        if m.input_mask() is not None:
            self.refuse(node, "pruning gates are still attached; export the pruned network "
                              "(remove_filters / load_pruned) instead")
        if not getattr(m.input_quantizer, "is_sign", False):  # the quantizer's own declaration
            self.refuse(node, f"LCE binarises inputs with sign(); this layer's input quantizer is "
                              f"{quantizers.display_name(m.input_quantizer)}, not declared is_sign")
        if m.groups != 1 and self.grouped != "float":
            self.refuse(node, f"grouped binary convolution (groups={m.groups}): LceBconv2d runs groups only on "
                              "LCE's indirect-BGEMM path with 32-channel groups; export_lce(grouped='float') "
                              "writes it as a float convolution of the +-1 tensors")
        if m.padding_mode != "zeros":
            self.refuse(node, f"padding_mode={m.padding_mode!r} (LCE pads binary inputs with zeros)")
        try:
            exported = m.export_kernel()
        except ValueError as err:
            self.refuse(node, str(err))
        if not exported.symmetric:
            self.refuse(node, f"its kernel quantizer {quantizers.display_name(m.kernel_quantizer)} takes the "
                              f"values {getattr(m.kernel_quantizer, 'value_set', 'of its kernel')} = "
                              f"{{{exported.lower:.4g}, {exported.upper:.4g}}}; LceBconv2d needs {{-s, +s}}")
        scale = exported.scale.detach().cpu().double().numpy() if exported.scale is not None else 1.0
        mult = exported.upper * np.ones(m.out_channels) * scale
        mult, bias = self.affine_of(node, m, mult)
        if m.groups != 1:
            return self.grouped_binary_conv(node, m, exported.bits.cpu(), mult, bias)
        src = self.arg(node)
        _, h, w, c = self.shape(src)
        mode = "SAME" if m.same_padding else _padding_mode((h, w), m.kernel_size, m.stride, m.dilation,
                                                           m.padding)
        k_eff = [d * (k - 1) + 1 for d, k in zip(_pairs(m.dilation), _pairs(m.kernel_size))]
        if mode in ("SAME", "REVERSED") and (h < k_eff[0] or w < k_eff[1]):
            # LCE's zero-padding correction is wrong on maps smaller than the kernel (measured:
            # a 3x3 conv on a 2x2 map is off by ~0.7); such maps are tiny, so pad them here.
            mode = "EXPLICIT"
        reverse = mode == "REVERSED"
        sign = exported.bits.cpu()
        if reverse:
            sign = torch.flip(sign, dims=(2, 3))
        filt = _bitpack(~sign.permute(0, 2, 3, 1).numpy())  # OHWI, bits over input channels
        x = self.quantize(src, reverse)
        g = self.g
        correction = None
        if mode == "EXPLICIT":
            x, correction = self.one_pad(x, m, sign, mult, (h, w, c))
            mode = "VALID"
        # LCE's reference kernel zero-pads only an even channel count (it counts c // 2 differing
        # bits per padded tap as zero): an odd count is declared one larger, the extra channel
        # being the +1 tail bit of input and kernel, and its taps taken off after the conv.
        extra_channel = mode != "VALID" and c % 2 == 1
        f = g.tensor(filt.shape, "int32", filt)
        tm = g.const(mult.astype(np.float32))
        tb = g.const(bias.astype(np.float32))
        out_shape = self.shape(node)
        after = [step for step, wanted in (("taps", extra_channel), ("add", correction is not None),
                                            ("reverse", reverse)) if wanted]
        final = self.out(node)
        y = g.tensor(out_shape) if after else final
        import flatbuffers.flexbuffers as flex

        sh, sw = _pairs(m.stride)
        dh, dw = _pairs(m.dilation)
        options = flex.Dumps({
            "channels_in": c + extra_channel, "dilation_height_factor": dh, "dilation_width_factor": dw,
            "fused_activation_function": 0, "pad_values": 0,
            "padding": g.s.Padding.VALID if mode == "VALID" else g.s.Padding.SAME,
            "stride_height": sh, "stride_width": sw,
        })
        # Input 4 (output thresholds) is only read for bit-packed outputs; -1 marks it absent.
        g.op("", [x, f, tm, tb, -1], [y], custom="LceBconv2d", custom_options=bytes(options))
        for i, step in enumerate(after):
            dst = final if i == len(after) - 1 else g.tensor(out_shape)
            if step == "taps":
                self.subtract_taps(y, dst, m, tm, (h, w), out_shape)
            elif step == "add":
                g.op("ADD", [y, g.const(correction)], [dst], g.s.AddOptionsT())
            else:
                g.op("REVERSE_V2", [y, g.const(np.array([1, 2], np.int32), "int32")], [dst],
                     g.s.ReverseV2OptionsT())
            y = dst
        self.binary_layers += 1

    def grouped_binary_conv(self, node: fx.Node, m: BinaryConv2d, bits: Tensor, mult: np.ndarray,
                            bias: np.ndarray) -> None:
        """A grouped binary conv as TFLite float ops, exactly: the input's signs as +-1 floats
        (``LceQuantize`` -> ``LceDequantize``, sign(0) = +1 as in the bit path), convolved with the
        +-1 kernel (``DEPTHWISE_CONV_2D`` for one input channel per group, else ``SPLIT`` ->
        ``CONV_2D`` per group -> ``CONCATENATION``) into integer sums, then ``* m + b``. It runs on
        every kernel path but as float arithmetic, not bit operations."""
        g = self.g
        src = self.arg(node)
        shape = self.shape(src)
        if src not in self.signs:
            self.signs[src] = g.tensor(shape)
            g.op("", [self.quantize(src, False)], [self.signs[src]], custom="LceDequantize")
        x = self.signs[src]
        mode = "SAME" if m.same_padding else _padding_mode(shape[1:3], m.kernel_size, m.stride, m.dilation,
                                                           m.padding)
        if mode in ("EXPLICIT", "REVERSED"):  # zero padding of the +-1 tensor, as PyTorch's
            x, shape = self.explicit_pad(x, shape, m.padding, 0.0)
            mode = "VALID"
        kernel = (bits.to(torch.float32) * 2 - 1).numpy()  # [O, C / groups, kh, kw], +-1
        out_shape = self.shape(node)
        sums = g.tensor(out_shape)
        (sh, sw), (dh, dw) = _pairs(m.stride), _pairs(m.dilation)
        zeros = lambda n: g.const(np.zeros(n, np.float32))  # noqa: E731
        if m.groups == m.in_channels:
            opt = g.s.DepthwiseConv2DOptionsT()
            opt.padding, opt.strideH, opt.strideW = getattr(g.s.Padding, mode), sh, sw
            opt.dilationHFactor, opt.dilationWFactor = dh, dw
            opt.depthMultiplier = m.out_channels // m.in_channels
            g.op("DEPTHWISE_CONV_2D", [x, g.const(kernel.transpose(1, 2, 3, 0)), zeros(m.out_channels)],
                 [sums], opt)
        else:
            n_, h, w, c = shape
            parts = [g.tensor([n_, h, w, c // m.groups]) for _ in range(m.groups)]
            split = g.s.SplitOptionsT()
            split.numSplits = m.groups
            g.op("SPLIT", [g.const(np.array(3, np.int32), "int32"), x], parts, split)
            per = m.out_channels // m.groups
            outs = []
            for i, part in enumerate(parts):
                opt = g.s.Conv2DOptionsT()
                opt.padding, opt.strideH, opt.strideW = getattr(g.s.Padding, mode), sh, sw
                opt.dilationHFactor, opt.dilationWFactor = dh, dw
                outs.append(g.tensor(out_shape[:3] + [per]))
                g.op("CONV_2D", [part, g.const(kernel[i * per:(i + 1) * per].transpose(0, 2, 3, 1)), zeros(per)],
                     [outs[-1]], opt)
            cat = g.s.ConcatenationOptionsT()
            cat.axis = 3
            g.op("CONCATENATION", outs, [sums], cat)
        scaled = g.tensor(out_shape)
        g.op("MUL", [sums, g.const(mult.astype(np.float32))], [scaled], g.s.MulOptionsT())
        g.op("ADD", [scaled, g.const(bias.astype(np.float32))], [self.out(node)], g.s.AddOptionsT())
        self.float_binary_layers += 1

    def subtract_taps(self, y: int, dst: int, m: BinaryConv2d, multiplier: int, hw: Tuple[int, int],
                      out_shape: List[int]) -> None:
        """``dst = y - m * T``: the extra +1 channel added ``T[i, j]``, the number of the window's
        taps inside the (SAME-padded) map, to every output before the multiplier ``m`` (the
        conv's own constant). ``T`` (``[1, Ho, Wo, 1]``) is stored once per conv geometry."""
        key = (tuple(hw), _pairs(m.kernel_size), _pairs(m.stride), _pairs(m.dilation))
        if key not in self.tap_maps:
            counts = []
            for n, k, s, d in zip(*key):
                out = -(-n // s)
                before = max((out - 1) * s + d * (k - 1) + 1 - n, 0) // 2
                starts = np.arange(out)[:, None] * s - before + d * np.arange(k)[None, :]
                counts.append(((starts >= 0) & (starts < n)).sum(axis=1))
            rows, cols = counts
            self.tap_maps[key] = self.g.const((rows[:, None] * cols[None, :]).astype(np.float32)[None, :, :, None])
        g = self.g
        shift = g.tensor(out_shape)
        g.op("MUL", [multiplier, self.tap_maps[key]], [shift], g.s.MulOptionsT())
        g.op("SUB", [y, shift], [dst], g.s.SubOptionsT())

    def one_pad(self, x: int, m: BinaryConv2d, sign: Tensor, mult: np.ndarray,
                hwc: Tuple[int, int, int]) -> Tuple[int, np.ndarray]:
        """Pad the bit-packed input with +1 (bits 0) and return the constant that turns the
        VALID convolution of it into the zero-padded one: ``-m * conv(P, k)``, ``P`` = 1 on the
        padded border, 0 inside (so ``conv(x_zero) = conv(x_one) - conv(P, k)``)."""
        h, w, c = hwc
        if m.same_padding:
            pads = []
            for n, k, s, d in zip((h, w), _pairs(m.kernel_size), _pairs(m.stride), _pairs(m.dilation)):
                total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
                pads.append((total // 2, total - total // 2))
        else:
            ph, pw = _pairs(m.padding)
            pads = [(ph, ph), (pw, pw)]
        (t, b), (l, r) = pads
        border = torch.ones(1, c, h + t + b, w + l + r, dtype=torch.float64)
        border[:, :, t:t + h, l:l + w] = 0
        kernel = sign.to(torch.float64) * 2 - 1
        corr = F.conv2d(border, kernel, stride=m.stride, dilation=m.dilation)[0]  # [O, Ho, Wo]
        correction = (-mult.reshape(-1, 1, 1) * corr.numpy()).transpose(1, 2, 0)[None]
        n_, _, _, words = self.g.tensors[x].shape
        padded = self.g.tensor([n_, h + t + b, w + l + r, words], "int32")
        paddings = self.g.const(np.array([[0, 0], [t, b], [l, r], [0, 0]], np.int32), "int32")
        self.g.op("PAD", [x, paddings], [padded], self.g.s.PadOptionsT())
        return padded, correction.astype(np.float32)

    def quantize(self, src: fx.Node, reverse: bool) -> int:
        """``LceQuantize`` of ``src`` (bit-packed sign), once per tensor and orientation."""
        key = (src, reverse)
        if key not in self.quantized:
            g = self.g
            n, h, w, c = self.shape(src)
            x = self.env[src]
            if reverse:
                flipped = g.tensor([n, h, w, c])
                g.op("REVERSE_V2", [x, g.const(np.array([1, 2], np.int32), "int32")], [flipped],
                     g.s.ReverseV2OptionsT())
                x = flipped
            q = g.tensor([n, h, w, -(-c // 32)], "int32")
            g.op("", [x], [q], custom="LceQuantize")
            self.quantized[key] = q
        return self.quantized[key]

    def explicit_pad(self, src: int, shape: List[int], padding, value: float) -> Tuple[int, List[int]]:
        ph, pw = _pairs(padding)
        n, h, w, c = shape
        new = [n, h + 2 * ph, w + 2 * pw, c]
        out = self.g.tensor(new)
        pads = self.g.const(np.array([[0, 0], [ph, ph], [pw, pw], [0, 0]], np.int32), "int32")
        fill = self.g.const(np.array([value], np.float32).reshape(()))
        self.g.op("PADV2", [src, pads, fill], [out], self.g.s.PadV2OptionsT())
        return out, new

    def float_conv(self, node: fx.Node, m: nn.Conv2d) -> None:
        if m.groups not in (1, m.in_channels):
            self.refuse(node, f"grouped float convolution (groups={m.groups}; only 1 or depthwise)")
        if m.padding_mode != "zeros" or type(m) not in (nn.Conv2d, Conv2dSame):
            self.refuse(node, f"{type(m).__name__} with padding_mode={m.padding_mode!r}; only a plain "
                              "zero-padded nn.Conv2d exports as CONV_2D")
        mult, bias = self.affine_of(node, m, np.ones(m.out_channels))
        weight = m.weight.detach().cpu().double().numpy() * mult.reshape(-1, 1, 1, 1)
        src = self.arg(node)
        x, shape = self.env[src], self.shape(src)
        mode = "SAME" if isinstance(m, Conv2dSame) else _padding_mode(shape[1:3], m.kernel_size, m.stride,
                                                                      m.dilation, m.padding)
        if mode in ("EXPLICIT", "REVERSED"):
            x, shape = self.explicit_pad(x, shape, m.padding, 0.0)
            mode = "VALID"
        g = self.g
        depthwise = m.groups != 1
        opt = g.s.DepthwiseConv2DOptionsT() if depthwise else g.s.Conv2DOptionsT()
        opt.padding = getattr(g.s.Padding, mode)
        opt.strideH, opt.strideW = _pairs(m.stride)
        opt.dilationHFactor, opt.dilationWFactor = _pairs(m.dilation)
        if depthwise:
            opt.depthMultiplier = m.out_channels // m.in_channels
        # TFLite's filters: [O, kh, kw, I], a depthwise one [1, kh, kw, O] (PyTorch: [O, I, kh, kw])
        w = g.const((weight.transpose(1, 2, 3, 0) if depthwise else weight.transpose(0, 2, 3, 1)).astype(np.float32))
        b = g.const(bias.astype(np.float32))
        g.op("DEPTHWISE_CONV_2D" if depthwise else "CONV_2D", [x, w, b], [self.out(node)], opt)

    def functional_conv(self, node: fx.Node) -> None:
        """``F.conv2d`` with a constant weight (timm's standardised-weight convs, blur pooling)."""
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        given = self.call_args(node, names)
        weight, bias = given.get("weight"), given.get("bias")
        if weight not in self.consts or (bias is not None and bias not in self.consts):
            self.refuse(node, "conv2d with a weight computed from the input")
        w = self.consts[weight]
        conv = nn.Conv2d(w.shape[1] * given.get("groups", 1), w.shape[0], tuple(w.shape[2:]),
                         stride=given.get("stride", 1), padding=given.get("padding", 0),
                         dilation=given.get("dilation", 1), groups=given.get("groups", 1), bias=bias is not None)
        conv.weight.data.copy_(w)
        if bias is not None:
            conv.bias.data.copy_(self.consts[bias])
        self.float_conv(node, conv)

    def max_pool(self, node: fx.Node, m: nn.MaxPool2d) -> None:
        """``MAX_POOL_2D``: ``SAME`` or ``VALID`` where PyTorch's windows are TFLite's, else
        ``VALID`` after a pad with the lowest float on each side (the trailing one as wide as
        ``ceil_mode``'s last window needs), which no window's maximum takes, so every case is exact."""
        if _pairs(m.dilation) != (1, 1):
            self.refuse(node, f"MaxPool2d with dilation {m.dilation} (TFLite's MAX_POOL_2D has none)")
        kernel, stride, padding = _pairs(m.kernel_size), _pairs(m.stride or m.kernel_size), _pairs(m.padding)
        src = self.arg(node)
        x, shape = self.env[src], self.shape(src)
        outs = self.shape(node)[1:3]
        valid = [(n - k) // s + 1 for n, k, s in zip(shape[1:3], kernel, stride)]
        same = [(-(-n // s), max((-(-n // s) - 1) * s + k - n, 0) // 2)
                for n, k, s in zip(shape[1:3], kernel, stride)]
        if padding == (0, 0) and outs == valid:
            return self.pool_op(node, "MAX_POOL_2D", x, "VALID", kernel, stride)
        if all((out, p) == sm for out, p, sm in zip(outs, padding, same)):
            return self.pool_op(node, "MAX_POOL_2D", x, "SAME", kernel, stride)
        (pt, pl), (n_, h, w, c) = padding, shape
        pb, pr = [(out - 1) * s + k - n - p for out, k, s, n, p in zip(outs, kernel, stride, (h, w), padding)]
        padded = self.g.tensor([n_, h + pt + max(pb, 0), w + pl + max(pr, 0), c])
        pads = self.g.const(np.array([[0, 0], [pt, max(pb, 0)], [pl, max(pr, 0)], [0, 0]], np.int32), "int32")
        fill = self.g.const(np.array(np.finfo(np.float32).min, np.float32))
        self.g.op("PADV2", [x, pads, fill], [padded], self.g.s.PadV2OptionsT())
        self.pool_op(node, "MAX_POOL_2D", padded, "VALID", kernel, stride)

    def pool_op(self, node: fx.Node, op: str, x: int, mode: str, kernel, stride) -> None:
        opt = self.g.s.Pool2DOptionsT()
        opt.padding = getattr(self.g.s.Padding, mode)
        opt.strideH, opt.strideW = _pairs(stride)
        opt.filterHeight, opt.filterWidth = _pairs(kernel)
        self.g.op(op, [x], [self.out(node)], opt)

    def avg_pool(self, node: fx.Node, m: nn.AvgPool2d) -> None:
        """``AVERAGE_POOL_2D`` wherever PyTorch's windows and divisors are TFLite's: ``VALID``
        (after a zero pad when the padding counts), or ``SAME``, which averages the in-map pixels
        of each window as ``count_include_pad=False`` does and as ``ceil_mode``'s last window does
        when it overhangs an unpadded map (ResNet-D's ``AvgPool2d(2, 2, ceil_mode=True,
        count_include_pad=False)`` shortcut on any map)."""
        kernel, stride, padding = _pairs(m.kernel_size), _pairs(m.stride or m.kernel_size), _pairs(m.padding)
        src = self.arg(node)
        shape = self.shape(src)
        outs = self.shape(node)[1:3]
        if m.divisor_override:
            self.refuse(node, f"AvgPool2d with a divisor override ({m.divisor_override})")
        floor_outs = [(n + 2 * p - k) // s + 1 for n, k, s, p in zip(shape[1:3], kernel, stride, padding)]
        if outs == floor_outs and (padding == (0, 0) or m.count_include_pad):
            x = self.env[src]
            if padding != (0, 0):  # the padded zeros count in the divisor: write them
                x, shape = self.explicit_pad(x, shape, padding, 0.0)
            return self.pool_op(node, "AVERAGE_POOL_2D", x, "VALID", kernel, stride)
        same = []
        for n, k, s, p, out in zip(shape[1:3], kernel, stride, padding, outs):
            total = max((-(-n // s) - 1) * s + k - n, 0)
            same.append(-(-n // s) == out and total // 2 == p)
        if all(same) and (padding == (0, 0) or not m.count_include_pad):
            return self.pool_op(node, "AVERAGE_POOL_2D", self.env[src], "SAME", kernel, stride)
        self.refuse(node, f"AvgPool2d(kernel_size={kernel}, stride={stride}, padding={padding}, "
                          f"ceil_mode={m.ceil_mode}, count_include_pad={m.count_include_pad}) on a "
                          f"{shape[1]}x{shape[2]} map averages windows that TFLite's VALID and SAME "
                          "pooling do not")

    def elementwise(self, node: fx.Node, op: str) -> None:
        """``ADD`` / ``SUB`` / ``MUL`` of two tensors of equal shape, or one broadcast over the
        other (an SE gate ``[N, C, 1, 1]`` over its map, a one-element scale), or of a tensor and
        a number."""
        operands: List[Any] = []
        rank = len(self.shape(node))
        for a in node.args:
            if isinstance(a, fx.Node) and a in self.consts and rank == 4 and self.consts[a].dim() < 4:
                value = self.consts[a].detach().cpu().float()  # [C, 1, 1] broadcasts as [1, C, 1, 1]
                value = value.reshape((1,) * (4 - value.dim()) + tuple(value.shape)).numpy()
                operands.append(self.g.const(value.transpose(0, 2, 3, 1)))
            elif isinstance(a, fx.Node):
                operands.append(a)
            elif isinstance(a, (int, float)):
                operands.append(self.g.const(np.array(a, np.float32)))
            else:
                self.refuse(node, f"{op.lower()} with {type(a).__name__}")
        shapes = [self.shape(a) for a in operands if isinstance(a, fx.Node)]
        if len(shapes) == 2 and shapes[0] != shapes[1]:
            (sa, sb), numel = shapes, [int(np.prod(s)) for s in shapes]
            same_rank = len(sa) == len(sb) and all(x == y or 1 in (x, y) for x, y in zip(sa, sb))
            if not (same_rank or 1 in numel):
                self.refuse(node, f"{op.lower()} of shapes {sa} and {sb} (only equal ranks that broadcast, "
                                  "or one element)")
        options = {"ADD": self.g.s.AddOptionsT, "SUB": self.g.s.SubOptionsT, "MUL": self.g.s.MulOptionsT}[op]()
        self.g.op(op, [self.env[a] if isinstance(a, fx.Node) else a for a in operands], [self.out(node)], options)

    def pad(self, node: fx.Node) -> None:
        """``F.pad`` of the map: ``PADV2`` with the value, or ``MIRROR_PAD`` (``reflect``)."""
        names = ("input", "pad", "mode", "value")
        given = self.call_args(node, names)
        src, pad, mode = self.arg(node), list(given["pad"]), given.get("mode", "constant")
        if len(self.shape(src)) != 4 or len(pad) not in (2, 4) or mode not in ("constant", "reflect"):
            self.refuse(node, f"pad {pad} in mode {mode!r} (only of the height and width, constant or reflect)")
        left, right, top, bottom = (pad + [0, 0])[:4]
        pads = self.g.const(np.array([[0, 0], [top, bottom], [left, right], [0, 0]], np.int32), "int32")
        if mode == "reflect":
            opt = self.g.s.MirrorPadOptionsT()
            opt.mode = self.g.s.MirrorPadMode.REFLECT
            return self.g.op("MIRROR_PAD", [self.env[src], pads], [self.out(node)], opt)
        fill = self.g.const(np.array(given.get("value") or 0.0, np.float32))
        self.g.op("PADV2", [self.env[src], pads, fill], [self.out(node)], self.g.s.PadV2OptionsT())

    def resize(self, node: fx.Node, mode: str, align_corners: Optional[bool]) -> None:
        """Nearest upsampling by whole factors: ``RESIZE_NEAREST_NEIGHBOR`` (no half-pixel
        centres), which picks pixel ``floor(i * in / out)`` as PyTorch's ``nearest`` does."""
        src = self.arg(node)
        (h, w), (ho, wo) = self.shape(src)[1:3], self.shape(node)[1:3]
        if mode != "nearest" or ho % h or wo % w:
            self.refuse(node, f"resize {h}x{w} -> {ho}x{wo} in mode {mode!r} (only nearest, by whole factors)")
        opt = self.g.s.ResizeNearestNeighborOptionsT()
        opt.alignCorners, opt.halfPixelCenters = False, False
        self.g.op("RESIZE_NEAREST_NEIGHBOR", [self.env[src], self.g.const(np.array([ho, wo], np.int32), "int32")],
                  [self.out(node)], opt)

    def cat(self, node: fx.Node) -> None:
        """``CONCATENATION`` of float tensors (NCHW's dim 1 is NHWC's axis 3)."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            self.refuse(node, "cat of something other than a list of tensors")
        rank = len(self.shape(node))
        dim = int(dim) % rank
        axis = {0: 0, 1: 3, 2: 1, 3: 2}[dim] if rank == 4 else dim
        opt = self.g.s.ConcatenationOptionsT()
        opt.axis = axis
        self.g.op("CONCATENATION", [self.env[t] for t in tensors], [self.out(node)], opt)

    def split(self, node: fx.Node, name: str) -> None:
        """``SPLIT_V`` along channels (``torch.split`` / ``chunk``): the node's value is the list
        of its parts, which ``getitem`` hands out."""
        src = self.arg(node)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        rank = len(self.shape(src))
        parts = [list(t.shape) for t in node.meta["tensor_meta"]]
        if rank != 4 or int(dim) % rank != 1:
            self.refuse(node, f"{name} along dim {dim} of a rank-{rank} tensor (only along channels)")
        sizes = [p[1] for p in parts]
        outs = [self.g.tensor([p[0], p[2], p[3], p[1]]) for p in parts]
        opt = self.g.s.SplitVOptionsT()
        opt.numSplits = len(outs)
        self.g.op("SPLIT_V", [self.env[src], self.g.const(np.array(sizes, np.int32), "int32"),
                              self.g.const(np.array(3, np.int32), "int32")], outs, opt)
        self.env[node] = outs

    def getitem(self, node: fx.Node) -> None:
        """A part of a split, or a channel slice ``x[:, a:b]`` (``SLICE``, NHWC)."""
        src, index = node.args
        value = self.env.get(src) if isinstance(src, fx.Node) else None
        if isinstance(value, list) and isinstance(index, int):
            self.env[node] = value[index]
            return
        if not isinstance(value, int):
            self.refuse(node, f"indexing {type(src).__name__} with {index!r}")
        shape_in = list(src.meta["tensor_meta"].shape)  # NCHW
        index = index if isinstance(index, tuple) else (index,)
        if len(shape_in) != 4 or len(index) > 4 or not all(
                isinstance(i, slice) and i.step in (None, 1) for i in index):
            self.refuse(node, f"indexing with {index!r} (only unit-step slices of a 4-d tensor)")
        begin, size = [], []
        for i, n in zip(list(index) + [slice(None)] * (4 - len(index)), shape_in):
            start, stop, _ = i.indices(n)
            begin.append(start)
            size.append(max(stop - start, 0))
        nhwc = [0, 2, 3, 1]
        self.g.op("SLICE", [value, self.g.const(np.array([begin[a] for a in nhwc], np.int32), "int32"),
                            self.g.const(np.array([size[a] for a in nhwc], np.int32), "int32")],
                  [self.out(node)], self.g.s.SliceOptionsT())

    def function_activation(self, node: fx.Node, name: str) -> Optional[nn.Module]:
        """The activation module a function or method call computes (``F.relu``, ``x.sigmoid()``)."""
        kw = node.kwargs
        extra = node.args[1:]
        simple = {"relu": nn.ReLU, "relu_": nn.ReLU, "relu6": nn.ReLU6, "sigmoid": nn.Sigmoid,
                  "sigmoid_": nn.Sigmoid, "tanh": nn.Tanh, "silu": nn.SiLU, "hardswish": nn.Hardswish,
                  "hardsigmoid": nn.Hardsigmoid}
        if name in simple:
            return simple[name]()
        if name in ("leaky_relu", "leaky_relu_"):
            return nn.LeakyReLU(float(extra[0]) if extra else float(kw.get("negative_slope", 0.01)))
        if name in ("hardtanh", "hardtanh_"):
            lo = extra[0] if extra else kw.get("min_val", -1.0)
            hi = extra[1] if len(extra) > 1 else kw.get("max_val", 1.0)
            return nn.Hardtanh(float(lo), float(hi))
        return None

    def global_pool(self, node: fx.Node) -> None:
        src = self.arg(node)
        if self.shape(node)[1:3] == self.shape(src)[1:3]:
            self.env[node] = self.env[src]
            return
        if self.shape(node)[1:3] != [1, 1]:
            self.refuse(node, f"adaptive pooling to {self.shape(node)[1:3]} (only to 1x1)")
        opt = self.g.s.ReducerOptionsT()
        opt.keepDims = True
        axes = self.g.const(np.array([1, 2], np.int32), "int32")
        self.g.op("MEAN", [self.env[src], axes], [self.out(node)], opt)

    def flatten(self, node: fx.Node, start_dim: int = 1) -> None:
        src = self.arg(node)
        shape = self.shape(src)
        if start_dim != 1:
            self.refuse(node, f"flatten from dim {start_dim} (only from dim 1)")
        if len(shape) == 2:
            self.env[node] = self.env[src]
            return
        if len(shape) != 4 or shape[1:3] != [1, 1]:
            self.refuse(node, f"flatten of a {shape[1]}x{shape[2]} map (NHWC order differs; "
                              "pool to 1x1 first)")
        new = self.shape(node)
        opt = self.g.s.ReshapeOptionsT()
        opt.newShape = new
        self.g.op("RESHAPE", [self.env[src], self.g.const(np.array(new, np.int32), "int32")],
                  [self.out(node)], opt)

    def activation(self, node: fx.Node, m: nn.Module, x: int) -> Optional[int]:
        """The tensor of activation ``m`` applied to tensor ``x`` (shaped as ``node``'s output),
        or ``None`` when ``m`` is not an activation written here. Each is TFLite's float op of
        the same formula (SiLU: ``x * LOGISTIC(x)``; Hardsigmoid: ``RELU6(x + 3) / 6``)."""
        g, shape = self.g, self.shape(node)

        def op(name: str, inputs: Sequence[int], options: Any = None) -> int:
            y = g.tensor(shape)
            g.op(name, list(inputs), [y], options)
            return y

        if isinstance(m, _PASS):
            return x
        if isinstance(m, nn.ReLU):
            return op("RELU", [x])
        if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0)):
            return op("RELU6", [x])
        if isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (-1.0, 1.0):
            return op("RELU_N1_TO_1", [x])
        if isinstance(m, nn.LeakyReLU):
            opt = g.s.LeakyReluOptionsT()
            opt.alpha = float(m.negative_slope)
            return op("LEAKY_RELU", [x], opt)
        if isinstance(m, nn.Sigmoid):
            return op("LOGISTIC", [x])
        if isinstance(m, nn.Tanh):
            return op("TANH", [x])
        if isinstance(m, nn.SiLU):
            return op("MUL", [x, op("LOGISTIC", [x])], g.s.MulOptionsT())
        if isinstance(m, nn.Hardswish):
            return op("HARD_SWISH", [x])
        if isinstance(m, nn.Hardsigmoid):
            shifted = op("ADD", [x, g.const(np.array(3.0, np.float32))], g.s.AddOptionsT())
            clipped = op("RELU6", [shifted])
            return op("MUL", [clipped, g.const(np.array(1.0 / 6.0, np.float32))], g.s.MulOptionsT())
        return None

    def scale_shift(self, x: int, shape: List[int], g: np.ndarray, h: np.ndarray) -> int:
        """``x * g + h`` per channel (a batch norm not folded into a conv)."""
        mid, y = self.g.tensor(shape), self.g.tensor(shape)
        self.g.op("MUL", [x, self.g.const(g.astype(np.float32))], [mid], self.g.s.MulOptionsT())
        self.g.op("ADD", [mid, self.g.const(h.astype(np.float32))], [y], self.g.s.AddOptionsT())
        return y

    # --- functions and methods ---

    def function(self, node: fx.Node) -> None:
        t = node.target
        name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        if name in ("add", "add_", "iadd", "__add__", "__radd__") and len(node.args) == 2 and not node.kwargs:
            numbers = [a for a in node.args if isinstance(a, (int, float))]
            if numbers and numbers[0] == 0:  # MobileOne's ``out + 0`` where a branch is absent
                self.env[node] = self.env[next(a for a in node.args if isinstance(a, fx.Node))]
                return
            return self.elementwise(node, "ADD")
        if name in ("sub", "sub_", "isub", "__sub__") and len(node.args) == 2 and not node.kwargs:
            return self.elementwise(node, "SUB")
        if name == "conv2d":
            return self.functional_conv(node)
        if name == "max_pool2d":
            names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
            given = self.call_args(node, names)
            given.pop("input")
            given.pop("return_indices", None)
            return self.max_pool(node, nn.MaxPool2d(**given))
        if name == "avg_pool2d":
            names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
            given = self.call_args(node, names)
            given.pop("input")
            return self.avg_pool(node, nn.AvgPool2d(**given))
        if name == "pad":
            return self.pad(node)
        if name in ("interpolate", "upsample_nearest"):
            names = ("input", "size", "scale_factor", "mode", "align_corners")
            given = self.call_args(node, names)
            return self.resize(node, given.get("mode", "nearest"), given.get("align_corners"))
        if name in ("dropout", "contiguous", "clone", "detach"):
            self.env[node] = self.env[self.arg(node)]
            return
        act = self.function_activation(node, name)
        if act is not None:
            y = self.activation(node, act, self.env[self.arg(node)])
            if y is not None:
                self.env[node] = y
                return
        if name in ("mul", "mul_", "imul", "__mul__", "__rmul__") and len(node.args) == 2 and not node.kwargs:
            return self.elementwise(node, "MUL")
        if name == "cat":
            return self.cat(node)
        if name in ("split", "chunk"):
            return self.split(node, name)
        if name == "getitem":
            return self.getitem(node)
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self.flatten(node, int(start))
        if name in ("adaptive_avg_pool2d",):
            return self.global_pool(node)
        if name == "mean" and tuple(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", ())) in ((2, 3), (-2, -1)):
            src = self.arg(node)
            keep = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
            opt = self.g.s.ReducerOptionsT()
            opt.keepDims = keep
            axes = self.g.const(np.array([1, 2], np.int32), "int32")
            self.g.op("MEAN", [self.env[src], axes], [self.out(node)], opt)
            return
        self.refuse(node, f"function {name!r} has no LCE/TFLite op here; supported: {_SUPPORTED}")


GROUPED = ("refuse", "float")


@torch.no_grad()
def export_lce(model: nn.Module, path: PathLike, input_size: Optional[Sequence[int]] = None,
               grouped: str = "refuse") -> Dict[str, int]:
    """Write ``model`` as a Larq Compute Engine ``.tflite`` file (batch 1, NHWC float input).

    Args:
        model: a binary network (pruned with :func:`~lightning_bnnprune.remove_filters` /
            loaded with :func:`~lightning_bnnprune.load_pruned`, or unpruned), evaluated in eval
            mode (running batch-norm statistics); its mode is restored afterwards.
        path: the ``.tflite`` file to write.
        input_size: ``(C, H, W)`` of one image (default: timm's ``pretrained_cfg["input_size"]``).
        grouped: what becomes of a grouped binary convolution (depthwise included), which LCE's
            ``LceBconv2d`` runs only on its indirect-BGEMM path and only with 32-channel groups
            (measured: the other paths fail to load the file): ``"refuse"`` (the default), or
            ``"float"``: TFLite float convolutions of the +-1 input and kernel, exact and loading
            everywhere, but float arithmetic (counted in ``float_binary_layers``).

    Returns:
        ``{"file_bytes", "constant_bytes", "binary_layers", "float_binary_layers", "operators"}``:
        ``binary_layers`` run as ``LceBconv2d``, ``float_binary_layers`` as float convolutions.

    Raises:
        LceExportError: in one line naming the layer, for what LCE cannot run (see the module).
        ImportError: without the ``lce`` extra.
    """
    if grouped not in GROUPED:
        raise ValueError(f"grouped must be one of {', '.join(map(repr, GROUPED))}, got {grouped!r}")
    _schema()  # fail early, with the install hint, when the extra is missing
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size")
        if input_size is None:
            raise ValueError("input_size is required: (channels, height, width) of one image")
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) != 3:
        raise ValueError(f"input_size must be (channels, height, width), got {input_size}")
    was_training = model.training
    model.eval()
    try:
        try:
            gm = fx.GraphModule(model, _Tracer().trace(model))
        except Exception as e:  # noqa: BLE001 - the tracer's errors are many and specific
            raise LceExportError(f"cannot trace {type(model).__name__} with torch.fx: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        device = next(iter(model.parameters()), torch.zeros(())).device
        ShapeProp(gm).propagate(torch.zeros(1, *input_size, device=device))
        exporter = _Exporter(gm, grouped)
        blob = exporter.run()
    finally:
        model.train(was_training)
    with open(os.fspath(path), "wb") as f:
        f.write(blob)
    return {"file_bytes": len(blob), "constant_bytes": exporter.g.const_bytes,
            "binary_layers": exporter.binary_layers, "float_binary_layers": exporter.float_binary_layers,
            "operators": len(exporter.g.operators)}
