"""MainSubsidiaryPruning in a real Trainer on tiny timm networks (32x32 inputs, a few steps)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_bnnprune.models  # noqa: F401  (registers resnet18_cifar in timm)
from lightning_bnnprune import Binarize
from lightning_bnnprune.callbacks.msf import MainSubsidiaryPruning
from lightning_bnnprune.pruning.distill import open_gates_forward

from helpers import (Classifier, GateLogitTrace, gate_logits, main_params, random_images, small_trainer,
                     step_checkpoints)

#: Xu et al.'s own method (the callback's defaults are this project's measured configuration):
#: the tests of the layer-by-layer mechanics run it.
PAPER = dict(layers_per_stage=1, allocation="uniform", gate_init_criterion=None, final_retrain=0)


class Recorder(Callback):
    """Snapshots weights and gates whenever the pruning callback enters a new phase."""

    def __init__(self, msf: MainSubsidiaryPruning) -> None:
        self.msf = msf
        self.phases: List[Tuple[int, str, Tuple[str, ...]]] = []
        self.snapshots: List[Tuple[Dict, Dict]] = []
        self.bar: List[str] = []
        self.backwards = 0
        self.learned: Dict[str, torch.Tensor] = {}  # each selector's logits before the share is enforced

    def _snap(self, pl_module) -> None:
        self.snapshots.append((main_params(pl_module), gate_logits(pl_module)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        phase = self.msf.phase
        key = (phase.stage, phase.name, phase.groups)
        if not self.phases or self.phases[-1] != key:
            self.phases.append(key)
            self._snap(pl_module)
        if trainer.progress_bar_callback is not None:
            self.bar.append(trainer.progress_bar_callback.get_metrics(trainer, pl_module).get("msf"))

    def on_after_backward(self, trainer, pl_module):
        self.backwards += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.msf.phase.name == "selector":
            for name in self.msf.phase.groups:
                self.learned[name] = self.msf.gates[name].logits.detach().clone()

    def on_train_end(self, trainer, pl_module):
        self._snap(pl_module)


@pytest.mark.parametrize(
    "name, layers",
    [("test_resnet", ["conv1.3", "layer2.0.conv1", "layer3.0.conv3"]), ("resnet18_cifar", ["layer2.0.conv2"])],
)
def test_phases_in_order_selector_moves_only_gates_retrain_only_weights(tmp_path, name, layers):
    L.seed_everything(0)
    module = Classifier(name)
    msf = MainSubsidiaryPruning(target_pfr=0.3, selector=2, retrain=2, warmup=1, layers=layers, remove_at_end=False,
                                **PAPER)
    rec = Recorder(msf)
    steps = 1 + 4 * len(layers) + 1
    t = small_trainer(tmp_path, [Binarize(), msf, rec], max_steps=steps, enable_progress_bar=True)
    t.fit(module, random_images())

    expected = [(-1, "warmup", ())]
    for i, group in enumerate(layers):
        expected += [(i, "selector", (group,)), (i, "retrain", (group,))]
    expected += [(len(layers), "done", ())]
    assert rec.phases == expected
    assert rec.backwards == steps  # one backward per step, teacher included
    for group in layers:  # the loss gradient reached every selector's gates: they no longer tie
        assert rec.learned[group].unique().numel() > 1, group
    for (stage, phase, groups), (w0, g0), (w1, g1) in zip(rec.phases, rec.snapshots, rec.snapshots[1:]):
        if phase == "selector":
            assert all(torch.equal(w0[n], w1[n]) for n in w0), "main weights moved in a selector phase"
            moved = [n for n in g0 if not torch.equal(g0[n], g1[n])]
            assert moved == list(groups), f"gates {moved} moved in the selector of {groups}"
        else:
            assert any(not torch.equal(w0[n], w1[n]) for n in w0), f"the {phase} phase did not train"
            nxt = rec.phases[rec.phases.index((stage, phase, groups)) + 1][2] if phase != "done" else ()
            for n in g0:  # the next selector starts its own gates: all others are untouched
                if n not in nxt:
                    assert torch.equal(g0[n], g1[n]), f"gate {n} moved in the {phase} phase"
    # the fit leaves the user's module as it found it, and the progress bar showed the phase
    assert "training_step" not in module.__dict__
    assert all(p.requires_grad for p in module.parameters())
    assert rec.bar[0] == "warmup" and "selector 1" in rec.bar and rec.bar[-1] == "done"


@pytest.mark.parametrize("allocation, target", [("uniform", 0.4), ("size", 0.25), ("macs", 0.5)])
def test_final_pfr_within_one_point(tmp_path, allocation, target):
    L.seed_everything(0)
    module = Classifier("test_resnet", returns_dict=True)
    msf = MainSubsidiaryPruning(target_pfr=target, selector=2, retrain=1, layers_per_stage=4, allocation=allocation)
    t = small_trainer(tmp_path, [Binarize(), msf], max_steps=9)
    t.fit(module, random_images())
    assert abs(msf.pfr() - target) <= 0.01
    assert msf.record is not None and (tmp_path / "pruned.pt").exists()  # the base callback removed them
    assert sum(msf.prune_counts.values()) == round(target * msf.analysis.num_filters)
    assert min(msf.kept_filters().values()) >= msf.min_filters
    metrics = t.callback_metrics
    for key in ("msf/kd", "msf/budget", "msf/stage", "msf/phase", "msf/pfr", "msf/kept/conv1.3"):
        assert key in metrics
    assert metrics["msf/pfr"] == pytest.approx(msf.pfr())


def test_resume_mid_selector_equals_uninterrupted(tmp_path):
    def run(ckpt_path=None, every=None):
        L.seed_everything(0)
        module = Classifier("test_resnet")
        msf = MainSubsidiaryPruning(target_pfr=0.4, selector=3, retrain=2, layers=["conv1.6", "layer1.0.conv1"],
                                    remove_at_end=False)
        trace = GateLogitTrace()
        callbacks = [Binarize(), msf, trace]
        if every:
            callbacks.append(step_checkpoints(tmp_path, every))
        t = small_trainer(tmp_path, callbacks, max_steps=10)
        t.fit(module, random_images(n=4, batch_size=4), ckpt_path=ckpt_path)
        return module, msf, trace.trace

    full, msf_full, trace_full = run(every=2)
    # step 2 is inside the first selector (steps 0-2), step 6 inside the second (steps 5-7)
    for step in (2, 6):
        resumed, msf_resumed, trace = run(ckpt_path=tmp_path / f"step={step}.ckpt")
        assert msf_resumed.schedule == msf_full.schedule
        assert sorted(trace) == list(range(step + 1, 11))
        for s in trace:  # the same learned logits at every step, not only the same final masks
            assert torch.equal(trace[s], trace_full[s]), f"step {s} differs after resuming at {step}"
        for name, logits in gate_logits(full).items():
            assert torch.equal(logits, gate_logits(resumed)[name]), name
        assert all(torch.equal(a, b) for a, b in zip(main_params(full).values(), main_params(resumed).values()))


def test_epoch_unit_and_scale_to_fit(tmp_path):
    L.seed_everything(0)
    msf = MainSubsidiaryPruning(target_pfr=0.3, selector=2, retrain=2, unit="epochs", layers=["conv1.6"],
                                scale_to_fit=True)
    rec = Recorder(msf)
    t = small_trainer(tmp_path, [Binarize(), msf, rec], max_steps=-1, max_epochs=2)
    t.fit(Classifier("test_resnet"), random_images(n=8, batch_size=4))
    assert msf.schedule.total == 2 and (msf.schedule.selector, msf.schedule.retrain) == (1, 1)
    assert [p[1] for p in rec.phases] == ["selector", "retrain"]
    assert t.global_step == 4
    assert msf.kept_filters()["conv1.6"] == 32 - msf.prune_counts["conv1.6"]


def test_teacher_is_the_network_with_the_stage_gates_open_and_leaves_bn_statistics(tmp_path):
    L.seed_everything(0)
    module = Classifier("test_resnet")
    msf = MainSubsidiaryPruning(target_pfr=0.5, selector=1, retrain=1, layers=["conv1.6"], remove_at_end=False)
    small_trainer(tmp_path, [Binarize(), msf], max_steps=2).fit(module, random_images())
    net, gate = module.net, msf.gates["conv1.6"]
    assert 0 < gate.num_open < 32  # the selector closed its share
    x = torch.randn(4, 3, 32, 32)
    net.train()
    selector = msf.schedule.phase_at(0)  # the selector of conv1.6
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    teacher = open_gates_forward(net, selector.groups, (x,), {})
    assert all(torch.equal(b, buffers[n]) for n, b in net.named_buffers())  # statistics untouched
    closed = gate.mask().clone()
    with torch.no_grad():
        student = net(x)
        gate.set_mask(torch.ones(32))
        opened = net(x)
    assert torch.equal(teacher, opened) and not torch.allclose(student, opened)
    gate.set_mask(closed)


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_pfr": 1.0}, r"`target_pfr` must be in \[0, 1\), got 1.0"),
        ({"target_pfr": -0.1}, r"`target_pfr` must be in \[0, 1\)"),
        ({"target_pfr": 0.3, "selector": 0}, r"`selector` must be an int >= 1 \(steps\), got 0"),
        ({"target_pfr": 0.3, "retrain": 0}, r"`retrain` must be an int >= 1"),
        ({"target_pfr": 0.3, "warmup": -1}, r"`warmup` must be an int >= 0"),
        ({"target_pfr": 0.3, "unit": "batches"}, r"`unit` must be one of steps, epochs; got 'batches'"),
        ({"target_pfr": 0.3, "allocation": "random"}, r"`allocation` must be one of \('uniform', 'size', 'macs', 'learned'\)"),
        ({"target_pfr": 0.3, "layers_per_stage": 0}, r"`layers_per_stage` must be None \(all groups in one stage\) or an int >= 1"),
        ({"target_pfr": 0.3, "final_retrain": "all"}, r"`final_retrain` must be an int >= 0 \(steps\) or 'rest', got 'all'"),
        ({"target_pfr": 0.3, "selector_distill": -1.0}, r"`selector_distill` must be a number >= 0, got -1.0"),
        ({"target_pfr": 0.3, "lambda_budget": -0.5}, r"`lambda_budget` must be None \(adaptive\) or a number >= 0"),
        ({"target_pfr": 0.3, "gate_lr": -1e-3}, r"`gate_lr` must be a number >= 0"),
        ({"target_pfr": 0.3, "selector_distill_temperature": 0}, r"`selector_distill_temperature` must be a number > 0"),
        ({"target_pfr": 0.3, "budget_strength": 0}, r"`budget_strength` must be a number > 0, got 0"),
        ({"target_pfr": 0.3, "retrain_lr": 1e-4, "retrain_lr_factor": 0.1}, r"not both"),
        ({"target_pfr": 0.3, "retrain_lr": -1e-4}, r"`retrain_lr` must be None or > 0"),
        ({"target_pfr": 0.3, "layers": []}, r"`layers` must name at least one group"),
        ({"target_pfr": 0.3, "min_filters": 0}, r"`min_filters` must be an int >= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        MainSubsidiaryPruning(**kwargs)


class NoBinary(L.LightningModule):
    """First conv and classifier only: both stay full precision, nothing to prune."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        self.example_input_array = torch.zeros(1, 3, 32, 32)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Manual(Classifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


