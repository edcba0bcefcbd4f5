"""The record of a physical removal, and saving / loading pruned models.

A :class:`PruningRecord` is Torch-Pruning's pruning history in plain data: a list of
``(module_name, dim, kept_idxs)`` with ``dim`` ``"out"`` (output channels of a conv or linear
layer, channels of a norm, all channels of a depthwise conv), ``"in"`` (input channels of a conv
or linear layer) or ``"param:<name>"`` (a free per-channel parameter, a layer scale), plus a timm-style shape manifest (``{"layer1.0.conv1.weight": [38, 64, 3, 3]}``)
taken before and after, and what is needed to rebuild the network from scratch: the timm
architecture name and keyword arguments, and which layers were binarised with which quantizers.
Every field is a ``str``/``int``/``float``/``list``/``dict``, so the record is JSON-able, picklable,
and loads with ``torch.load(weights_only=True)``.

A freshly built network of the same architecture becomes the pruned one before its weights
load: :func:`~.rebuild.rebuild` binarises it as recorded and replays the cuts by name, without
tracing it again. This module holds the record and its files (:func:`save_pruned`,
:func:`load_pruned`, :func:`restore_pruned` for Lightning checkpoints).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..paths import PathLike
from ..torch_files import check_torch_file
from .gates import is_gate_key
from .rebuild import rebuild

__all__ = ["PruningRecord", "save_pruned", "read_pruned", "load_pruned", "restore_pruned", "CHECKPOINT_KEY", "FORMAT"]

FORMAT = "lightning_bnnprune.pruned/1"
CHECKPOINT_KEY = "bnnprune_record"  # where the pruning callbacks put the record in a Lightning checkpoint


@dataclass
class PruningRecord:
    """What a removal cut, and how to rebuild the network it was cut from.

    Attributes:
        removed: ``[(module_name, "out" | "in" | "param:<name>", kept_idxs)]`` in original channel positions; only
            modules that lost channels are listed.
        groups: ``{group_name: kept group channels}``; ``group_sizes``: channels before.
        shapes_before / shapes: ``{state_dict key: shape}`` before and after the removal.
        params_before / params_after: parameter counts of the network before and after.
        input_size: ``(C, H, W)`` the removal was checked at (the report's MACs use it).
        timm_name / timm_kwargs: ``timm.create_model(timm_name, **timm_kwargs)`` rebuilds the
            unbinarised network (``None`` when the network is not a timm model).
        binarize_kwargs: ``{"layers": [...], "input_quantizer": alias, "input_quantizer_kwargs":
            {...}, "kernel_quantizer": alias, "kernel_quantizer_kwargs": {...}}``, or ``None``
            when a quantizer is not a registered one (then pass ``model=`` to load).
        network_path: attribute path of the network inside its LightningModule (``""``: itself).
        max_abs_diff: the exactness check's result, max |logits after - logits gated|.
    """

    removed: List[Tuple[str, str, List[int]]] = field(default_factory=list)
    groups: Dict[str, List[int]] = field(default_factory=dict)
    group_sizes: Dict[str, int] = field(default_factory=dict)
    shapes_before: Dict[str, List[int]] = field(default_factory=dict)
    shapes: Dict[str, List[int]] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    input_size: Optional[List[int]] = None
    timm_name: Optional[str] = None
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)
    binarize_kwargs: Optional[Dict[str, Any]] = None
    network_path: str = ""
    max_abs_diff: Optional[float] = None
    refused: Dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------ figures
    @property
    def num_filters(self) -> int:
        return sum(self.group_sizes.values())

    @property
    def num_pruned(self) -> int:
        return sum(self.group_sizes[g] - len(kept) for g, kept in self.groups.items())

    @property
    def pfr(self) -> float:
        """Pruned filter ratio: pruned group channels / prunable group channels."""
        return self.num_pruned / max(self.num_filters, 1)

    # ------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["removed"] = [[m, d, list(map(int, k))] for m, d, k in self.removed]
        out["format"] = FORMAT
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruningRecord":
        if data.get("format", FORMAT) != FORMAT:
            raise ValueError(f"unknown pruning record format {data.get('format')!r}; this library reads {FORMAT!r}")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["removed"] = [(str(m), str(d), [int(i) for i in k]) for m, d, k in data.get("removed", [])]
        return cls(**kwargs)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "PruningRecord":
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------- files
def save_pruned(model: nn.Module, record: PruningRecord, path: PathLike) -> str:
    """Write the pruned network's weights and its record to one ``torch.save`` file.

    One file, not safetensors + JSON: a pruned model must travel as one piece, and since the
    record is plain data the file still loads with ``torch.load(weights_only=True)``, which
    executes no pickled code. The weights are stored as trained (latent weights, full precision),
    so the model can be fine-tuned after loading; :func:`~.export.export_packed` writes the
    1-bit deployment form.

    Returns:
        the path written.
    """
    path = os.fspath(path)
    state = {k: v for k, v in model.state_dict().items() if not is_gate_key(k)}
    _mismatch_state(state, record)
    torch.save({"format": FORMAT, "record": record.to_dict(), "state_dict": state}, path)
    return path


def _mismatch_state(state: Mapping[str, Tensor], record: PruningRecord) -> None:
    bad = [k for k, v in state.items() if record.shapes.get(k) != list(v.shape)]
    if bad or set(record.shapes) - set(state):
        raise ValueError(f"the model's weights do not match the record (e.g. {(bad or sorted(set(record.shapes) - set(state)))[:3]})")


def read_pruned(path: PathLike) -> Tuple[PruningRecord, Dict[str, Tensor]]:
    """The record and state dict of a file written by :func:`save_pruned`.

    Raises:
        UnreadableFileError: (a ``ValueError``) if the file is truncated or not a ``torch.save`` file.
    """
    check_torch_file(path, "pruned model written by save_pruned")
    blob = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a pruned model written by save_pruned (format {FORMAT!r})")
    return PruningRecord.from_dict(blob["record"]), blob["state_dict"]


def load_pruned(path: PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """Rebuild a pruned network from a :func:`save_pruned` file and load its weights.

    The pruning callbacks write the file as ``<checkpoint dir>/pruned.pt`` (in the app:
    ``outputs/<date>/<time>/checkpoints/pruned.pt``). Its record names the layers from the network
    the callback pruned: the timm model inside the LightningModule, else the LightningModule
    itself. ``model`` may be either: the whole LightningModule, or the network inside it
    (e.g. ``model=MyModule().net`` for a record written from ``MyModule``).

    Args:
        path: the file.
        model: a freshly built model of the recorded architecture (binarised or not): the
            LightningModule or its network; by default the network is built with
            ``timm.create_model`` from the record.

    Returns:
        ``model`` (or the built network), pruned and loaded, in eval mode.

    Raises:
        ValueError: if ``model`` (or the rebuilt one) does not match the record; the message
            names the first mismatching tensors, or says which module the record needs; or if
            the file is truncated or not a pruned model (one line naming the file).
    """
    record, state = read_pruned(path)
    if model is None:
        net = rebuild(record, None)
        net.load_state_dict(state)
        return net.eval()
    net, record, state = _network_in(model, record, state, os.fspath(path))
    rebuild(record, net)
    net.load_state_dict(state)
    return model.eval()


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _network_in(
    model: nn.Module, record: PruningRecord, state: Dict[str, Tensor], path: str
) -> Tuple[nn.Module, PruningRecord, Dict[str, Tensor]]:
    """The module of ``model`` the record applies to, with the record (and state) re-rooted there
    when ``model`` is a part of the recorded network (the inner network of a LightningModule)."""
    names = sorted({m for m, _, _ in record.removed} | set((record.binarize_kwargs or {}).get("layers", [])))
    if all(_has(model, n) for n in names):
        return model, record, state
    if record.network_path and _has(model, record.network_path):  # the LightningModule around it
        inner = model.get_submodule(record.network_path)
        if all(_has(inner, n) for n in names):
            return inner, record, state
    parts = names[0].split(".") if names else []
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth]) + "."
        if all(n.startswith(prefix) and _has(model, n[len(prefix):]) for n in names):
            return model, _rerooted(record, prefix), {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    root = f"the network at {record.network_path!r} inside a LightningModule" if record.network_path else "a LightningModule"
    example = record.removed[0][0] if record.removed else names[0] if names else "?"
    raise ValueError(
        f"{path} was written from {root} (layers named like {example!r}) and the model given has "
        f"no such layers: pass model= the whole LightningModule or the network the pruning callback found in it"
    )


def _rerooted(record: PruningRecord, prefix: str) -> PruningRecord:
    """The record as seen from its submodule at ``prefix`` (``"net."``); other keys dropped."""
    def strip(mapping: Mapping[str, Any]) -> Dict[str, Any]:
        return {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}

    binarize = None
    if record.binarize_kwargs is not None:
        binarize = dict(record.binarize_kwargs)
        binarize["layers"] = [n[len(prefix):] for n in binarize["layers"] if n.startswith(prefix)]
        if "relus" in binarize:
            binarize["relus"] = strip(binarize["relus"])
    return PruningRecord.from_dict({
        **record.to_dict(),
        "removed": [[m[len(prefix):], d, k] for m, d, k in record.removed if m.startswith(prefix)],
        "groups": strip(record.groups),
        "group_sizes": strip(record.group_sizes),
        "shapes_before": strip(record.shapes_before),
        "shapes": strip(record.shapes),
        "binarize_kwargs": binarize,
        "network_path": ".".join(p for p in (record.network_path, prefix[:-1]) if p),
    })


def restore_pruned(
    module: nn.Module, ckpt_path: PathLike, weights_only: bool = True, map_location: Any = "cpu"
) -> nn.Module:
    """Load a Lightning checkpoint of a *pruned* LightningModule into a freshly built one.

    The pruning callbacks store the record in the checkpoint (``checkpoint["bnnprune_record"]``)
    once the filters are removed. This binarises the module's network as recorded, replays the
    removal, then loads the checkpoint's ``state_dict``::

        module = restore_pruned(MyLightningModule(...), "runs/pruned.ckpt")

    Args:
        module: a freshly built LightningModule (or the bare network) of the same architecture.
        ckpt_path: a Lightning checkpoint written after the removal (e.g. ``trainer.save_checkpoint``
            after ``fit``; not ``weights_only``: Lightning then skips the callbacks'
            ``on_save_checkpoint``, which is where the record goes in).
        weights_only: passed to ``torch.load`` (``False`` for checkpoints holding pickled objects
            in their hyper-parameters; only for files you trust).

    Returns:
        ``module``, pruned and loaded.

    Raises:
        ValueError: if the checkpoint holds no record (saved before the removal), does not
            match ``module``, or is truncated or not a ``torch.save`` file (one line naming it).
    """
    check_torch_file(ckpt_path, "Lightning checkpoint")  # a truncated file: one line, not a zip traceback
    ckpt = torch.load(os.fspath(ckpt_path), map_location=map_location, weights_only=weights_only)
    if CHECKPOINT_KEY not in ckpt:
        raise ValueError(
            f"{os.fspath(ckpt_path)} holds no pruning record: it was saved before the filters were removed. "
            "Resume it with trainer.fit(..., ckpt_path=...) and the pruning callback, or load the "
            "pruned checkpoint written at the end of fit"
        )
    record = PruningRecord.from_dict(ckpt[CHECKPOINT_KEY])
    state = {k: v for k, v in ckpt["state_dict"].items() if not is_gate_key(k)}
    prefix = f"{record.network_path}." if record.network_path else ""
    try:
        net = module.get_submodule(record.network_path) if record.network_path else module
        target, state_for = module, state
    except AttributeError:  # the bare network was passed: take its part of the state dict
        if not prefix:
            raise
        net, target = module, module
        state_for = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    rebuild(record, net)
    missing, unexpected = target.load_state_dict(state_for, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{os.fspath(ckpt_path)} does not match the module: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return target
