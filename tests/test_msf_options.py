"""MainSubsidiaryPruning's schedule and selection options (issue 9) in a real Trainer: final
retrain, criterion-initialised gates, learned per-layer counts, distillation from the warm start."""
from __future__ import annotations

import math
from typing import Dict, List

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_bnnprune import Binarize, GreedyFilterPruning
from lightning_bnnprune.callbacks.msf import MainSubsidiaryPruning
from lightning_bnnprune.pruning.gates import gates_of

from helpers import (Classifier, WeightTrace, gate_logits, main_params, random_images, small_trainer,
                     step_checkpoints)


class CosineClassifier(Classifier):
    """The user's own schedule: SGD with a cosine to 0 over ``total`` steps, stepped per batch."""

    def __init__(self, total: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.total = total

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def cosine(lr: float, steps: int) -> List[float]:
    """The rate of each step of a cosine from ``lr`` to 0 over ``steps`` (as CosineAnnealingLR)."""
    return [lr * 0.5 * (1 + math.cos(math.pi * i / steps)) for i in range(steps)]


class StepLog(Callback):
    """Phase and learning rate of every optimizer step (read after the pruning callback set it)."""

    def __init__(self, msf: MainSubsidiaryPruning) -> None:
        self.msf = msf
        self.rows: List[tuple] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rows.append((trainer.global_step, self.msf.phase.name, optimizer.param_groups[0]["lr"]))


def test_final_retrain_restarts_the_learning_rate(tmp_path):
    L.seed_everything(0)
    selector, retrain, final, layers = 1, 2, 5, ["conv1.6", "layer1.0.conv1"]
    total = len(layers) * (selector + retrain) + final
    module = CosineClassifier(total, name="test_resnet", lr=0.05)
    msf = MainSubsidiaryPruning(target_pfr=0.3, selector=selector, retrain=retrain, layers=layers, layers_per_stage=1,
                                final_retrain=final, retrain_lr_factor=1.0, remove_at_end=False)
    log = StepLog(msf)
    weights: Dict[str, Dict] = {}

    class Snap(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == total - final:
                weights["start"] = main_params(pl_module)

    t = small_trainer(tmp_path, [Binarize(), msf, log, Snap()], max_steps=total)
    t.fit(module, random_images(n=4, batch_size=4))

    assert [r[1] for r in log.rows] == ["selector", "retrain", "retrain"] * len(layers) + ["final"] * final
    finals = [lr for _, phase, lr in log.rows if phase == "final"]
    assert finals == pytest.approx(cosine(0.05, final), rel=1e-6)
    user = 0.05 * 0.5 * (1 + math.cos(math.pi * (total - final) / total))  # what the user's cosine was at
    assert finals[0] > 2 * user  # restarted, not the user's decayed rate
    assert any(not torch.equal(a, b) for a, b in zip(weights["start"].values(), main_params(module).values()))
    assert msf.schedule.total == total and msf.pfr() > 0
    # the user's optimizer leaves the fit with its own scheduled rate
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(t.lr_scheduler_configs[0].scheduler.get_last_lr()[0])



def test_the_defaults_run_one_stage_then_retrain_to_the_trainers_end(tmp_path):
    """The measured configuration: one selector over every listed group from the L1 ranking,
    learned counts, and the final retrain on a restarted cosine for what is left of max_steps."""
    L.seed_everything(0)
    total, layers = 10, ["conv1.6", "layer1.0.conv1", "layer2.0.conv1"]
    msf = MainSubsidiaryPruning(target_pfr=0.3, selector=1, retrain=2, layers=layers, retrain_lr_factor=1.0,
                                remove_at_end=False)
    log = StepLog(msf)
    small_trainer(tmp_path, [Binarize(), msf, log], max_steps=total).fit(
        CosineClassifier(total, name="test_resnet", lr=0.05), random_images(n=4, batch_size=4))
    assert [r[1] for r in log.rows] == ["selector", "retrain", "retrain"] + ["final"] * 7
    assert msf.schedule.num_stages == 1 and msf.schedule.final == 7
    finals = [lr for _, phase, lr in log.rows if phase == "final"]
    assert finals == pytest.approx(cosine(0.05, 7), rel=1e-6)
    closed = sum(g.logits.numel() - g.num_open for g in msf.gates.values())  # only the listed groups close
    assert closed == round(0.3 * sum(msf.analysis[name].size for name in layers))


def test_the_rest_of_an_endless_trainer_is_refused(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    msf = MainSubsidiaryPruning(target_pfr=0.3, selector=1, retrain=1, layers=["conv1.6"])
    with pytest.raises(MisconfigurationException, match=r"final_retrain='rest' needs a trainer of finite length"):
        small_trainer(tmp_path, [Binarize(), msf], max_steps=-1, max_epochs=-1).fit(Classifier("test_resnet"), random_images())


@pytest.mark.parametrize("criterion", ["l1", "binarization_error"])
def test_criterion_gates_without_gate_learning_select_the_greedy_rule(tmp_path, criterion):
    """Both strategies select through ChannelGroup.keep_top, the one top-k: the greedy rule on the
    criterion's scores, the selector on the logits rank_logits made of them. Through a real fit,
    the same filters close (the unit test of the pair is test_selector.py)."""
    def fit(callback):
        L.seed_everything(0)
        module = Classifier("test_resnet")
        small_trainer(tmp_path, [Binarize(), callback], max_steps=3).fit(module, random_images(n=4, batch_size=4))
        return {n: g.mask().bool() for n, g in gates_of(module.net).items()}

    msf = MainSubsidiaryPruning(target_pfr=0.4, selector=1, retrain=2, layers_per_stage=100, gate_lr=0.0,
                                gate_init_criterion=criterion, remove_at_end=False)
    greedy = GreedyFilterPruning(criterion=criterion, target_pfr=0.4, mode="oneshot", warmup=0, remove_at_end=False)
    learned, rule = fit(msf), fit(greedy)
    assert learned.keys() == rule.keys()
    for name in rule:
        assert torch.equal(learned[name], rule[name]), name
    # not a coincidence of tie-breaking: the rule's choice is not "the first filters"
    assert any(not bool(mask[: int((~mask).sum())].logical_not().all()) for mask in rule.values())


@pytest.mark.parametrize("layers_per_stage", [100, 3])
def test_learned_counts_reach_the_target_and_respect_the_floors(tmp_path, layers_per_stage):
    L.seed_everything(0)
    module = Classifier("test_resnet")
    floor = 0.5
    msf = MainSubsidiaryPruning(target_pfr=0.3, selector=3, retrain=1, layers_per_stage=layers_per_stage,
                                allocation="learned", layer_floor=floor, gate_lr=0.05, remove_at_end=False)
    t = small_trainer(tmp_path, [Binarize(), msf], max_steps=40)
    t.fit(module, random_images(n=4, batch_size=4))
    stages = msf.schedule.num_stages
    assert msf.schedule.total <= t.global_step == 40
    kept = msf.kept_filters()
    sizes = {n: g.logits.numel() for n, g in msf.gates.items()}
    assert abs(msf.pfr() - 0.3) <= 0.01
    for name, n in sizes.items():
        assert kept[name] >= max(msf.min_filters, math.ceil(floor * n)), name
    uniform = {n: round(0.3 * s) for n, s in sizes.items()}
    if stages == 1:  # one budget over every group: the counts are the selector's, not a fixed share
        assert {n: sizes[n] - kept[n] for n in sizes} != uniform
    assert sum(sizes[n] - kept[n] for n in sizes) == round(0.3 * sum(sizes.values()))


@pytest.mark.parametrize("layers_per_stage, final", [(1, 4), (None, "rest")])
def test_resume_mid_final_retrain_equals_uninterrupted(tmp_path, layers_per_stage, final):
    """Distillation on too: the teacher must come back from the checkpoint (the first sitting's start).
    With the defaults (one stage, ``final_retrain="rest"``) the resumed run keeps the first sitting's
    final length instead of computing the rest again from where it resumes."""
    selector, retrain, layers = 1, 1, ["conv1.6", "layer1.0.conv1"]
    stages = (len(layers) if layers_per_stage == 1 else 1) * (selector + retrain)
    total = stages + 4  # the explicit final, or what "rest" must find: max_steps is total + 2

    def run(ckpt_path=None, every=None):
        L.seed_everything(0)
        module = CosineClassifier(total + 2, name="test_resnet", lr=0.05)
        msf = MainSubsidiaryPruning(target_pfr=0.4, selector=selector, retrain=retrain, layers=layers,
                                    layers_per_stage=layers_per_stage, final_retrain=final, distill=1.0,
                                    remove_at_end=False)
        trace = WeightTrace()
        callbacks = [Binarize(), msf, trace]
        if every:
            callbacks.append(step_checkpoints(tmp_path, every))
        t = small_trainer(tmp_path, callbacks, max_steps=total + 2)
        t.fit(module, random_images(n=4, batch_size=4), ckpt_path=ckpt_path)
        return module, msf, trace.trace, t

    full, msf_full, trace_full, t_full = run(every=1)
    assert "prune/distill" in t_full.callback_metrics
    assert msf_full.schedule.final == (4 if final == 4 else total + 2 - stages)
    step = stages + 2  # two steps into the final retrain
    assert msf_full.schedule.phase_at(step).name == "final"
    resumed, msf_resumed, trace, _ = run(ckpt_path=tmp_path / f"step={step}.ckpt")
    assert msf_resumed.schedule == msf_full.schedule
    assert sorted(trace) == list(range(step + 1, total + 3))
    for s in trace:
        assert torch.equal(trace[s], trace_full[s]), f"step {s} differs after resuming at {step}"
    for name, logits in gate_logits(full).items():
        assert torch.equal(logits, gate_logits(resumed)[name]), name


def test_greedy_distils_from_the_unpruned_start(tmp_path):
    L.seed_everything(0)
    module = Classifier("test_resnet")
    greedy = GreedyFilterPruning(criterion="l1", target_pfr=0.4, warmup=1, distill=2.0, distill_temperature=3.0,
                                 remove_at_end=False)
    seen: List[float] = []

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics.get("prune/distill", float("nan"))))

    x = torch.randn(2, 3, 32, 32)
    t = small_trainer(tmp_path, [Binarize(), greedy, Watch()], max_steps=3)
    t.fit(module, random_images(n=4, batch_size=4))
    assert math.isnan(seen[0]) and all(v > 0 for v in seen[1:])  # only once filters are closed
    # the teacher is the network as the fit found it: binary, every gate open, frozen
    teacher = greedy.teacher.net
    assert not gates_of(teacher) and not any(p.requires_grad for p in teacher.parameters())
    assert "training_step" not in module.__dict__  # the fit leaves the module as it came
    with pytest.raises(Exception, match="distill"):
        GreedyFilterPruning(0.4, distill=-1.0)
    assert teacher(x).shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"final_retrain": -1}, r"`final_retrain` must be an int >= 0 \(steps\) or 'rest'"),
        ({"allocation": "uniform", "layer_floor": 0.2}, r"`layer_floor` is for allocation='learned'"),
        ({"allocation": "learned", "layer_floor": 1.0}, r"`layer_floor` must be None or in \[0, 1\)"),
        ({"gate_init_criterion": "nope"}, r"`gate_init_criterion`: Unknown criterion 'nope'; registered criteria: "),
        ({"distill": -0.5}, r"`distill` must be a number >= 0"),
        ({"distill_temperature": 0}, r"`distill_temperature` must be a number > 0"),
    ],
)
def test_bad_option_values(kwargs, match):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match=match):
        MainSubsidiaryPruning(target_pfr=0.3, **kwargs)


