"""The layer-wise schedule and the short-run rule, alone (no Trainer); allocation: test_allocation.py."""
from __future__ import annotations

import math

import pytest

from lightning_bnnprune.pruning.schedule import DONE, RETRAIN, SELECTOR, WARMUP, StagewiseSchedule, Phase

GROUPS = ["a", "b", "c", "d", "e"]


# ---------------------------------------------------------------------------------- schedule
def test_phases_bottom_up_with_warmup():
    s = StagewiseSchedule.from_groups(GROUPS[:3], selector=2, retrain=3, warmup=4)
    assert s.total == 4 + 3 * 5
    assert [(p.stage, p.name, p.groups, p.start, p.end) for p in s.phases] == [
        (-1, WARMUP, (), 0, 4),
        (0, SELECTOR, ("a",), 4, 6), (0, RETRAIN, ("a",), 6, 9),
        (1, SELECTOR, ("b",), 9, 11), (1, RETRAIN, ("b",), 11, 14),
        (2, SELECTOR, ("c",), 14, 16), (2, RETRAIN, ("c",), 16, 19),
    ]
    names = [s.phase_at(t).name for t in range(s.total + 3)]
    assert names == [WARMUP] * 4 + ([SELECTOR] * 2 + [RETRAIN] * 3) * 3 + [DONE] * 3
    assert s.phase_at(5) == Phase(0, SELECTOR, ("a",), 4, 6)
    assert s.phase_at(10**6) == Phase(3, DONE, (), 19, math.inf)


@pytest.mark.parametrize("per_stage, expected", [(1, 5), (2, 3), (5, 1), (9, 1)])
def test_layers_per_stage(per_stage, expected):
    s = StagewiseSchedule.from_groups(GROUPS, selector=1, retrain=1, layers_per_stage=per_stage)
    assert s.num_stages == expected
    assert [g for stage in s.stages for g in stage] == GROUPS  # order kept, nothing lost
    assert s.total == 2 * expected


def test_print_names_every_phase_and_the_total():
    s = StagewiseSchedule.from_groups(["layer1.0.conv1", "layer2.0.conv1"], selector=10, retrain=20,
                                      warmup=5, unit="epochs")
    text = str(s)
    assert "total=65" in text and "unit='epochs'" in text
    assert "epochs  0-4   warm-up of the main network" in text
    assert "epochs 35-44  stage 2/2 selector: layer2.0.conv1" in text
    assert "epochs 65+    schedule done, gates fixed" in text


def test_scaled_fits_and_keeps_one_step_per_phase():
    s = StagewiseSchedule.from_groups(GROUPS, selector=100, retrain=300, warmup=50)
    small = s.scaled(1000)
    assert small.total <= 1000 and small.stages == s.stages
    assert (small.selector, small.retrain, small.warmup, small.total) == (48, 146, 24, 994)
    assert s.scaled(5000) is s  # already fits
    tight = s.scaled(10)
    assert (tight.selector, tight.retrain, tight.warmup, tight.total) == (1, 1, 0, 10)
    with pytest.raises(ValueError, match=r"9 steps cannot hold 5 stages even at 1 step per phase: at least 10"):
        s.scaled(9)


def test_state_roundtrip_and_equality():
    s = StagewiseSchedule.from_groups(GROUPS, selector=3, retrain=4, warmup=2, layers_per_stage=2)
    assert StagewiseSchedule(**s.state()) == s
    assert StagewiseSchedule(**{**s.state(), "retrain": 5}) != s


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stages": [], "selector": 1, "retrain": 1}, r"every stage needs at least one group"),
        ({"stages": [["a"], []], "selector": 1, "retrain": 1}, r"every stage needs at least one group"),
        ({"stages": [["a"], ["a"]], "selector": 1, "retrain": 1}, r"a group appears in two stages"),
        ({"stages": [["a"]], "selector": 0, "retrain": 1}, r"`selector` must be an int >= 1 \(steps\), got 0"),
        ({"stages": [["a"]], "selector": 1, "retrain": 1.5}, r"`retrain` must be an int >= 1"),
        ({"stages": [["a"]], "selector": 1, "retrain": 1, "warmup": -2}, r"`warmup` must be an int >= 0"),
        ({"stages": [["a"]], "selector": 1, "retrain": 1, "unit": "hours"}, r"`unit` must be one of steps, epochs; got 'hours'"),
    ],
)
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StagewiseSchedule(**kwargs)


