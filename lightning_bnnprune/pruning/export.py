"""Packed export: the pruned binary network as it would be deployed, 8 binary weights per byte.

File layout (little-endian)::

    b"BNNPACK1" | uint64 n | zlib(JSON header), n bytes | payload

The header holds the :class:`~.record.PruningRecord` (to rebuild the module tree) and a table of
the payload's tensors; the payload holds, in the order of :func:`~.report.storage_plan`:

- each binary conv's deployed kernel as bits (``np.packbits``; bit 1 = the upper value, the two
  values in the header), as its quantizer exports it
  (:meth:`~lightning_bnnprune.quantizers.KernelQuantizer.export`): XNOR's ``sign(W)`` (after
  centring, if any), BDG's ``tau * sign(W) + phi``;
- each binary conv's per-filter scale, if its quantizer has one (XNOR's, one float32 per output
  filter), computed from the latent weights;
- every other float tensor of the state dict as float32 (first conv, classifier, biases, norms).

The latent weights are not stored: the file is for inference. Its size is the report's stored
bits plus the header and less than one byte of padding per binary layer.
:func:`load_packed` rebuilds the network and gives each binary conv a :class:`PackedKernel` that
returns the stored kernel and scale, so the logits are bit-identical to the exported model's.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..layers import BinaryConv2d
from ..paths import PathLike
from ..quantizers import BinaryKernel, KernelQuantizer
from .rebuild import binarize_spec, rebuild, shape_manifest, timm_spec
from .record import PruningRecord
from .report import storage_plan

__all__ = ["export_packed", "load_packed", "PackedKernel", "MAGIC", "unpruned_record"]

MAGIC = b"BNNPACK1"

class PackedKernel(KernelQuantizer):
    """Kernel quantizer of a loaded packed layer: the stored binary kernel, not a quantisation.

    forward: ``kernel = where(bits, upper, lower)`` from the layer's 0/1 ``weight``, and the stored
    per-filter ``scale`` (``None`` for quantizers without one, e.g. BDG).
    """

    value_set = "the stored {lower, upper}"

    def __init__(self, lower: float, upper: float, scale: Optional[Tensor] = None) -> None:
        super().__init__()
        self.register_buffer("levels", torch.tensor([lower, upper], dtype=torch.float32))
        self.register_buffer("scale", scale.detach().clone() if scale is not None else None)

    def forward(self, weight: Tensor, in_mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        if in_mask is not None:
            raise RuntimeError("a packed layer is final: it takes no input mask")
        kernel = torch.where(weight > 0.5, self.levels[1], self.levels[0]).to(weight.dtype)
        return kernel, self.scale

    def export(self, weight: Tensor) -> BinaryKernel:
        return BinaryKernel(weight > 0.5, float(self.levels[0]), float(self.levels[1]), self.scale)


def _binary_kernel(layer: BinaryConv2d, name: str) -> Tuple[np.ndarray, List[float], Optional[Tensor]]:
    try:
        kernel = layer.export_kernel()
    except ValueError as err:
        raise ValueError(f"cannot pack {name}: {err}") from None
    return np.packbits(kernel.bits.cpu().numpy().reshape(-1)), [kernel.lower, kernel.upper], kernel.scale


def unpruned_record(model: nn.Module) -> PruningRecord:
    """The record of a network nothing was cut from: its manifest, its binarisation and timm name,
    so that :func:`load_packed` can rebuild it."""
    manifest = shape_manifest(model)
    params = sum(p.numel() for p in model.parameters())
    name, kwargs = timm_spec(model)
    return PruningRecord(shapes_before=manifest, shapes=dict(manifest), params_before=params,
                         params_after=params, timm_name=name, timm_kwargs=kwargs,
                         binarize_kwargs=binarize_spec(model))


def export_packed(model: nn.Module, path: PathLike, record: Optional[PruningRecord] = None) -> Dict[str, int]:
    """Write ``model`` (pruned as ``record`` says) in packed form.

    Args:
        model: the binary network, pruned (no gates attached) or not.
        path: the file to write.
        record: its :class:`~.record.PruningRecord`; ``None`` for a network nothing was cut from.

    Returns:
        ``{"file_bytes": ..., "payload_bytes": ..., "header_bytes": ...}``.

    Raises:
        ValueError: if ``model`` does not match ``record`` or still has gates attached, or, naming
            the layer and its quantizer, if a binary kernel is not two-valued.
    """
    gated = [n for n, m in model.named_modules() if isinstance(m, BinaryConv2d) and m.input_mask() is not None]
    if gated:
        raise ValueError(f"cannot pack {gated[0]}: pruning gates are still attached; export the pruned "
                         "network (remove_filters / load_pruned) instead")
    record = unpruned_record(model) if record is None else record
    have = shape_manifest(model)
    bad = [k for k, v in record.shapes.items() if have.get(k) != list(v)]
    if bad:
        raise ValueError(f"the model does not match the record: {bad[:3]}")
    state = model.state_dict()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    chunks: List[bytes] = []
    table: List[List[Any]] = []
    levels: Dict[str, List[float]] = {}
    scales: Dict[str, Tensor] = {}
    offset = 0
    for t in storage_plan(model):
        if t.kind == "binary":
            packed, levels[t.layer], scale = _binary_kernel(layers[t.layer], t.layer)
            if scale is not None:
                scales[f"{t.layer}.scale"] = scale
            data, shape = packed.tobytes(), list(state[t.key].shape)
        else:
            value = scales[t.key] if t.key in scales else state[t.key]
            data, shape = value.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4").tobytes(), list(value.shape)
        table.append([t.key, t.kind, shape, offset, len(data)])
        chunks.append(data)
        offset += len(data)
    header = zlib.compress(json.dumps({"record": record.to_dict(), "tensors": table, "levels": levels},
                                      separators=(",", ":")).encode(), 9)
    with open(os.fspath(path), "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header)
        for data in chunks:
            f.write(data)
    return {"file_bytes": len(MAGIC) + 8 + len(header) + offset, "payload_bytes": offset, "header_bytes": len(header)}


def load_packed(path: PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """Rebuild the network of a :func:`export_packed` file and load its packed weights.

    Args:
        path: the file.
        model: a freshly built network of the recorded architecture, if the record cannot build
            one by itself (see :func:`~.rebuild.rebuild`).

    Returns:
        the network in eval mode; its binary convs hold 0/1 kernels and a :class:`PackedKernel`.

    Raises:
        ValueError: if the file is not a packed export or does not match the rebuilt network.
    """
    with open(os.fspath(path), "rb") as f:
        blob = f.read()
    if blob[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{os.fspath(path)} is not a packed export (no {MAGIC!r} header)")
    (n,) = struct.unpack("<Q", blob[len(MAGIC):len(MAGIC) + 8])
    start = len(MAGIC) + 8
    header = json.loads(zlib.decompress(blob[start:start + n]))
    payload = memoryview(blob)[start + n:]
    record = PruningRecord.from_dict(header["record"])
    net = rebuild(record, model)
    layers = {name: m for name, m in net.named_modules() if isinstance(m, BinaryConv2d)}
    state: Dict[str, Tensor] = {}
    scales: Dict[str, Tensor] = {}
    bits: Dict[str, Tensor] = {}
    for key, kind, shape, offset, size in header["tensors"]:
        raw = np.frombuffer(payload[offset:offset + size], dtype=np.uint8)
        if kind == "binary":
            numel = int(np.prod(shape))
            bits[key] = torch.from_numpy(np.unpackbits(raw)[:numel].astype(np.float32)).view(shape)
        else:
            value = torch.from_numpy(raw.view("<f4").copy()).view(shape)
            (scales if key.endswith(".scale") and key[:-len(".scale")] in layers else state)[key] = value
    for name, layer in layers.items():
        if f"{name}.weight" not in bits:
            raise ValueError(f"{os.fspath(path)} holds no packed kernel for binary layer {name!r}")
        lower, upper = header["levels"][name]
        layer.kernel_quantizer = PackedKernel(lower, upper, scales.get(f"{name}.scale"))
        layer.weight = nn.Parameter(bits[f"{name}.weight"].to(layer.weight.dtype), requires_grad=False)
    # The kernel quantizers' own parameters (BDG's tau, phi) are folded into the stored levels.
    folded = tuple(f"{name}.kernel_quantizer." for name in layers)
    state = {k: v for k, v in state.items() if not k.startswith(folded)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    set_directly = {f"{name}.weight" for name in layers}
    missing = [k for k in missing
               if k not in set_directly and not k.startswith(folded) and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{os.fspath(path)} does not match the network: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return net.eval()
