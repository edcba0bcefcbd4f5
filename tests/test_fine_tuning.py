"""The field's fine-tuning recipe in a real Trainer on a real timm model.

``Binarize(teacher=...)``: the full-precision network distilled into the binary one: weight 0
changes nothing, the teacher is the network as the user handed it in, a resumed fit distils from
the same teacher, and the app reaches it. ``Binarize(binary_weights_from=N)``: two-step
binarisation, real weights before step N and binary after, resumable in either step."""
import copy
import json

import pytest
import timm
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from helpers import TINY, UserModule, pattern_images, small_trainer, step_checkpoints
from lightning_bnnprune import Binarize, GreedyFilterPruning, MainSubsidiaryPruning
from lightning_bnnprune.layers import BinaryConv2d


def _fit(tmp_path, binarize, max_steps=6, module=None, ckpt_path=None, extra=(), seed=0, n=48):
    seed_everything(seed)
    module = module or UserModule("resnet20_cifar", lr=5e-3)
    trainer = small_trainer(tmp_path, [binarize, *extra], max_steps)
    trainer.fit(module, pattern_images(n=n, batch_size=16), ckpt_path=ckpt_path)
    return module


def _state(module):
    return {k: v.clone() for k, v in module.net.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weight_zero_is_todays_run_bit_for_bit_and_makes_no_copy(tmp_path):
    plain = _fit(tmp_path / "a", Binarize())
    off = Binarize(teacher="full_precision", teacher_weight=0)
    zero = _fit(tmp_path / "b", off)
    assert off.full_precision_teacher is None and not off.distilling
    assert _equal(_state(plain), _state(zero))
    taught = _fit(tmp_path / "c", Binarize(teacher="full_precision"))
    assert not _equal(_state(plain), _state(taught))  # the term is really added


def test_teacher_is_the_full_precision_network_the_user_handed_in(tmp_path):
    seed_everything(0)
    module = UserModule("resnet20_cifar", lr=5e-3)
    before = copy.deepcopy(module.net).eval()
    binarize = Binarize(teacher="full_precision")
    _fit(tmp_path, binarize, module=module)
    x = torch.randn(4, 3, 32, 32)
    assert any(isinstance(m, BinaryConv2d) for m in module.net.modules())
    assert not any(isinstance(m, BinaryConv2d) for m in binarize.full_precision_teacher.net.modules())
    assert torch.equal(binarize.full_precision_teacher(x), before(x))  # frozen: unchanged by the fit
    assert binarize._teacher_wrapper is None and "training_step" not in module.__dict__  # the step is the user's again


def test_teacher_from_a_weights_file_and_from_a_module(tmp_path):
    seed_everything(1)
    other = timm.create_model("resnet20_cifar", num_classes=10).eval()
    path = tmp_path / "teacher.pt"
    torch.save(other.state_dict(), path)
    x = torch.randn(2, 3, 32, 32)
    from_file = Binarize(teacher=str(path))
    _fit(tmp_path / "f", from_file, max_steps=2)
    assert torch.equal(from_file.full_precision_teacher(x), other(x))
    from_module = Binarize(teacher=other)
    _fit(tmp_path / "m", from_module, max_steps=2)
    assert torch.equal(from_module.full_precision_teacher(x), other(x))
    torch.save(timm.create_model("resnet18_cifar", num_classes=10).state_dict(), tmp_path / "wrong.pt")
    with pytest.raises(MisconfigurationException, match="does not fit the network"):
        _fit(tmp_path / "w", Binarize(teacher=str(tmp_path / "wrong.pt")), max_steps=1)


def test_resume_distils_from_the_first_sittings_teacher(tmp_path):
    every = step_checkpoints(tmp_path / "ckpt", 3)
    full = _fit(tmp_path / "full", Binarize(teacher="full_precision"), max_steps=6, extra=[every])
    ckpt = tmp_path / "ckpt" / "step=3.ckpt"
    assert ckpt.is_file()
    # the resumed process builds its network from another seed: the teacher must still be the first one
    resumed_binarize = Binarize(teacher="full_precision")
    resumed = _fit(tmp_path / "resumed", resumed_binarize, max_steps=6, ckpt_path=str(ckpt), seed=7)
    assert _equal(_state(full), _state(resumed))


def test_teacher_composes_with_pruning(tmp_path):
    binarize = Binarize(teacher="full_precision")
    prune = MainSubsidiaryPruning(target_pfr=0.4, warmup=2, selector=1, retrain=1, input_size=(3, 32, 32))
    module = _fit(tmp_path, binarize, max_steps=8, extra=[prune])
    assert prune.record is not None and prune.pfr() > 0.3
    assert "training_step" not in module.__dict__  # both callbacks' step terms are gone


@pytest.mark.parametrize("kwargs, match", [
    (dict(teacher_weight=-1.0), "teacher_weight"),
    (dict(teacher_temperature=0), "teacher_temperature"),
    (dict(teacher="/no/such/weights.pt"), "no file '/no/such/weights.pt'"),
    (dict(teacher=3), "`teacher` must be None"),
])
def test_bad_teacher_arguments_are_one_line(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match) as err:
        Binarize(**kwargs)
    assert "\n" not in str(err.value)


def test_app_reaches_the_teacher(run_app, tmp_path):
    out = tmp_path / "run"
    proc = run_app("binarize.teacher=full_precision", "prune=none", "logger=csv", "trainer.log_every_n_steps=1", *TINY,
                   f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_acc"] is not None
    metrics = next(out.rglob("metrics.csv")).read_text().splitlines()
    assert "train/teacher_kd" in metrics[0]


class WeightsSeen(Callback):
    """Which steps trained with real weights (each binary conv's flag at the step's start)."""

    def __init__(self):
        self.real = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        flags = {m.real_weights for m in pl_module.modules() if isinstance(m, BinaryConv2d)}
        assert len(flags) == 1
        self.real[trainer.global_step - 1] = flags.pop()


def test_two_steps_real_weights_then_binary(tmp_path):
    seen = WeightsSeen()
    module = _fit(tmp_path, Binarize(binary_weights_from=3), max_steps=6, extra=[seen])
    assert seen.real == {0: True, 1: True, 2: True, 3: False, 4: False, 5: False}
    conv = next(m for m in module.net.modules() if isinstance(m, BinaryConv2d))
    x = torch.randn(2, conv.in_channels, 8, 8)
    conv.eval()
    conv.real_weights = True  # step 1's layer: sign inputs, the latent real weights
    expected = torch.nn.functional.conv2d(torch.where(x >= 0, 1.0, -1.0), conv.weight, conv.bias,
                                          conv.stride, conv.padding, conv.dilation, conv.groups)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    conv.real_weights = False
    assert not torch.allclose(conv(x), expected, atol=1e-3)
    assert "real_weights=True" not in repr(module.net)  # the fit ended in step 2: binary


def test_two_steps_by_epoch_and_a_fit_that_ends_in_step_one_says_so(tmp_path):
    seen = WeightsSeen()
    _fit(tmp_path / "e", Binarize(binary_weights_from=1, binary_weights_unit="epochs"), max_steps=6, extra=[seen])
    assert [seen.real[s] for s in range(6)] == [True] * 3 + [False] * 3  # 48 images, batch 16: 3 per epoch
    with pytest.warns(UserWarning, match="still real-valued"):
        _fit(tmp_path / "s", Binarize(binary_weights_from=10), max_steps=2)


@pytest.mark.parametrize("stop", [2, 4])  # mid step 1, mid step 2
def test_two_step_resume_equals_uninterrupted(tmp_path, stop):
    def run(name, max_steps, ckpt_path=None):  # one batch an epoch: a plain loader resumes at its start
        every = step_checkpoints(tmp_path / name, 1)
        return _fit(tmp_path / f"{name}-root", Binarize(teacher="full_precision", binary_weights_from=3),
                    max_steps=max_steps, ckpt_path=ckpt_path, extra=[every], n=16)

    full = run("full", 6)
    run("part", stop)
    resumed = run("resumed", 6, ckpt_path=str(tmp_path / "part" / f"step={stop}.ckpt"))
    assert _equal(_state(full), _state(resumed))


@pytest.mark.parametrize("kwargs, match", [
    (dict(binary_weights_from=-1), "binary_weights_from"),
    (dict(binary_weights_from=True), "binary_weights_from"),
    (dict(binary_weights_from=2, binary_weights_unit="minutes"), "must be one of: steps, epochs"),
    (dict(binary_weights_from=2, input_quantizer=None), "needs an input_quantizer"),
])
def test_bad_two_step_arguments_are_one_line(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match) as err:
        Binarize(**kwargs)
    assert "\n" not in str(err.value)


class PhasesSeen(Callback):
    """msf's phase at each step and the weights' flag, to check where pruning starts."""

    def __init__(self, prune):
        self.prune, self.phases = prune, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        real = next(m for m in pl_module.modules() if isinstance(m, BinaryConv2d)).real_weights
        phase = self.prune.phase
        self.phases.append((None if phase is None else phase.name, real))


def test_two_steps_under_msf_prune_after_the_weights_turn_binary_with_the_schedules_lengths(tmp_path):
    prune = MainSubsidiaryPruning(0.4, warmup=1, selector=1, retrain=2, final_retrain=0, input_size=(3, 32, 32))
    seen = PhasesSeen(prune)
    _fit(tmp_path, Binarize(binary_weights_from=3), max_steps=9, extra=[prune, seen])
    names = [name for name, _ in seen.phases]
    first = next(i for i, n in enumerate(names) if n not in (None, "warmup"))
    assert first == 3 and not seen.phases[first][1]  # not at warmup=1: at the first binary-weight step
    assert names[3:6] == ["selector", "retrain", "retrain"]  # selector 1 + retrain 2, as configured
    assert prune.schedule.warmup == 3 and prune.record is not None


def test_pruning_retrains_against_the_full_precision_teacher(tmp_path):
    binarize = Binarize(teacher="full_precision", teacher_weight=0)  # kept for the pruning only
    prune = GreedyFilterPruning(0.4, criterion="l1", warmup=2, distill=1.0, distill_teacher="full_precision",
                                input_size=(3, 32, 32))
    module = _fit(tmp_path, binarize, max_steps=5, extra=[prune])
    assert prune.teacher is binarize.full_precision_teacher is not None  # shared, not a copy
    assert not any(isinstance(m, BinaryConv2d) for m in prune.teacher.net.modules())
    assert "training_step" not in module.__dict__ and prune.record is not None
    with pytest.raises(MisconfigurationException, match="add Binarize\\(teacher='full_precision'\\)"):
        _fit(tmp_path / "none", Binarize(), max_steps=3,
             extra=[GreedyFilterPruning(0.4, warmup=1, distill=1.0, distill_teacher="full_precision",
                                        input_size=(3, 32, 32))])
    with pytest.raises(MisconfigurationException, match="must be one of: binary_start, full_precision"):
        GreedyFilterPruning(0.4, distill_teacher="teacher")


def test_finetune_recipe_weights_file_to_pruned_binary_network_to_tflite(run_app, tmp_path):
    """README section 3's path through the app: a full-precision weights file -> binary with the
    teacher, in two steps -> pruned by msf retraining against the same teacher -> model.tflite."""
    weights = tmp_path / "fp.pt"
    fp = timm.create_model("test_resnet", num_classes=10)
    torch.save(fp.state_dict(), weights)
    out = tmp_path / "run"
    proc = run_app("recipe=finetune_timm", "model.model_name=test_resnet", f"model.pretrained_file={weights}",
                   "export=lce", "logger=csv", *TINY, "trainer.limit_train_batches=8", "trainer.log_every_n_steps=1",
                   "binarize.binary_weights_unit=steps", "binarize.binary_weights_from=2", "schedule.unit=steps",
                   "schedule.warmup=3", "schedule.selector=1", "schedule.retrain=1", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pruning"]["pfr"] > 0.3 and summary["exported_model"].endswith("model.tflite")
    header = next(out.rglob("metrics.csv")).read_text().splitlines()[0]
    assert "train/teacher_kd" in header and "prune/distill" in header  # both distil from the FP network


class SaveTeacherPerRank(Callback):
    """Each rank writes its teacher's logits on a fixed input and its trained network's weights."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        binarize = next(cb for cb in trainer.callbacks if isinstance(cb, Binarize))
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        torch.save({"teacher": binarize.full_precision_teacher(x),
                    "student": {k: v.detach().clone() for k, v in pl_module.net.named_parameters()}},
                   f"{self.out_dir}/rank{trainer.global_rank}.pt")


def test_the_teacher_under_ddp_is_the_same_full_precision_network_on_every_rank(tmp_path):
    """DDP spawn, two ranks: each keeps its own frozen copy of the network as handed in (one per
    process), and the students' parameters, distilled on different batches, stay equal (DDP's
    averaged gradients; batch-norm running statistics are per rank, as DDP leaves them)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import DDPStrategy

    seed_everything(0)
    module = UserModule("resnet20_cifar", lr=5e-3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = copy.deepcopy(module.net).eval()(x)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo", start_method="spawn"),
        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[Binarize(teacher="full_precision"), SaveTeacherPerRank(str(tmp_path))],
    )
    trainer.fit(module, pattern_images(n=32, batch_size=8))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["teacher"], r1["teacher"]) and torch.allclose(r0["teacher"], expected, atol=1e-6)
    assert _equal(r0["student"], r1["student"])