@pytest.mark.parametrize(
    "module, callbacks, max_steps, match",
    [
        (Classifier, lambda: [MainSubsidiaryPruning(0.3)], 10, r"add `Binarize\(\)` to the Trainer's callbacks"),
        (NoBinary, lambda: [Binarize(), MainSubsidiaryPruning(0.3)], 10, r"no binary convolution to prune"),
        (Classifier, lambda: [Binarize(), MainSubsidiaryPruning(0.3, layers=["net.nope"])], 10,
         r"`layers` names unknown prunable layers \['net.nope'\]; prunable groups: conv1.3, conv1.6"),
        (Classifier, lambda: [Binarize(), MainSubsidiaryPruning(0.3, exclude=["nope"])], 10,
         r"`exclude` names unknown binary layers \['nope'\]"),
        (Classifier, lambda: [Binarize(), MainSubsidiaryPruning(0.9, min_filters=16)], 10,
         r"keeping min_filters=16 per layer allows at most"),
        (Classifier, lambda: [Binarize(), MainSubsidiaryPruning(0.3, selector=5, retrain=5, layers=["conv1.6"])], 9,
         r"MainSubsidiaryPruning's schedule needs 10 steps \(warmup=0 \+ selector=5 \+ retrain=5\) but the trainer "
         r"runs 9: set max_steps >= 10, or shorten the schedule to fit, e.g. warmup=0, selector=4, retrain=4"),
        (Classifier, lambda: [Binarize(), MainSubsidiaryPruning(0.3, layers=["conv1.6", "conv1.3"], layers_per_stage=1,
                                                                  scale_to_fit=True)],
         3, r"runs 3, and even the shortest schedule needs 4: set max_steps >= "),
        (Manual, lambda: [Binarize(), MainSubsidiaryPruning(0.3)], 10, r"manual optimisation"),
    ],
)
def test_bad_setups(tmp_path, module, callbacks, max_steps, match):
    t = small_trainer(tmp_path, callbacks(), max_steps=max_steps)
    with pytest.raises(MisconfigurationException, match=match):
        t.fit(module(), random_images(n=4))
