"""Channel counts that timm blocks keep in attributes, and how to re-derive them after a cut.

Some blocks cut their features at a position written in the block, not read from the tensor:
``x.split(self.expand_chs // 2)`` (CSPNet's cross stage), ``torch.split(out, self.width)``
(Res2Net), ``x[:, :self.num_1x1_c]`` (DPN's dual path), ``x[:, 0:self.in_channels] + shortcut``
(ReXNet's channel-padded residual), ``torch.split(x, self.splits)`` (MixNet's mixed kernels),
``torch.split(x, self.in_channels // self.num_paths)`` (SKNet's selective kernel). After filters
are removed those numbers must follow the layers' new widths, or the block cuts in the wrong place. Each rule here derives a block's numbers from its
layers' shapes, so the same rule serves the removal and the replay of a record on a freshly built
model (:func:`sync_block_sizes`), and nothing extra is stored.

A split into equal parts by one number (``split(n)``, ``chunk``) also needs every part to lose the
same number of channels; :mod:`.groups` asks for that. A block with such a cut but no rule here is
refused by name (its cut position cannot follow).

Where no layer's shape gives the position, it moves with the cut itself (:data:`POSITION_RULES`):
DPN's plain blocks (no "b") make the residual and the dense increment in one conv, ``c1x1_c``, and
cut its output at ``num_1x1_c``; after a cut that keeps positions ``kept`` of that output, the
position is the number of kept positions below it. The block is then a member of its layer's
channel groups (:func:`position_owner`) and is cut, through :mod:`.slicing`, with the same kept
positions as the layer, so the removal and the replay of a record move it alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

from torch import nn

__all__ = [
    "SIZE_RULES", "POSITION_RULES", "PositionRule", "rule_for", "position_rule", "owner_of", "position_owner",
    "sync_block_sizes", "position_count", "cut_position",
]

Rule = Callable[[nn.Module], Optional[Dict[str, Any]]]


def _cross_stage(block: nn.Module) -> Optional[Dict[str, int]]:
    # forward: x.split(self.expand_chs // 2); conv_exp makes the channels that are split
    return {"expand_chs": block.conv_exp.conv.out_channels}


def _res2net(block: nn.Module) -> Optional[Dict[str, int]]:
    # forward: torch.split(out, self.width, 1) over conv1's scale * width channels
    return {"width": block.conv1.out_channels // block.scale}


def _dual_path(block: nn.Module) -> Optional[Dict[str, int]]:
    # forward: x_s[:, :self.num_1x1_c] and out[:, :self.num_1x1_c]; only the "b" blocks (separate
    # c1x1_c1 / c1x1_c2 convs) give the residual width as a layer's shape
    if getattr(block, "c1x1_c1", None) is None or getattr(block, "c1x1_c2", None) is None:
        return None
    return {"num_1x1_c": block.c1x1_c1.out_channels, "inc": block.c1x1_c2.out_channels}


def _rexnet(block: nn.Module) -> Optional[Dict[str, int]]:
    # forward: torch.cat([x[:, 0:self.in_channels] + shortcut, x[:, self.in_channels:]])
    first = block.conv_exp if block.conv_exp is not None else block.conv_dw
    return {"in_channels": first.conv.in_channels, "out_channels": block.conv_pwl.conv.out_channels}


def _mixed_conv(block: nn.Module) -> Optional[Dict[str, Any]]:
    # forward: torch.split(x, self.splits, 1), one conv per part (MixNet's mixed kernel sizes)
    convs = list(block.values())
    return {"splits": [c.in_channels for c in convs], "in_channels": sum(c.in_channels for c in convs),
            "out_channels": sum(c.out_channels for c in convs)}


def _selective_kernel(block: nn.Module) -> Optional[Dict[str, int]]:
    # forward: torch.split(x, self.in_channels // self.num_paths) when the input is split by path
    first = block.paths[0].conv
    ins = sum(p.conv.in_channels for p in block.paths) if block.split_input else first.in_channels
    return {"in_channels": ins, "out_channels": first.out_channels}


def _split_attn(block: nn.Module) -> Optional[Dict[str, int]]:
    # nothing to follow: the real forward reads its widths from the tensor; the rule vouches for the
    # splits of its trace-time form (:mod:`.traceable`), which cut where the tensor's width says
    return {}


def _rules() -> Dict[type, Rule]:
    rules: Dict[type, Rule] = {}
    try:
        from timm.layers.mixed_conv2d import MixedConv2d
        from timm.layers.selective_kernel import SelectiveKernel
        from timm.layers.split_attn import SplitAttn
        from timm.models import cspnet, dpn, res2net, rexnet
    except ImportError:  # pragma: no cover  (timm without these models: nothing to follow)
        return rules
    rules[cspnet.CrossStage] = _cross_stage
    rules[cspnet.CrossStage3] = _cross_stage
    rules[res2net.Bottle2neck] = _res2net
    rules[dpn.DualPathBlock] = _dual_path
    rules[rexnet.LinearBottleneck] = _rexnet
    rules[MixedConv2d] = _mixed_conv
    rules[SelectiveKernel] = _selective_kernel
    rules[SplitAttn] = _split_attn
    return rules


SIZE_RULES: Dict[type, Rule] = _rules()


@dataclass(frozen=True)
class PositionRule:
    """A block cuts ``layer``'s output channels at ``block.<position>``; ``block.<rest>`` holds the
    channels past it (``position + rest`` is the layer's width)."""

    layer: str
    position: str
    rest: str


def _dual_path_position(block: nn.Module) -> Optional[PositionRule]:
    # forward: out1 = x[:, :self.num_1x1_c], out2 = x[:, self.num_1x1_c:] of c1x1_c's conv; the same
    # position cuts the projection's output (or the block's input), whose first num_1x1_c channels
    # are added to out1: one channel group, so they keep as many as c1x1_c's first part
    if getattr(block, "c1x1_c1", None) is not None or not isinstance(getattr(block.c1x1_c, "conv", None), nn.Conv2d):
        return None
    return PositionRule("c1x1_c.conv", "num_1x1_c", "inc")


def _position_rules() -> Dict[type, Callable[[nn.Module], Optional[PositionRule]]]:
    try:
        from timm.models import dpn
    except ImportError:  # pragma: no cover
        return {}
    return {dpn.DualPathBlock: _dual_path_position}


POSITION_RULES = _position_rules()


def position_rule(block: nn.Module) -> Optional[PositionRule]:
    """The block's :class:`PositionRule`, if it has one that holds for it now."""
    rule = POSITION_RULES.get(type(block))
    try:
        found = rule(block) if rule is not None else None
        layer = block.get_submodule(found.layer) if found is not None else None
    except AttributeError:
        return None
    if found is None or getattr(block, found.position) + getattr(block, found.rest) != layer.out_channels:
        return None
    return found


def position_owner(model: nn.Module, layer_name: str) -> Optional[str]:
    """The block whose :class:`PositionRule` cuts ``layer_name``'s output, or None."""
    parts = layer_name.split(".")
    for end in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:end])
        try:
            rule = position_rule(model.get_submodule(name))
        except AttributeError:
            return None
        if rule is not None and ".".join(parts[end:]) == rule.layer:
            return name
    return None


