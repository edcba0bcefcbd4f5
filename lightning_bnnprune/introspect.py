"""What the library reads off a user's model: where the network is, its first conv and its
classifier (which stay full precision), and the input size it sees.

Everything here is found from the model (timm's ``pretrained_cfg`` and ``get_classifier()``,
falling back to the first conv and the last linear layer) and from the data, never from
hard-coded layer names, so the callbacks work on any timm model and on plain ``nn.Module`` s.

**The input size** (for tracing the channel groups, checking a removal and counting MACs): a timm
model's ``pretrained_cfg["input_size"]`` is what it was *published* at (224x224 for most), not
what it is trained on here (32x32 CIFAR, digits...); MACs scale with the input's area, so the size
comes from the data whenever there is data (:func:`input_size_of`), and from the published size
(:func:`published_input_size`) only when there is none.
"""
from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn

__all__ = [
    "DEFAULT_INPUT_SIZE", "classifier_names", "example_batch", "find_networks", "first_batch_size",
    "first_conv_name", "input_size_of", "published_input_size",
]

#: The input size of a network that says nothing about it (ImageNet's, as timm's default).
DEFAULT_INPUT_SIZE = (3, 224, 224)


# ------------------------------------------------------------------ the network and its ends
def first_conv_name(model: nn.Module) -> Optional[str]:
    """The input conv: timm's ``pretrained_cfg["first_conv"]`` (the first conv inside it, when it
    names a wrapper), else the first ``nn.Conv2d`` in module order; None without a conv."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("first_conv")
    for name in [names] if isinstance(names, str) else list(names or []):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        # timm sometimes names a wrapper (e.g. ConvNormAct): take the first conv inside it.
        for sub_name, sub in module.named_modules():
            if isinstance(sub, nn.Conv2d):
                return f"{name}.{sub_name}" if sub_name else name
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def classifier_names(model: nn.Module) -> Set[str]:
    """The classifier: timm's ``get_classifier()``, else the last ``nn.Linear``."""
    by_id = {id(m): n for n, m in model.named_modules()}
    heads: Set[str] = set()
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        if isinstance(head, nn.Module) and id(head) in by_id:
            heads.add(by_id[id(head)])
    if not heads:
        last_linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        heads.update(last_linear[-1:])
    return heads


def find_networks(module: nn.Module, names: Optional[Sequence[str]] = None) -> List[str]:
    """Attribute paths of the networks to binarise inside ``module`` (``""`` for ``module`` itself).

    With ``names`` given they are checked and returned. Otherwise every outermost timm model
    (anything with a ``pretrained_cfg`` and a ``get_classifier``) is a network; if there is none,
    ``module`` itself is.
    """
    if names:
        for name in names:
            try:
                module.get_submodule(name)
            except AttributeError:
                children = [n for n, _ in module.named_children()]
                raise ValueError(
                    f"network {name!r} not found in {type(module).__name__}; "
                    f"its children are: {', '.join(children) or '(none)'}"
                ) from None
        return list(names)
    found: List[str] = []
    for name, sub in module.named_modules():
        if hasattr(sub, "pretrained_cfg") and callable(getattr(sub, "get_classifier", None)):
            if not any(name == f or name.startswith(f + ".") or f == "" for f in found):
                found.append(name)
    return found or [""]


# ------------------------------------------------------------------ the input size
def published_input_size(net: nn.Module) -> Tuple[int, ...]:
    """``net.pretrained_cfg["input_size"]`` (timm), else :data:`DEFAULT_INPUT_SIZE`.

    >>> published_input_size(nn.Conv2d(3, 8, 3))
    (3, 224, 224)
    """
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", DEFAULT_INPUT_SIZE))


def example_batch(net: nn.Module, input_size: Optional[Sequence[int]] = None, batch: int = 1,
                   seed: Optional[int] = None) -> torch.Tensor:
    """A random batch ``[batch, *input_size]`` on ``net``'s device (default size:
    :func:`published_input_size`).

    Args:
        seed: ``None`` draws from torch's global generator (tracing only needs the shape); an int
            draws from a private generator, so every DDP rank gets the same batch and the global
            random state is left alone (the removal's exactness check).
    """
    size = tuple(input_size) if input_size is not None else published_input_size(net)
    device = next(net.parameters()).device
    if seed is None:
        return torch.randn(batch, *size, device=device)
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed)).to(device)


def _shape_of(batch: Any) -> Optional[Tuple[int, ...]]:
    """``(C, H, W)`` of the first 4-D tensor in a batch (``x``, ``(x, y)``, ``{"image": x}``...)."""
    if isinstance(batch, torch.Tensor):
        return tuple(batch.shape[1:]) if batch.ndim == 4 else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        shape = _shape_of(item)
        if shape is not None:
            return shape
    return None


def first_batch_size(trainer: Any) -> Optional[Tuple[int, ...]]:
    """``(C, H, W)`` of the first training batch the trainer's fit will draw, or None.

    Reads one batch of the training dataloader (the datamodule's or the one given to ``fit``)
    inside :func:`torch.random.fork_rng`, so the run's random draws (shuffle, augmentation)
    are the same as if it had not looked.
    """
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    if source is None or not source.is_defined():
        return None
    with torch.random.fork_rng(devices=[]):
        try:
            loader = source.dataloader()
            batch = next(iter(loader))
        except Exception:  # noqa: BLE001  (no data yet: the caller falls back)
            return None
    return _shape_of(batch)


def input_size_of(
    net: nn.Module,
    given: Optional[Sequence[int]] = None,
    pl_module: Any = None,
    trainer: Any = None,
) -> Tuple[int, ...]:
    """The ``(C, H, W)`` of one input of ``net``, from the first source that knows it:

    1. ``given`` (a callback's ``input_size=``);
    2. ``pl_module.example_input_array``;
    3. the first training batch of ``trainer`` (:func:`first_batch_size`);
    4. :func:`published_input_size`.
    """
    if given is not None:
        return tuple(int(v) for v in given)
    example = getattr(pl_module, "example_input_array", None) if pl_module is not None else None
    if isinstance(example, torch.Tensor) and example.ndim == 4:
        return tuple(example.shape[1:])
    if trainer is not None:
        shape = first_batch_size(trainer)
        if shape is not None:
            return shape
    return published_input_size(net)


@torch.no_grad()
def forward_with_hooks(model: nn.Module, modules: Mapping[str, nn.Module], hook: Callable[[str, tuple, Any], None],
                       example_inputs: torch.Tensor) -> None:
    """One forward of ``example_inputs[:1]`` in evaluation mode, without gradient, calling
    ``hook(name, inputs, output)`` as each of ``modules`` runs (what a layer sees: its map size,
    its output pixels); the model's mode comes back and the hooks go, whatever happens."""
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: hook(name, args, out))
               for name, m in modules.items()]
    was_training = model.training
    try:
        model.eval()
        model(example_inputs[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
