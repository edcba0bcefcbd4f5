"""A fit resumed from a checkpoint with other pruning settings (issue 23, item 2), in the Python
API: a setting that decides what is pruned is refused in one line naming it and both values; the
trainer's length, the retraining's learning rates and loss weights may change; distillation cannot
be switched on (the checkpoint holds no teacher); a checkpoint from before the settings were
recorded still resumes. The app's side: tests/test_app_resume.py."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_bnnprune import Binarize, GreedyFilterPruning, MainSubsidiaryPruning
from lightning_bnnprune.callbacks.checks import ResumeMismatch

from helpers import UserModule, random_images, small_trainer, step_checkpoints

# one stage of all groups: a 1-step selector and a 1-step retrain, then the final retrain ("rest")
MSF = dict(selector=1, retrain=1, distill=0.5, remove_at_end=False)
# one-shot after a 2-step warm-up
GREEDY = dict(warmup=2, remove_at_end=False)
STEPS = 4


def _fit(root: Path, pruning, max_steps: int = STEPS, ckpt_path=None, every: int = 0):
    L.seed_everything(0)
    callbacks = [Binarize(), pruning]
    if every:
        callbacks.append(step_checkpoints(root, every))
    trainer = small_trainer(root, callbacks, max_steps)
    trainer.fit(UserModule(lr=1e-2), random_images(n=8, batch_size=4), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """Each strategy's first sitting, with a checkpoint after its first step (msf: the selector
    is over; greedy: still warming up)."""
    root = tmp_path_factory.mktemp("first")
    msf = MainSubsidiaryPruning(0.4, **MSF)
    _fit(root / "msf", msf, every=1)
    _fit(root / "greedy", GreedyFilterPruning(0.4, **GREEDY), every=1)
    return {"msf": root / "msf" / "step=1.ckpt", "greedy": root / "greedy" / "step=1.ckpt", "msf_counts": msf.prune_counts}


@pytest.mark.parametrize("strategy, changed, message", [
    ("msf", {"target_pfr": 0.6}, "with target_pfr=0.6: it was made with target_pfr=0.4; restore target_pfr=0.4"),
    ("msf", {"allocation": "uniform"}, "with allocation='uniform': it was made with allocation='learned'"),
    ("msf", {"selector": 2}, "with selector=2: it was made with selector=1"),
    ("msf", {"gate_init_criterion": None}, "with gate_init_criterion=None: it was made with gate_init_criterion='l1'"),
    ("greedy", {"criterion": "binarization_error"},
     "with criterion='binarization_error': it was made with criterion='l1'"),
    ("greedy", {"round_to": 2}, "with round_to=2: it was made with round_to=1"),
])
def test_a_changed_pruning_setting_is_refused(tmp_path, first, strategy, changed, message):
    pruning = (MainSubsidiaryPruning(**{"target_pfr": 0.4, **MSF, **changed}) if strategy == "msf"
               else GreedyFilterPruning(**{"target_pfr": 0.4, **GREEDY, **changed}))
    owner = type(pruning).__name__
    with pytest.raises(ResumeMismatch, match=rf"^{owner} cannot resume from this checkpoint {message}") as err:
        _fit(tmp_path, pruning, ckpt_path=first[strategy])
    assert "\n" not in str(err.value) and str(err.value).endswith("or start a new run (no ckpt_path)")


def test_training_settings_may_change(tmp_path, first):
    """A longer trainer, another retraining learning rate and distillation weight, a removal at
    the end: the resumed fit keeps the checkpoint's counts and schedule, and reaches the target."""
    msf = MainSubsidiaryPruning(0.4, **{**MSF, "distill": 1.0, "remove_at_end": True}, retrain_lr_factor=0.5,
                                scale_to_fit=True)
    trainer = _fit(tmp_path, msf, max_steps=STEPS + 2, ckpt_path=first["msf"])
    assert trainer.global_step == STEPS + 2
    assert msf.prune_counts == first["msf_counts"]  # the first sitting's learned counts
    assert msf.schedule.final == STEPS - 2  # "rest": the first sitting's length, not the new trainer's
    assert abs(msf.record.pfr - 0.4) <= 0.01 and msf.record.max_abs_diff <= 1e-4


def test_distillation_cannot_be_switched_on(tmp_path, first):
    greedy = GreedyFilterPruning(0.4, **GREEDY, distill=1.0)
    with pytest.raises(ResumeMismatch, match=r"with distill=1.0: it was made with distill=0.0, so it holds no "
                                             r"distillation teacher \(the network as the first fit found it\)"):
        _fit(tmp_path, greedy, ckpt_path=first["greedy"])


def test_a_checkpoint_without_recorded_settings_still_resumes(tmp_path, first):
    """Checkpoints written before the settings were recorded (0.1) resume as they did."""
    for strategy, pruning in (("msf", MainSubsidiaryPruning(0.4, **MSF)),
                              ("greedy", GreedyFilterPruning(0.4, **GREEDY))):
        state = torch.load(first[strategy], map_location="cpu", weights_only=False)
        callback = state["callbacks"][type(pruning).__qualname__]
        del callback["settings"]
        callback.pop("greedy_lengths", None)  # 0.1's greedy kept no lengths either
        old = tmp_path / f"{strategy}_0.1.ckpt"
        torch.save(state, old)
        trainer = _fit(tmp_path / strategy, pruning, ckpt_path=old)
        assert trainer.global_step == STEPS and abs(pruning.pfr() - 0.4) <= 0.01


def test_a_longer_trainer_keeps_the_schedule_the_first_sitting_fitted(tmp_path):
    """scale_to_fit shrank greedy's warm-up to the first trainer; a resume under a longer one
    prunes when the first sitting would have, not at the unscaled warm-up."""
    first = GreedyFilterPruning(0.4, warmup=6, scale_to_fit=True, remove_at_end=False)
    _fit(tmp_path / "first", first, every=1)
    assert first.due(0) == 3  # 6 scaled into 4 steps (one left to retrain after the cut)
    resumed = GreedyFilterPruning(0.4, warmup=6, scale_to_fit=True, remove_at_end=False)
    _fit(tmp_path / "resumed", resumed, max_steps=STEPS + 4, ckpt_path=tmp_path / "first" / "step=1.ckpt")
    assert resumed.due(0) == 3 and resumed.finished and abs(resumed.pfr() - 0.4) <= 0.01
