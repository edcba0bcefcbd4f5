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
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from torch import nn

__all__ = ["SIZE_RULES", "rule_for", "owner_of", "sync_block_sizes"]

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
    """The nearest block around ``module_name`` (itself included) that has a rule, or None."""
    parts = module_name.split(".") if module_name else []
    for end in range(len(parts), -1, -1):
        name = ".".join(parts[:end])
        try:
            block = model.get_submodule(name)
        except AttributeError:
            return None
        if rule_for(block) is not None:
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