def test_learned_floors_that_leave_no_room_are_refused(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    msf = MainSubsidiaryPruning(target_pfr=0.6, allocation="learned", layer_floor=0.5, layers_per_stage=100)
    with pytest.raises(MisconfigurationException, match=r"layer_floor=0.5 and min_filters=1 allow at most"):
        small_trainer(tmp_path, [Binarize(), msf], max_steps=700).fit(Classifier("test_resnet"), random_images())


def test_retrain_phases_follow_the_users_schedule(tmp_path):
    """Lightning steps the user's scheduler before on_train_batch_end: a phase's rate must be put
    back right after the optimizer step, or the scheduler freezes (it did before issue 9)."""
    L.seed_everything(0)
    total = 12
    msf = MainSubsidiaryPruning(target_pfr=0.3, selector=1, retrain=3, layers=["conv1.6", "layer1.0.conv1"],
                                layers_per_stage=1, final_retrain=0, retrain_lr_factor=1.0, remove_at_end=False)
    log = StepLog(msf)
    small_trainer(tmp_path, [Binarize(), msf, log], max_steps=total).fit(
        CosineClassifier(total, name="test_resnet", lr=0.05), random_images(n=4, batch_size=4))
    assert [r[1] for r in log.rows] == ["selector", "retrain", "retrain", "retrain"] * 2 + ["done"] * 4
    assert [lr for _, _, lr in log.rows] == pytest.approx(cosine(0.05, total), rel=1e-6)
