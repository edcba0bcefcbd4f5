"""Physical filter removal: a gated network becomes a smaller one that computes the same logits.

The dependency analysis is Torch-Pruning's (:mod:`.groups`); the cutting is done here, from the
analysis' name-keyed records, for three reasons:

- the binary layer's statistics are mask-aware (the XNOR scale and centring average over the
  *kept* input channels, see :mod:`lightning_bnnprune.quantizers`), so what must hold is
  "sliced layer == gated layer", which only our own layer code (the same ``in_mask`` seam) can
  promise; Torch-Pruning's pruners see a plain ``nn.Conv2d`` and would also need a second trace
  of the live model, whose group indices shift after each cut;
- a module can belong to several groups (a DenseNet BN over a concat of many producers) with
  indices in *original* positions: collecting every group's drops per ``(module, dim)`` first and
  slicing once keeps those positions valid;
- the same slicing replays the :class:`~.record.PruningRecord` on a freshly built model without
  tracing it, which is how pruned models reload.

Exactness (``docs/method.md``, section 5): in eval mode the pruned network's logits equal the
gated network's; :func:`remove_filters` measures it on every call and raises if it fails.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor, nn

from ..introspect import example_batch
from .block_sizes import sync_block_sizes
from .gates import attach_gates, detach_gates, gates_of
from .groups import MIXER, GroupAnalysis
from .rebuild import binarize_spec, shape_manifest, timm_spec
from .record import PruningRecord
from .slicing import IN, OUT, channel_count, is_param_dim, slice_channels

__all__ = ["remove_filters", "resolve_keep", "check_batch"]

KeepSpec = Union[Tensor, Sequence[int], Sequence[bool]]


def check_batch(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Tensor:
    """The exactness check's batch: four samples, seeded with a private generator, so every DDP
    rank checks on the same inputs and the global random state is left alone."""
    return example_batch(model, input_size, batch=4, seed=0)


def _as_keep(name: str, size: int, spec: KeepSpec) -> Tensor:
    t = torch.as_tensor(spec).detach().cpu().flatten()
    if t.numel() == 0:
        t = t.long()  # ``[]``: no channel kept (``min_filters`` still applies)
    if t.dtype == torch.bool or (t.is_floating_point() and t.numel() == size and bool(((t == 0) | (t == 1)).all())):
        if t.numel() != size:
            raise ValueError(f"keep mask for {name!r} has {t.numel()} entries, the group has {size} channels")
        return t.bool()
    if t.is_floating_point():
        raise ValueError(f"keep-set for {name!r} must be channel indices or a 0/1 mask of {size}, got {spec!r}")
    idx = t.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise ValueError(f"keep indices for {name!r} must be in [0, {size}), got {idx.tolist()}")
    keep = torch.zeros(size, dtype=torch.bool)
    keep[idx] = True
    return keep


def resolve_keep(
    model: nn.Module,
    analysis: GroupAnalysis,
    masks: Optional[Mapping[str, KeepSpec]] = None,
    min_filters: int = 1,
) -> Dict[str, Tensor]:
    """``{group name: bool keep mask}`` for every prunable group.

    Explicit ``masks`` (channel indices, or a bool / 0-1 mask) win; other groups take the current
    mask of their attached gate, else keep everything. A group keeps at least
    ``min(min_filters, size)`` channels (:meth:`~.groups.ChannelGroup.min_keep`), and a group
    feeding a grouped conv the same number in every cell: the closed channels whose gate logits
    are highest (the ones the selector was closest to keeping), else the first closed ones, reopen.

    Raises:
        ValueError: on an unknown group name (the message lists the prunable groups), a group the
            analysis refused (the message says why), a malformed keep-set (or one that keeps a
            grouped conv's conv groups unequally), or an analysis with
            no prunable group at all (the message names each refused layer and why).
    """
    masks = dict(masks or {})
    for name in masks:
        if name in analysis.refused:
            raise ValueError(f"group {name!r} cannot be pruned: {analysis.refused[name]}")
        if name not in analysis.names:
            raise ValueError(f"unknown group {name!r}; prunable groups: {', '.join(analysis.names) or '(none)'}")
    if min_filters < 1:
        raise ValueError(f"min_filters must be >= 1, got {min_filters}")
    if not analysis.groups:  # never leave a network silently unpruned
        reasons = "; ".join(f"{k}: {v}" for k, v in analysis.refused.items()) or "it has no binary conv"
        raise ValueError(f"the network has no prunable channel group ({reasons})")
    gates = gates_of(model)
    keep: Dict[str, Tensor] = {}
    for group in analysis.groups:
        gate = gates.get(group.name)
        if group.name in masks:
            k = _as_keep(group.name, group.size, masks[group.name])
            if not group.is_balanced(k):
                raise ValueError(
                    f"keep-set for {group.name!r} must keep the same number of channels in each of its "
                    f"{group.num_parts} cells (it feeds a grouped conv); see ChannelGroup.keep_top"
                )
        elif gate is not None and gate.logits.numel() == group.size:
            k = gate.mask().bool().cpu()
        else:
            k = torch.ones(group.size, dtype=torch.bool)
        score = (gate.logits.detach().cpu().float() if gate is not None and gate.logits.numel() == group.size
                 else -torch.arange(group.size, dtype=torch.float))
        # at least min_filters (whole cells where grouped convs need them), every cell kept alike
        keep[group.name] = group.balance(k, score, min_filters)
    return keep


def _drops(analysis: GroupAnalysis, keep: Mapping[str, Tensor]) -> Dict[Tuple[str, str], Set[int]]:
    """Per ``(module, dim)``, the original channel positions to drop, over all groups."""
    drops: Dict[Tuple[str, str], Set[int]] = {}
    for group in analysis.groups:
        dropped = set(torch.nonzero(~keep[group.name]).flatten().tolist())
        if not dropped:
            continue
        for member in group.members:
            if member.role == MIXER:
                continue  # nothing per channel: it runs on the channels it is given
            # a norm's channels, a producer's filters: dim "out"; a free parameter names itself
            dim = member.role if member.role == IN or is_param_dim(member.role) else OUT
            hit = {i for i, r in zip(member.idxs, member.root_idxs) if r in dropped}
            if hit:
                drops.setdefault((member.module, dim), set()).update(hit)
    return drops


def _logits(out) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot check exactness on a model output of type {type(out).__name__}")


def remove_filters(
    model: nn.Module,
    analysis: GroupAnalysis,
    masks: Optional[Mapping[str, KeepSpec]] = None,
    example_inputs: Optional[Tensor] = None,
    atol: float = 1e-4,
    *,
    min_filters: int = 1,
    timm_name: Optional[str] = None,
    timm_kwargs: Optional[Mapping] = None,
    network_path: str = "",
) -> PruningRecord:
    """Remove the closed filters of ``model`` for real, in place, and prove it changed nothing.

    1. resolve each group's kept channels (:func:`resolve_keep`: explicit ``masks``, else the
       attached gates' 0/1 masks, at least ``min_filters`` kept);
    2. with gates routed to the consumers and set to those masks, compute the eval-mode
       reference logits on ``example_inputs``;
    3. detach the gates and slice every member of every group: producers' output channels (and
       bias), depthwise convs (out, in and ``groups``), batch norms (weight, bias, running
       statistics), consumers' input channels;
    4. recompute the logits and compare.

    Args:
        model: the binarised network, as analysed by ``analysis``.
        analysis: :func:`~.groups.find_channel_groups` of ``model``.
        masks: ``{group name: kept channel indices or bool/0-1 mask}``; groups not named follow
            their gates (or stay whole).
        example_inputs: a batch for the check (default: :func:`check_batch`, a seeded batch at
            the model's published input size).
        atol: the largest allowed ``max |logits_pruned - logits_gated|``.
        min_filters: the fewest channels any group keeps.
        timm_name, timm_kwargs: how to rebuild the unbinarised network with ``timm.create_model``
            (default: read from the model's ``pretrained_cfg``, ``num_classes`` and ``in_chans``).
        network_path: the network's attribute path inside its LightningModule, for
            :func:`~.record.restore_pruned`.

    Returns:
        the :class:`~.record.PruningRecord` of what was cut.

    Raises:
        ValueError: on an unknown or refused group name, or a bad keep-set (nothing is changed).
        RuntimeError: if the pruned logits differ from the gated ones by more than ``atol`` (the
            model is left pruned for inspection).
    """
    keep = resolve_keep(model, analysis, masks, min_filters)
    if example_inputs is None:
        example_inputs = check_batch(model)
    was_training = model.training
    try:
        model.eval()
        gates = attach_gates(model, analysis)
        for name, k in keep.items():
            gates[name].set_mask(k)
        with torch.no_grad():
            reference = _logits(model(example_inputs)).detach().clone()
        detach_gates(model)
        shapes_before = shape_manifest(model)
        params_before = sum(p.numel() for p in model.parameters())
        drops = _drops(analysis, keep)
        removed: List[Tuple[str, str, List[int]]] = []
        for (name, dim), dropped in sorted(drops.items()):
            module = model.get_submodule(name)
            kept = [i for i in range(channel_count(module, dim)) if i not in dropped]
            slice_channels(module, dim, kept)
            removed.append((name, dim, kept))
        sync_block_sizes(model)  # split / slice positions kept in block attributes follow the new widths
        with torch.no_grad():
            pruned = _logits(model(example_inputs))
        diff = float((pruned - reference).abs().max()) if pruned.shape == reference.shape else float("inf")
    finally:
        model.train(was_training)
    name, kwargs = timm_spec(model)
    record = PruningRecord(
        removed=removed,
        groups={n: torch.nonzero(k).flatten().tolist() for n, k in keep.items()},
        group_sizes={g.name: g.size for g in analysis.groups},
        shapes_before=shapes_before,
        shapes=shape_manifest(model),
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        input_size=list(example_inputs.shape[1:]),
        timm_name=timm_name or name,
        timm_kwargs=dict(kwargs, **dict(timm_kwargs or {})),
        binarize_kwargs=binarize_spec(model),
        network_path=network_path,
        max_abs_diff=diff,
        refused=dict(analysis.refused),
    )
    if not diff <= atol:
        raise RuntimeError(
            f"filter removal is not exact: max |logits pruned - logits gated| = {diff:.3g} > atol={atol:g} "
            f"({len(removed)} tensors cut in {sum(1 for k in keep.values() if not bool(k.all()))} groups). "
            "Please report the model; the pruned model is left as it is for inspection."
        )
    return record
