"""``ImageClassifier``: a timm model trained with cross-entropy in a LightningModule."""

from pathlib import Path
from typing import Any

import timm
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from timm.models import get_pretrained_cfg, load_state_dict
from timm.optim import create_optimizer_v2
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

import lightning_bnnprune.models  # noqa: F401  (registers the *_cifar names in timm)

__all__ = ["ImageClassifier"]

# Our names -> timm's optimizer names ('sgd' in timm is Nesterov; 'momentum' is torch's SGD).
_OPTIMIZERS = {"adam": "adam", "adamw": "adamw", "sgd": "momentum"}
_SCHEDULERS = ("cosine", "step", "none")
# Arguments ImageClassifier passes to timm itself; model_kwargs must not repeat them.
_RESERVED_MODEL_KWARGS = (
    "pretrained",
    "pretrained_cfg_overlay",
    "num_classes",
    "in_chans",
    "drop_rate",
)


def _file_num_classes(model_name: str, path: str) -> int | None:
    """Classes of the classifier stored in a weights file, or None if it holds no classifier."""
    cfg = get_pretrained_cfg(model_name)
    names = cfg.classifier if cfg is not None else None
    state_dict = load_state_dict(path)
    for name in (names,) if isinstance(names, str) else (names or ()):
        weight = state_dict.get(f"{name}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def _wraps_in_ddp(trainer: Any) -> bool:
    """Whether ``trainer``'s strategy wraps the module in ``DistributedDataParallel``."""
    from lightning.pytorch.strategies import DDPStrategy

    return trainer is not None and isinstance(trainer.strategy, DDPStrategy)


def _call_net(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x)


class ImageClassifier(LightningModule):
    """Image classification around ``timm.create_model``.

    The network is ``self.net``, a plain timm model, so callbacks can find its first conv
    (``net.pretrained_cfg["first_conv"]``) and classifier (``net.get_classifier()``) and swap its
    layers in ``setup("fit")``: the optimizer is built only in ``configure_optimizers``, from the
    parameters that require gradients at that moment.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_top5``, ``test/loss``,
    ``test/acc``, ``test/acc_top5`` (top-5 is top-``min(5, num_classes)``); ``train/*`` every
    step, the others per epoch.

    Args:
        model_name: Any timm model name, including this package's ``resnet18_cifar``,
            ``resnet20_cifar``, ``vgg11_cifar`` and ``nin_cifar``.
        num_classes: Classifier outputs.
        in_chans: Input channels.
        pretrained: Load the model's published timm weights (needs internet); implied by
            ``pretrained_file``.
        pretrained_file: Local weights (a state dict, a checkpoint dict with ``state_dict`` /
            ``model``, or ``.safetensors``) loaded by timm's own loader. A classifier whose size
            differs from ``num_classes`` is dropped and re-initialised, and a first conv is adapted
            to ``in_chans``, as timm does for its published weights.
        drop_rate: Dropout rate passed to the model; None keeps the model's default.
        model_kwargs: Extra keyword arguments for ``timm.create_model``.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (with ``momentum``, not Nesterov), built
            by timm; 1-D parameters (norms, biases, per-filter scales) get no weight decay.
        lr: Learning rate.
        weight_decay: Weight decay of the >= 2-D parameters.
        momentum: SGD momentum.
        scheduler: ``"cosine"`` (to 0 over ``trainer.estimated_stepping_batches``, stepped every
            batch), ``"step"`` (``lr_gamma`` every ``lr_step_epochs`` epochs) or ``"none"`` / None.
        lr_step_epochs: Epochs between decays of the step schedule.
        lr_gamma: Decay factor of the step schedule.
        label_smoothing: Cross-entropy label smoothing in [0, 1).
        channels_last: Feed 4-D inputs to the network in ``torch.channels_last`` memory format
            (the layers follow the input's format). On CPU (oneDNN) it makes a ResNet-20 training
            step about 1.2x faster, binary or not; the results equal the contiguous format's up
            to float rounding. ``False`` keeps the inputs as the data loader made them. Under
            DDP the 4-D weights are made ``channels_last`` too (in ``configure_model``, before
            DDP wraps the module), so that their gradients and DDP's buckets share one layout.
        compile: Run the network's training forward and backward through ``torch.compile``. The
            module tree is untouched (same layers for the callbacks to swap, gate and prune, same
            state-dict keys, plain copies and pickles): only ``self(x)`` in a training step goes
            through the compiled function; evaluation and every callback's own calls of the
            network stay eager. It compiles at the first step and again whenever a callback
            changes the network (phases, filter removal), so it pays off on long runs only (see
            ``benchmarks/results/throughput.md``). On CPU it needs a C++ compiler.
        compile_kwargs: Keyword arguments for ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``).

    Raises:
        MisconfigurationException: If ``optimizer`` / ``scheduler`` is unknown, a number is out of
            range or ``model_kwargs`` repeats an explicit argument.
        FileNotFoundError: If ``pretrained_file`` does not exist.

    Example::

        from lightning import Trainer
        from lightning_bnnprune.data import DigitsDataModule
        from lightning_bnnprune.module import ImageClassifier

        model = ImageClassifier("resnet20_cifar", num_classes=10, lr=1e-3)
        Trainer(max_epochs=5).fit(model, datamodule=DigitsDataModule())
    """

    def __init__(
        self,
        model_name: str = "resnet20_cifar",
        num_classes: int = 10,
        in_chans: int = 3,
        pretrained: bool = False,
        pretrained_file: str | Path | None = None,
        drop_rate: float | None = None,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str | None = "cosine",
        lr_step_epochs: int = 30,
        lr_gamma: float = 0.1,
        label_smoothing: float = 0.0,
        channels_last: bool = True,
        compile: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in _OPTIMIZERS:
            raise MisconfigurationException(
                f"optimizer={optimizer!r} is not one of {sorted(_OPTIMIZERS)}"
            )
        if (scheduler or "none") not in _SCHEDULERS:
            raise MisconfigurationException(
                f"scheduler={scheduler!r} is not one of {list(_SCHEDULERS)} or None"
            )
        if num_classes < 2:
            raise MisconfigurationException(f"num_classes={num_classes} must be >= 2")
        if lr <= 0:
            raise MisconfigurationException(f"lr={lr} must be > 0")
        if weight_decay < 0:
            raise MisconfigurationException(f"weight_decay={weight_decay} must be >= 0")
        if not 0.0 <= momentum < 1.0:
            raise MisconfigurationException(f"momentum={momentum} must be in [0, 1)")
        if lr_step_epochs < 1:
            raise MisconfigurationException(f"lr_step_epochs={lr_step_epochs} must be >= 1")
        if not 0.0 < lr_gamma <= 1.0:
            raise MisconfigurationException(f"lr_gamma={lr_gamma} must be in (0, 1]")
        if not 0.0 <= label_smoothing < 1.0:
            raise MisconfigurationException(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if drop_rate is not None and not 0.0 <= drop_rate < 1.0:
            raise MisconfigurationException(f"drop_rate={drop_rate} must be in [0, 1) or None")
        repeated = sorted(set(model_kwargs or {}) & set(_RESERVED_MODEL_KWARGS))
        if repeated:
            raise MisconfigurationException(
                f"model_kwargs repeats {repeated}; pass them as ImageClassifier arguments"
            )
        self.save_hyperparameters()

        create_kwargs = dict(model_kwargs or {})  # a copy: hparams must keep what the user passed
        if pretrained_file is not None:
            pretrained_file = str(pretrained_file)
            if not Path(pretrained_file).is_file():
                raise FileNotFoundError(f"pretrained_file={pretrained_file!r} does not exist")
            # timm keeps a file's classifier only if the model's num_classes equals the
            # pretrained cfg's, so tell it what the file holds, not the registry default.
            overlay: dict[str, Any] = dict(file=pretrained_file)
            file_classes = _file_num_classes(model_name, pretrained_file)
            if file_classes is not None:
                overlay["num_classes"] = file_classes
            create_kwargs["pretrained_cfg_overlay"] = overlay
        if drop_rate is not None:
            create_kwargs["drop_rate"] = drop_rate
        self.net = timm.create_model(
            model_name,
            pretrained=pretrained or pretrained_file is not None,
            num_classes=num_classes,
            in_chans=in_chans,
            **create_kwargs,
        )

        if compile_kwargs and not compile:
            raise MisconfigurationException("compile_kwargs is set but compile=False; set compile=True")

        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        top_k = min(5, num_classes)
        # average="micro": the usual accuracy over samples (torchmetrics defaults to per-class).
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc_top5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")

    def configure_model(self) -> None:
        # With channels_last inputs a convolution's weight gradient comes out channels_last. DDP
        # lays out its gradient buckets after the parameters' strides when it wraps the module
        # (right after this hook): contiguous weights make every step copy each such gradient
        # into the bucket's layout ("Grad strides do not match bucket view strides"), so give
        # the 4-D weights the gradients' layout first (the callbacks have swapped layers by now).
        if self.hparams.get("channels_last") and _wraps_in_ddp(self._trainer):
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.get("channels_last") and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.hparams.get("compile") and self.training and torch.is_grad_enabled():
            return self._compiled_call()(self.net, x)
        return self.net(x)

    def _compiled_call(self):
        # Not torch.compile(self.net): an OptimizedModule would prefix every state-dict key and
        # hide the layers from the callbacks. The network is an argument, so a callback that
        # swaps or cuts layers only triggers dynamo's guards (a recompile), never a stale graph.
        compiled = self.__dict__.get("_compiled_net_call")
        if compiled is None:
            compiled = torch.compile(_call_net, **(self.hparams.get("compile_kwargs") or {}))
            self.__dict__["_compiled_net_call"] = compiled
        return compiled

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles (deepcopy, spawn launchers) recompile on their own.
        state = super().__getstate__()
        state.pop("_compiled_net_call", None)
        return state

    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return self.criterion(logits, y), logits, y

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        loss, logits, y = self._shared_step(batch)
        self.train_acc(logits, y)
        # Per step (Lightning's default here): pruning phases end on step counts, not epochs.
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits, y = self._shared_step(batch)
        self.val_acc(logits, y)
        self.val_acc_top5(logits, y)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)
        self.log("val/acc_top5", self.val_acc_top5, on_epoch=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits, y = self._shared_step(batch)
        self.test_acc(logits, y)
        self.test_acc_top5(logits, y)
        self.log("test/loss", loss, on_epoch=True, sync_dist=True)
        self.log("test/acc", self.test_acc, on_epoch=True, prog_bar=True)
        self.log("test/acc_top5", self.test_acc_top5, on_epoch=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # Built here, not in __init__: callbacks may have swapped layers or frozen parameters
        # in setup().
        optimizer = create_optimizer_v2(
            self,
            opt=_OPTIMIZERS[hp.optimizer],
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            momentum=hp.momentum,
        )
        scheduler = hp.scheduler or "none"
        if scheduler == "none":
            return {"optimizer": optimizer}
        if scheduler == "cosine":
            total_steps = self.trainer.estimated_stepping_batches
            if total_steps == float("inf"):
                raise MisconfigurationException(
                    "scheduler='cosine' needs max_steps or max_epochs on the Trainer"
                )
            lr_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(1, int(total_steps))
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"},
            }
        lr_scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=hp.lr_step_epochs, gamma=hp.lr_gamma
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": lr_scheduler, "interval": "epoch"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The weights are in the checkpoint: reloading it must not need (or download) the
        # original pretrained weights, which may not exist on the machine that reloads.
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if hparams is not None:
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = {
                **hparams,
                "pretrained": False,
                "pretrained_file": None,
            }