def position_count(block: nn.Module) -> int:
    """The width of the output the block's position indexes (its layer's, before any cut of it)."""
    rule = POSITION_RULES[type(block)](block)
    return getattr(block, rule.position) + getattr(block, rule.rest)


def cut_position(block: nn.Module, kept: Sequence[int]) -> None:
    """Move the block's position after its layer keeps output positions ``kept`` (sorted)."""
    rule = POSITION_RULES[type(block)](block)
    position = sum(1 for k in kept if k < getattr(block, rule.position))
    setattr(block, rule.position, position)
    setattr(block, rule.rest, len(kept) - position)


def rule_for(block: nn.Module) -> Optional[Rule]:
    """The block's rule, if it has one that holds for it now (the derived numbers equal the
    block's own: a rule that does not describe this configuration is no rule)."""
    rule = SIZE_RULES.get(type(block))
    if rule is None:
        return None
    try:
        derived = rule(block)
    except AttributeError:
        return None
    if derived is None or any(getattr(block, k, None) != v for k, v in derived.items()):
        return None
    return rule


def owner_of(model: nn.Module, module_name: str) -> Optional[str]:
    """The nearest block around ``module_name`` (itself included) that has a rule (a size or a
    position rule), or None."""
    parts = module_name.split(".") if module_name else []
    for end in range(len(parts), -1, -1):
        name = ".".join(parts[:end])
        try:
            block = model.get_submodule(name)
        except AttributeError:
            return None
        if rule_for(block) is not None or position_rule(block) is not None:
            return name
    return None


def sync_block_sizes(model: nn.Module) -> None:
    """Set every ruled block's numbers from its layers' current shapes (idempotent)."""
    for block in model.modules():
        rule = SIZE_RULES.get(type(block))
        try:
            derived = rule(block) if rule is not None else None
        except AttributeError:  # a configuration the rule does not describe (rule_for refused it)
            derived = None
        for key, value in (derived or {}).items():
            setattr(block, key, value)
