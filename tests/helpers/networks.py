"""Networks built, gated and measured outside a Trainer: binarised timm models with random norms
(so that a wrong cut or a wrong fold shows in the logits), seeded random closings, inputs, and the
snapshots the resume tests compare."""
from __future__ import annotations

from typing import Dict

import timm
import torch
from torch import nn

from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.pruning.gates import attach_gates, gates_of

__all__ = ["TIMM_KWARGS", "binary_net", "close_random", "gate_logits", "inputs", "main_params", "num_params",
           "randomise_norms"]

# timm's VGG head is a 7x7 conv to 4096 filters (102M weights) that no 32x32 test needs; a narrower
# hidden layer keeps the same code path (ConvMlp, binarised, pruned) at 1/16 of the size. It also
# exercises a constructor keyword that the record must carry to rebuild the model.
TIMM_KWARGS = {"vgg11": {"mlp_ratio": 0.0625}}


def randomise_norms(net: nn.Module) -> nn.Module:
    """Random batch-norm statistics and affine terms (seeded by the caller), so that a wrong cut
    or a wrong fold shows in the logits."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return net


def binary_net(name: str, seed: int = 0) -> nn.Module:
    """A binarised timm model (10 classes, :data:`TIMM_KWARGS` for its name) in eval mode with
    random BN statistics (so a wrong cut shows)."""
    torch.manual_seed(seed)
    net = timm.create_model(name, num_classes=10, **TIMM_KWARGS.get(name, {}))
    binarize_model(net)
    return randomise_norms(net).eval()


def close_random(net, analysis, seed=0, low=0.3, high=0.5):
    """Attach gates and close a seeded random 30-50% of every prunable group."""
    g = torch.Generator().manual_seed(seed)
    gates = attach_gates(net, analysis)
    masks = {}
    for group in analysis.groups:
        share = low + (high - low) * float(torch.rand(1, generator=g))
        p = group.num_parts  # a group feeding a grouped conv closes as many channels in every cell
        closed = min(p * int(round(share * group.size / p)), group.capacity())
        keep = ~group.keep_top(torch.rand(group.size, generator=g), closed)
        gates[group.name].set_mask(keep)
        masks[group.name] = keep
    return masks


def inputs(n=2, seed=1):
    """``n`` seeded 3x32x32 images."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def num_params(net):
    """The network's parameters, its filter gates left out."""
    return sum(p.numel() for n, p in net.named_parameters() if "filter_gate" not in n)


def main_params(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A copy of every parameter but the filter gates', by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if "filter_gate" not in n}


def gate_logits(module: nn.Module) -> Dict[str, torch.Tensor]:
    """A copy of the gate logits of ``module.net`` by group name (the owner conv's name inside the network)."""
    return {n: g.logits.detach().clone() for n, g in gates_of(module.net).items()}
