import pytest
import timm
import torch
from lightning import Callback, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from safetensors.torch import save_file
from torchmetrics.classification import MulticlassAccuracy

from lightning_bnnprune.data import DigitsDataModule, FakeDataModule
from lightning_bnnprune.module import ImageClassifier

from helpers import small_trainer


class _RecordLoss(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def _save_state_dict(model, path):
    if path.suffix == ".safetensors":
        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)


def test_loss_goes_down_on_digits(tmp_path):
    seed_everything(0)
    model = ImageClassifier("test_resnet", num_classes=10, lr=3e-3)
    record = _RecordLoss()
    trainer = small_trainer(tmp_path, [record], max_steps=-1, max_epochs=1, limit_train_batches=20,
                            limit_val_batches=2)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    first, last = record.losses[:5], record.losses[-5:]
    assert sum(last) / 5 < sum(first) / 5 - 0.3
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_top5"} == set(
        trainer.logged_metrics
    )
    trainer.test(model, datamodule=DigitsDataModule(batch_size=256), verbose=False)
    assert {"test/loss", "test/acc", "test/acc_top5"} == set(trainer.logged_metrics)
    assert trainer.callback_metrics["test/acc_top5"] >= trainer.callback_metrics["test/acc"]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("model_name", ["test_resnet", "resnet20_cifar"])
@pytest.mark.parametrize("num_classes", [10, 5])
def test_finetune_from_local_file(tmp_path, model_name, suffix, num_classes):
    source = timm.create_model(model_name, num_classes=10)
    path = tmp_path / f"weights{suffix}"
    _save_state_dict(source, path)
    model = ImageClassifier(model_name, num_classes=num_classes, pretrained_file=str(path))
    loaded = model.net.state_dict()
    head = source.pretrained_cfg["classifier"]
    for key, value in source.state_dict().items():
        if key.startswith(f"{head}.") and num_classes != 10:
            assert loaded[key].shape[0] == num_classes  # re-initialised for the new classes
        else:
            assert torch.equal(loaded[key], value), key


def test_finetune_adapts_first_conv_to_in_chans(tmp_path):
    source = timm.create_model("resnet20_cifar")
    _save_state_dict(source, tmp_path / "w.pth")
    model = ImageClassifier("resnet20_cifar", in_chans=1, pretrained_file=tmp_path / "w.pth")
    torch.testing.assert_close(model.net.conv1.weight, source.conv1.weight.sum(dim=1, keepdim=True))


def test_missing_pretrained_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ImageClassifier("resnet20_cifar", pretrained_file=str(tmp_path / "nope.pth"))


def test_checkpoint_reloads_without_the_pretrained_file(tmp_path):
    source = timm.create_model("test_resnet", num_classes=10)
    _save_state_dict(source, tmp_path / "w.pth")
    model = ImageClassifier("test_resnet", pretrained_file=str(tmp_path / "w.pth"), scheduler=None)
    trainer = small_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=FakeDataModule(num_samples=16, batch_size=8))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    (tmp_path / "w.pth").unlink()
    reloaded = ImageClassifier.load_from_checkpoint(tmp_path / "last.ckpt")
    assert reloaded.hparams.pretrained_file is None
    for key, value in model.net.state_dict().items():
        assert torch.equal(reloaded.net.state_dict()[key], value), key


@pytest.mark.parametrize(
    "optimizer, cls, nesterov",
    [
        ("adam", torch.optim.Adam, None),
        ("adamw", torch.optim.AdamW, None),
        ("sgd", torch.optim.SGD, False),
    ],
)
def test_optimizers(optimizer, cls, nesterov):
    model = ImageClassifier(
        "test_resnet", optimizer=optimizer, lr=0.05, weight_decay=1e-4, scheduler=None
    )
    opt = model.configure_optimizers()["optimizer"]
    assert isinstance(opt, cls)
    assert all(group["lr"] == 0.05 for group in opt.param_groups)
    if nesterov is not None:
        assert (
            opt.param_groups[0]["nesterov"] is nesterov and opt.param_groups[0]["momentum"] == 0.9
        )
    # Norms and biases get no weight decay.
    decays = {p.ndim > 1: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {True: 1e-4, False: 0.0}


def test_optimizer_skips_frozen_parameters():
    model = ImageClassifier("test_resnet", scheduler=None)
    model.net.fc.requires_grad_(False)
    optimized = {
        id(p) for g in model.configure_optimizers()["optimizer"].param_groups for p in g["params"]
    }
    assert id(model.net.fc.weight) not in optimized
    assert id(model.net.layer1[0].conv1.weight) in optimized


def test_cosine_schedule_spans_the_run(tmp_path):
    model = ImageClassifier("test_resnet", scheduler="cosine")
    trainer = small_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, datamodule=FakeDataModule(num_samples=16, batch_size=8))
    (config,) = trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert config.interval == "step" and config.scheduler.T_max == 3


@pytest.mark.parametrize("scheduler", [None, "none"])
def test_no_scheduler(scheduler):
    assert ImageClassifier("test_resnet", scheduler=scheduler).configure_optimizers().keys() == {
        "optimizer"
    }


def test_step_scheduler():
    model = ImageClassifier("test_resnet", scheduler="step", lr_step_epochs=7, lr_gamma=0.5)
    config = model.configure_optimizers()["lr_scheduler"]
    assert (
        isinstance(config["scheduler"], torch.optim.lr_scheduler.StepLR)
        and config["interval"] == "epoch"
    )
    assert (config["scheduler"].step_size, config["scheduler"].gamma) == (7, 0.5)


def test_top5_is_clipped_to_num_classes():
    model = ImageClassifier("test_resnet", num_classes=3)
    assert isinstance(model.val_acc_top5, MulticlassAccuracy) and model.val_acc_top5.top_k == 3


def test_drop_rate_none_keeps_the_model_default():
    assert ImageClassifier("nin_cifar").net.features.drop1.p == 0.5
    assert ImageClassifier("nin_cifar", drop_rate=0.1).net.features.drop1.p == 0.1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(optimizer="lamb"), r"optimizer='lamb' is not one of \['adam', 'adamw', 'sgd'\]"),
        (
            dict(scheduler="linear"),
            r"scheduler='linear' is not one of \['cosine', 'step', 'none'\]",
        ),
        (dict(lr=0), "lr=0"),
        (dict(weight_decay=-1), "weight_decay=-1"),
        (dict(momentum=1.0), "momentum=1.0"),
        (dict(label_smoothing=1.0), "label_smoothing=1.0"),
        (dict(num_classes=1), "num_classes=1"),
        (dict(drop_rate=1.5), "drop_rate=1.5"),
        (dict(lr_step_epochs=0), "lr_step_epochs=0"),
        (dict(lr_gamma=0), "lr_gamma=0"),
        (dict(model_kwargs=dict(num_classes=3)), r"model_kwargs repeats \['num_classes'\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        ImageClassifier("test_resnet", **kwargs)
