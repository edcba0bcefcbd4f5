"""The ``Binarize`` callback: binary convolutions inside the user's own ``Trainer``, optionally
distilled from the full-precision network they replaced."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from .. import quantizers
from ..binarize import RELU_REPLACEMENTS, binarize_model, binary_layers
from ..introspect import find_networks
from ..layers import BinaryConv2d
from ..pruning.distill import FrozenTeacher, distillation_loss
from ..pruning.schedule import UNITS
from ..quantizers import BinaryDomainWeight
from .checks import check, is_int, is_number
from .wrapping import Captured, StepWrapper, student_output

__all__ = ["Binarize", "FULL_PRECISION"]

#: ``teacher=FULL_PRECISION``: the network as the user handed it in, before the swap.
FULL_PRECISION = "full_precision"
Teacher = Union[None, str, "os.PathLike[str]", nn.Module]


class Binarize(Callback):
    r"""Swap the convolutions of the LightningModule's network(s) for :class:`BinaryConv2d`.

    The swap happens in ``setup("fit")``: before the optimizer is built and before a checkpoint's
    weights are restored, so ``trainer.fit(..., ckpt_path=...)`` finds the same module tree it
    saved. The trained weights become the latent weights. The first conv and the classifier stay
    full precision, found from the model (timm's ``pretrained_cfg["first_conv"]`` and
    ``get_classifier()``, else the first conv and the last linear layer).

    After every optimizer step the latent weights are clipped to ``[-weight_clip, weight_clip]``
    (the usual BNN constraint; it also keeps the clipped straight-through gradient alive).

    Args:
        input_quantizer: activation quantizer alias (``"ste_sign"``, ``"approx_sign"``), module,
            callable, or ``None`` for real-valued inputs (weight-only binarisation).
        kernel_quantizer: weight quantizer alias (``"xnor"``, ``"bdg"``), module or callable.
        kernel_quantizer_kwargs: keyword arguments for an aliased kernel quantizer, e.g.
            ``{"center": True}`` for XNOR or ``{"tau": 1.0, "phi": 0.0}`` for BDG.
        keep_fp: extra ``fnmatch`` patterns of module names that stay full precision.
        networks: attribute paths of the networks to binarise (default: every timm model found
            in the LightningModule, else the whole module).
        weight_clip: bound for the latent weights; ``None`` disables clipping.
        relu: what replaces the ReLUs outside the full-precision layers when inputs are binary:
            ``"identity"`` (default, Bi-Real Net's choice), ``"hardtanh"``, or ``None`` to keep
            them. A ReLU in front of ``sign`` makes every activation ``+1``.
        sparsity: BDG's sparsity constraint (Schiavone et al., ECML-PKDD 2023): the
            target share ``EC`` of weights at the upper value of the ``bdg`` domain. Each step
            adds :math:`\lambda h` with :math:`h = \mathrm{mean}_l\, \mathrm{relu}(s_l - EC)`
            (``s_l`` the upper share of layer ``l``, differentiable through the STE) and the
            adaptive :math:`\lambda = \gamma L / (h (1 - \gamma))` computed without gradient, so
            the term is worth :math:`\gamma / (1 - \gamma)` of the task loss ``L`` while active.
            ``None`` (default) disables it. Needs ``kernel_quantizer="bdg"``.
        sparsity_gamma: :math:`\gamma` in ``(0, 1)``.
        teacher: a full-precision teacher distilled into the binary network through the whole
            fit (ReActNet, Liu et al., ECCV 2020; Real-to-Binary, Martinez et al., ICLR 2020):
            ``"full_precision"``, the network as it is when the convolutions are swapped (the
            weights the user fine-tunes from); an ``nn.Module`` of the user's; or the path of a
            weights file loaded into a copy of the user's network (a state dict, a checkpoint
            with ``state_dict``/``model``, or ``.safetensors``, as timm reads them). ``None``
            (default): no teacher. It is frozen (evaluation mode, no gradient), costs one
            forward per step, is saved in the callback's checkpoint state (a resumed fit distils
            from the same teacher, whatever the network it builds at start) and is one per
            process under DDP. Needs exactly one network.
        teacher_weight: the weight ``w`` of the distillation term added to the user's loss,
            :math:`L + w \, T^2 \mathrm{KL}(\sigma(t/T) \| \sigma(s/T))` (ReActNet's
            distributional loss at ``T = 1``); ``0`` makes no copy and leaves the run exactly
            as without a teacher.
        teacher_temperature: the softmax temperature ``T`` (> 0).
        binary_weights_from: two-step binarisation (ReActNet, Liu et al., ECCV 2020, section 4):
            the activations are binary from the start, the weights only from this step (or
            epoch, see ``binary_weights_unit``); before it every binary conv computes with its
            latent real weights, which step 2 then binarises as they are. Derived from the
            trainer's step at every batch, so a resume at any step continues in the right step;
            the pruning callbacks start no earlier than it. ``None`` (default): binary weights
            from the start.
        binary_weights_unit: ``"steps"`` or ``"epochs"``, the unit of ``binary_weights_from``.

    Raises:
        MisconfigurationException: on an unknown quantizer, a bad ``weight_clip``, a sparsity
            target outside ``(0, 1)`` or without the ``bdg`` quantizer, a network name that
            does not exist, a teacher file that does not exist or does not fit the network, or a
            negative teacher weight.

    Example::

        from lightning import Trainer
        from lightning_bnnprune import Binarize

        trainer = Trainer(callbacks=[Binarize(keep_fp=["*.se.*"])])
        trainer.fit(my_lightning_module, datamodule)

        # fine-tuning: distil from the full-precision network the module was built with, binary
        # activations first, binary weights from step 2000 (ReActNet's two steps)
        trainer = Trainer(callbacks=[Binarize(teacher="full_precision", binary_weights_from=2000)])
    """

    def __init__(
        self,
        input_quantizer: quantizers.Identifier = "ste_sign",
        kernel_quantizer: quantizers.Identifier = "xnor",
        kernel_quantizer_kwargs: Optional[Dict[str, Any]] = None,
        keep_fp: Sequence[str] = (),
        networks: Optional[Sequence[str]] = None,
        weight_clip: Optional[float] = 1.0,
        sparsity: Optional[float] = None,
        sparsity_gamma: float = 0.5,
        relu: Optional[str] = "identity",
        teacher: Teacher = None,
        teacher_weight: float = 1.0,
        teacher_temperature: float = 1.0,
        binary_weights_from: Optional[int] = None,
        binary_weights_unit: str = "steps",
    ) -> None:
        try:
            quantizers.get(input_quantizer)
            quantizers.get(kernel_quantizer, **(kernel_quantizer_kwargs or {}))
        except (ValueError, TypeError) as err:
            raise MisconfigurationException(str(err)) from None
        check(kernel_quantizer is not None,
              f"`kernel_quantizer` is required; registered: {', '.join(quantizers.available())}")
        check(weight_clip is None or weight_clip > 0, f"`weight_clip` must be > 0 or None, got {weight_clip!r}")
        check(relu is None or relu in RELU_REPLACEMENTS,
              f"Unknown `relu` replacement {relu!r}; choose one of: {', '.join(RELU_REPLACEMENTS)} or None")
        if sparsity is not None:
            check(0.0 < float(sparsity) < 1.0, f"`sparsity` (EC) must be in (0, 1) or None, got {sparsity!r}")
            check(isinstance(kernel_quantizer, BinaryDomainWeight) or kernel_quantizer == "bdg",
                  f"`sparsity` constrains the 'bdg' weight domain; got kernel_quantizer={kernel_quantizer!r}")
            check(0.0 < float(sparsity_gamma) < 1.0, f"`sparsity_gamma` must be in (0, 1), got {sparsity_gamma!r}")
        check(is_number(teacher_weight) and teacher_weight >= 0,
              f"`teacher_weight` must be a number >= 0 (0: no teacher), got {teacher_weight!r}")
        check(is_number(teacher_temperature) and teacher_temperature > 0,
              f"`teacher_temperature` must be a number > 0, got {teacher_temperature!r}")
        if isinstance(teacher, (str, os.PathLike)) and str(teacher) != FULL_PRECISION:
            check(os.path.isfile(teacher), f"`teacher` must be {FULL_PRECISION!r}, a module or an existing "
                                           f"weights file; no file {str(teacher)!r}")
        check(teacher is None or isinstance(teacher, (str, os.PathLike, nn.Module)),
              f"`teacher` must be None, {FULL_PRECISION!r}, an nn.Module or a weights file path, "
              f"got {type(teacher).__name__}")
        check(binary_weights_from is None or (is_int(binary_weights_from) and binary_weights_from >= 0),
              f"`binary_weights_from` must be an int >= 0 or None, got {binary_weights_from!r}")
        check(binary_weights_unit in UNITS,
              f"`binary_weights_unit` must be one of: {', '.join(UNITS)}; got {binary_weights_unit!r}")
        check(binary_weights_from is None or input_quantizer is not None,
              "`binary_weights_from` binarises the weights after the activations; it needs an input_quantizer")
        if isinstance(keep_fp, str):
            keep_fp = [keep_fp]
        self.input_quantizer = input_quantizer
        self.kernel_quantizer = kernel_quantizer
        self.kernel_quantizer_kwargs = dict(kernel_quantizer_kwargs or {})
        self.keep_fp = list(keep_fp)
        self.networks = list(networks) if networks else None
        self.weight_clip = weight_clip
        self.relu = relu
        self.sparsity = None if sparsity is None else float(sparsity)
        self.sparsity_gamma = float(sparsity_gamma)
        self.binary_weights_from = binary_weights_from
        self.binary_weights_unit = binary_weights_unit
        self.teacher = teacher
        self.teacher_weight = float(teacher_weight)
        self.teacher_temperature = float(teacher_temperature)
        self.swapped: Dict[str, List[str]] = {}
        self._loss: Optional[torch.Tensor] = None
        self._teacher: Optional[FrozenTeacher] = None
        self._teacher_wrapper: Optional[StepWrapper] = None

    @property
    def distilling(self) -> bool:
        """Whether a teacher is set and weighs anything."""
        return self.teacher is not None and self.teacher_weight > 0

    @property
    def full_precision_teacher(self) -> Optional[FrozenTeacher]:
        """The frozen teacher (None without one): also what a pruning callback's
        ``distill_teacher="full_precision"`` distils from while it retrains."""
        return self._teacher

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        try:
            paths = find_networks(pl_module, self.networks)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from None
        # a pruning callback may take the teacher for its retraining, even at teacher_weight=0
        wanted = any(getattr(cb, "distill_teacher", None) == FULL_PRECISION and getattr(cb, "distill", 0) > 0
                     for cb in trainer.callbacks)
        if self.teacher is not None and (self.teacher_weight > 0 or wanted) and self._teacher is None:
            self._teacher = self._build_teacher(pl_module, paths)
        for path in paths:
            net = pl_module.get_submodule(path) if path else pl_module
            if path in self.swapped or binary_layers(net):
                continue  # already binary: a second fit, or a module saved after binarisation
            self.swapped[path] = binarize_model(
                net,
                input_quantizer=self.input_quantizer,
                kernel_quantizer=self.kernel_quantizer,
                kernel_quantizer_kwargs=self.kernel_quantizer_kwargs,
                keep_fp=self.keep_fp,
                relu=self.relu,
            )
            rank_zero_info(
                f"[Binarize] {path or type(pl_module).__name__}: "
                f"{len(self.swapped[path])} convs -> BinaryConv2d "
                f"({self.input_quantizer} inputs, {self.kernel_quantizer} weights)"
            )

    def _build_teacher(self, pl_module: "pl.LightningModule", paths: Sequence[str]) -> FrozenTeacher:
        """The frozen teacher, made before the convolutions are swapped."""
        check(len(paths) == 1, f"Binarize: a teacher needs exactly one network, found {len(paths)} "
                               f"({', '.join(paths)}); pass networks=[<one of them>]")
        net = pl_module.get_submodule(paths[0]) if paths[0] else pl_module
        if isinstance(self.teacher, nn.Module):
            return FrozenTeacher(self.teacher)
        if binary_layers(net):
            # Already binary (a module saved after binarisation): the teacher can only come from
            # a checkpoint's callback state, which load_state_dict restores next.
            rank_zero_info("[Binarize] the network is already binary: the teacher comes from the checkpoint")
        teacher = FrozenTeacher(net)
        if str(self.teacher) != FULL_PRECISION:
            from timm.models import load_state_dict

            try:
                teacher.net.load_state_dict(load_state_dict(str(self.teacher)))
            except (RuntimeError, KeyError, ValueError) as err:
                raise MisconfigurationException(
                    f"Binarize: teacher file {str(self.teacher)!r} does not fit the network "
                    f"({type(net).__name__}): {str(err).splitlines()[0]}") from None
        return teacher

    def _bdg_layers(self, pl_module: "pl.LightningModule") -> List[BinaryConv2d]:
        return [
            m for m in pl_module.modules()
            if isinstance(m, BinaryConv2d) and isinstance(m.kernel_quantizer, BinaryDomainWeight)
        ]

    # ------------------------------------------------------------------ two-step binarisation
    def binary_weights(self, trainer: "pl.Trainer") -> bool:
        """Whether the weights are binary at the trainer's current step (always, without two steps)."""
        if self.binary_weights_from is None:
            return True
        now = trainer.global_step if self.binary_weights_unit == "steps" else trainer.current_epoch
        return now >= self.binary_weights_from

    def binary_weights_step(self, trainer: "pl.Trainer") -> int:
        """The first optimizer step with binary weights (0 without two steps), for the pruning
        callbacks' start; in epochs, counted with the trainer's batches per epoch."""
        if self.binary_weights_from is None:
            return 0
        if self.binary_weights_unit == "steps":
            return self.binary_weights_from
        return self.binary_weights_from * max(1, int(trainer.num_training_batches) // trainer.accumulate_grad_batches)

    def _set_weights(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.binary_weights_from is None:
            return  # one step: the layers' flag stays False, no walk over the modules every batch
        real = not self.binary_weights(trainer)
        for module in pl_module.modules():
            if isinstance(module, BinaryConv2d):
                module.real_weights = real

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._set_weights(trainer, pl_module)
        if self.binary_weights_from is not None and not self.binary_weights(trainer):
            rank_zero_info(f"[Binarize] two steps: binary activations with real weights until "
                           f"{self.binary_weights_unit[:-1]} {self.binary_weights_from}, then binary weights")

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._set_weights(trainer, pl_module)

    @override
    def on_validation_start(self, trainer, pl_module) -> None:
        self._set_weights(trainer, pl_module)

    @override
    def on_test_start(self, trainer, pl_module) -> None:
        self._set_weights(trainer, pl_module)

    @override
    def on_predict_start(self, trainer, pl_module) -> None:
        self._set_weights(trainer, pl_module)

    # ------------------------------------------------------------------ teacher
    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._teacher is None:
            return
        check(not binary_layers(self._teacher.net),
              "Binarize: the teacher is binary (the network was binarised before this fit and no "
              "checkpoint held the teacher); pass teacher= a full-precision module or weights file")
        self._teacher.to(pl_module.device)
        if not self.distilling:
            return  # kept for a pruning callback's retraining only
        path = find_networks(pl_module, self.networks)[0]
        net = pl_module.get_submodule(path) if path else pl_module

        def add_distillation(loss: Tensor, captured: Optional[Captured]) -> Tensor:
            args, kwargs, student = student_output(captured, "Binarize", path, "teacher_weight")
            kd = distillation_loss(student, self._teacher(*args, **kwargs), self.teacher_temperature)
            pl_module.log("train/teacher_kd", kd.detach(), on_step=True, on_epoch=False)
            return loss + self.teacher_weight * kd

        self._teacher_wrapper = StepWrapper(pl_module, net, lambda: True, add_distillation)

    def _remove_teacher_wrapper(self) -> None:
        if self._teacher_wrapper is not None:
            self._teacher_wrapper.remove()
            self._teacher_wrapper = None

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_teacher_wrapper()
        if not self.binary_weights(trainer):
            rank_zero_warn(f"[Binarize] the fit ended at {self.binary_weights_unit[:-1]} "
                           f"{trainer.global_step if self.binary_weights_unit == 'steps' else trainer.current_epoch}, "
                           f"before binary_weights_from={self.binary_weights_from}: the weights are still real-valued")

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._remove_teacher_wrapper()

    @override
    def state_dict(self) -> Dict[str, Any]:
        return {"teacher": self._teacher.state_dict()} if self._teacher is not None else {}

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # The teacher of the first sitting, not the network this process happened to build.
        if self._teacher is not None and "teacher" in state_dict:
            self._teacher.load_state_dict(state_dict["teacher"])

    @override
    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self.sparsity is not None:
            self._loss = loss.detach()

    @override
    def on_after_backward(self, trainer, pl_module) -> None:
        """Add the gradient of BDG's sparsity term to the latent weights.

        The term depends on the weights only, so its gradient is computed on its own graph with
        ``torch.autograd.grad`` instead of being added to the user's loss: the user's
        ``training_step`` stays untouched and there is still one backward through the network.
        Under DDP the loss is averaged over ranks first so every rank adds the same gradient.
        """
        if self.sparsity is None or self._loss is None:
            return
        layers = self._bdg_layers(pl_module)
        if not layers:
            return
        shares = torch.stack([m.kernel_quantizer.upper_share(m.weight) for m in layers])
        h = torch.relu(shares - self.sparsity).mean()
        loss = trainer.strategy.reduce(self._loss, reduce_op="mean")
        pl_module.log("bdg/upper_share", shares.detach().mean(), on_step=True, on_epoch=False)
        pl_module.log("bdg/h", h.detach(), on_step=True, on_epoch=False)
        if h.item() <= 0:
            return
        lam = self.sparsity_gamma * loss / (h.detach() * (1.0 - self.sparsity_gamma))
        weights = [m.weight for m in layers]
        grads = torch.autograd.grad(lam * h, weights)
        for w, g in zip(weights, grads):
            w.grad = g if w.grad is None else w.grad + g

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.weight_clip is None:
            return
        with torch.no_grad():
            for module in pl_module.modules():
                if isinstance(module, BinaryConv2d):
                    module.weight.clamp_(-self.weight_clip, self.weight_clip)

    @property
    def num_swapped(self) -> int:
        return sum(len(v) for v in self.swapped.values())