def test_bad_layers_per_stage_and_time():
    with pytest.raises(ValueError, match=r"layers_per_stage must be an int >= 1, got 0"):
        StagewiseSchedule.from_groups(GROUPS, 1, 1, layers_per_stage=0)
    with pytest.raises(ValueError, match=r"t must be >= 0, got -1"):
        StagewiseSchedule.from_groups(GROUPS, 1, 1).phase_at(-1)


def test_final_retrain_closes_the_schedule_and_scales():
    s = StagewiseSchedule.from_groups(["a", "b"], selector=2, retrain=3, final=5)
    assert s.total == 15 and s.phase_at(10).name == "final" and s.phase_at(14).stage == 2
    assert s.phase_at(15).name == DONE and StagewiseSchedule(**s.state()) == s
    assert "final retrain" in str(s) and "final=5" in repr(s)
    small = s.scaled(8)
    assert small.total <= 8 and small.final >= 0 and small.selector >= 1
    with pytest.raises(ValueError, match="`final` must be an int >= 0"):
        StagewiseSchedule([["a"]], 1, 1, final=-1)


def test_fit_lengths_is_one_rule_for_every_strategy():
    from lightning_bnnprune.pruning.schedule import ScheduleTooLong, fit_lengths

    msf = dict(lengths={"warmup": 60, "selector": 5, "retrain": 15}, repeats={"warmup": 1, "selector": 3, "retrain": 3})
    assert fit_lengths("M", **msf, available=120, unit="steps") == {"warmup": 60, "selector": 5, "retrain": 15}
    assert fit_lengths("M", **msf, available=40, unit="steps", scale_to_fit=True) == {"warmup": 20, "selector": 1, "retrain": 5}
    with pytest.raises(ScheduleTooLong, match=(
        r"^M's schedule needs 120 steps \(warmup=60 \+ 3 x selector=5 \+ 3 x retrain=15\) but the trainer runs 40: "
        r"set max_epochs >= 6 \(20 steps per epoch\), or shorten the schedule to fit, e.g. warmup=20, selector=1, "
        r"retrain=5 \(scale_to_fit=True does this\)$")):
        fit_lengths("M", **msf, available=40, unit="steps", knob="max_epochs", per_epoch=20)
    with pytest.raises(ScheduleTooLong, match=r"even the shortest schedule needs 6: set max_steps >= 120$"):
        fit_lengths("M", **msf, available=5, unit="steps", scale_to_fit=True)
    # greedy, layer-wise over 4 groups: the last cut at warmup + 3 x retrain, then one step to retrain
    greedy = dict(lengths={"warmup": 10, "retrain": 10}, repeats={"warmup": 1, "retrain": 3}, extra=1)
    fitted = fit_lengths("G", **greedy, available=20, unit="steps", scale_to_fit=True)
    assert fitted["warmup"] + 3 * fitted["retrain"] + 1 <= 20 and fitted["retrain"] >= 1


def test_the_old_name_is_a_deprecated_alias():
    """``LayerwiseSchedule`` (0.1) names the same class until 0.3.0, with a warning naming the new one."""
    from lightning_bnnprune import pruning
    from lightning_bnnprune.pruning import schedule

    for module in (schedule, pruning):
        with pytest.warns(FutureWarning, match=r"LayerwiseSchedule is deprecated .* use StagewiseSchedule"):
            assert module.LayerwiseSchedule is StagewiseSchedule
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        schedule.Nope
