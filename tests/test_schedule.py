"""The layer-wise schedule and the pruning budget, alone (no Trainer)."""
from __future__ import annotations

import math

import pytest
import torch

from lightning_bnnprune.pruning.budget import allocate, budget_term, budget_weight, enforce_keep, gradient_spread
from lightning_bnnprune.pruning.gates import FilterGate
from lightning_bnnprune.pruning.schedule import DONE, RETRAIN, SELECTOR, WARMUP, LayerwiseSchedule, Phase

GROUPS = ["a", "b", "c", "d", "e"]


# ---------------------------------------------------------------------------------- schedule
def test_phases_bottom_up_with_warmup():
    s = LayerwiseSchedule.from_groups(GROUPS[:3], selector=2, retrain=3, warmup=4)
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
    s = LayerwiseSchedule.from_groups(GROUPS, selector=1, retrain=1, layers_per_stage=per_stage)
    assert s.num_stages == expected
    assert [g for stage in s.stages for g in stage] == GROUPS  # order kept, nothing lost
    assert s.total == 2 * expected


def test_print_names_every_phase_and_the_total():
    s = LayerwiseSchedule.from_groups(["layer1.0.conv1", "layer2.0.conv1"], selector=10, retrain=20,
                                      warmup=5, unit="epochs")
    text = str(s)
    assert "total=65" in text and "unit='epochs'" in text
    assert "epochs  0-4   warm-up of the main network" in text
    assert "epochs 35-44  stage 2/2 selector: layer2.0.conv1" in text
    assert "epochs 65+    schedule done, gates fixed" in text


def test_scaled_fits_and_keeps_one_step_per_phase():
    s = LayerwiseSchedule.from_groups(GROUPS, selector=100, retrain=300, warmup=50)
    small = s.scaled(1000)
    assert small.total <= 1000 and small.stages == s.stages
    assert (small.selector, small.retrain, small.warmup, small.total) == (48, 146, 24, 994)
    assert s.scaled(5000) is s  # already fits
    tight = s.scaled(10)
    assert (tight.selector, tight.retrain, tight.warmup, tight.total) == (1, 1, 0, 10)
    with pytest.raises(ValueError, match=r"9 steps cannot hold 5 stages even at 1 step per phase: at least 10"):
        s.scaled(9)


def test_state_roundtrip_and_equality():
    s = LayerwiseSchedule.from_groups(GROUPS, selector=3, retrain=4, warmup=2, layers_per_stage=2)
    assert LayerwiseSchedule(**s.state()) == s
    assert LayerwiseSchedule(**{**s.state(), "retrain": 5}) != s


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stages": [], "selector": 1, "retrain": 1}, r"every stage needs at least one group"),
        ({"stages": [["a"], []], "selector": 1, "retrain": 1}, r"every stage needs at least one group"),
        ({"stages": [["a"], ["a"]], "selector": 1, "retrain": 1}, r"a group appears in two stages"),
        ({"stages": [["a"]], "selector": 0, "retrain": 1}, r"selector length must be an int >= 1 steps, got 0"),
        ({"stages": [["a"]], "selector": 1, "retrain": 1.5}, r"retrain length must be an int >= 1"),
        ({"stages": [["a"]], "selector": 1, "retrain": 1, "warmup": -2}, r"warmup length must be an int >= 0"),
        ({"stages": [["a"]], "selector": 1, "retrain": 1, "unit": "hours"}, r"unit must be one of \('steps', 'epochs'\)"),
    ],
)
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerwiseSchedule(**kwargs)


def test_bad_layers_per_stage_and_time():
    with pytest.raises(ValueError, match=r"layers_per_stage must be an int >= 1, got 0"):
        LayerwiseSchedule.from_groups(GROUPS, 1, 1, layers_per_stage=0)
    with pytest.raises(ValueError, match=r"t must be >= 0, got -1"):
        LayerwiseSchedule.from_groups(GROUPS, 1, 1).phase_at(-1)


# ---------------------------------------------------------------------------------- budget
SIZES = {"a": 16, "b": 32, "c": 64, "d": 128}


@pytest.mark.parametrize("target", [0.0, 0.1, 0.33, 0.5, 0.9])
@pytest.mark.parametrize("allocation", ["uniform", "size"])
def test_allocation_meets_the_global_target_exactly(allocation, target):
    counts = allocate(SIZES, target, allocation)
    assert sum(counts.values()) == round(target * sum(SIZES.values()))
    assert all(0 <= counts[k] <= SIZES[k] - 1 for k in SIZES)


def test_uniform_prunes_the_same_share_and_size_favours_wide_layers():
    uniform = allocate(SIZES, 0.25, "uniform")
    assert uniform == {"a": 4, "b": 8, "c": 16, "d": 32}
    size = allocate(SIZES, 0.25, "size")
    ratios = [size[k] / SIZES[k] for k in SIZES]
    assert ratios == sorted(ratios) and ratios[-1] > 0.25 > ratios[0]


def test_macs_allocation_follows_the_cost_per_channel():
    counts = allocate(SIZES, 0.25, "macs", macs_per_channel={"a": 4.0, "b": 1.0, "c": 1.0, "d": 1.0})
    assert counts["a"] / 16 > counts["b"] / 32
    with pytest.raises(ValueError, match=r"allocation='macs' needs macs_per_channel for every group"):
        allocate(SIZES, 0.25, "macs")


def test_floors_saturate_and_the_rest_goes_elsewhere():
    sizes = {"small": 4, "big": 100}
    counts = allocate(sizes, 0.5, "size", min_filters=2)
    assert counts["small"] <= 2 and sum(counts.values()) == 52
    with pytest.raises(ValueError, match=r"keeping min_filters=3 per layer allows at most 98 \(PFR 0.9423\)"):
        allocate(sizes, 0.96, "uniform", min_filters=3)
    with pytest.raises(ValueError, match=r"allocation must be one of \('uniform', 'size', 'macs'\), got 'x'"):
        allocate(sizes, 0.5, "x")


def test_budget_term_pushes_every_open_gate_alike_until_the_share():
    gate = FilterGate(8, init=0.1)
    weight = budget_weight(grad_spread=0.02, size=8, strength=1.5)
    term = budget_term(gate(), keep=0.5, weight=weight)
    assert term.item() == pytest.approx(weight * 0.5)
    term.backward()
    # each logit is pushed by strength * spread (the gate's straight-through slope is 1/2)
    assert torch.allclose(gate.logits.grad, torch.full((8,), 1.5 * 0.02))
    gate.set_mask(torch.tensor([1, 1, 1, 0, 0, 0, 0, 0]))
    assert budget_term(gate(), keep=0.5, weight=weight).item() == 0.0  # under the share: no push


def test_gradient_spread_ignores_a_uniform_push_and_dead_gates():
    logits = torch.tensor([0.1, -0.2, 0.3, 5.0])  # the last one is outside the STE's clip
    grad = torch.tensor([1.0, 2.0, 3.0, 100.0])
    assert gradient_spread(grad, logits) == pytest.approx(1.0)
    assert gradient_spread(grad + 7.0, logits) == pytest.approx(1.0)
    assert gradient_spread(grad[:1], logits[:1]) == 0.0


def test_enforce_keep_takes_the_highest_logits_ties_to_the_lower_index():
    logits = torch.tensor([0.3, -0.2, 0.3, 0.9, -0.5, 0.0])
    assert enforce_keep(logits, 3).tolist() == [True, False, True, True, False, False]
    assert enforce_keep(logits, 0).sum() == 0 and enforce_keep(logits, 6).all()
    with pytest.raises(ValueError, match=r"keep must be in \[0, 6\], got 7"):
        enforce_keep(logits, 7)


def test_enforce_keep_across_shares_one_budget_and_keeps_the_floors():
    from lightning_bnnprune.pruning.budget import enforce_keep_across

    logits = {"a": torch.tensor([0.9, 0.8, 0.7, 0.6]), "b": torch.tensor([-0.5, -0.4, 0.1, -0.3])}
    masks = enforce_keep_across(logits, keep=5, floors={"a": 1, "b": 2})
    assert masks["b"].tolist() == [False, False, True, True]  # its floor: its own two highest
    assert masks["a"].tolist() == [True, True, True, False]  # then the highest logits anywhere
    with pytest.raises(ValueError, match=r"keep=2 must lie in \[3"):
        enforce_keep_across(logits, keep=2, floors={"a": 1, "b": 2})


def test_rank_logits_put_the_greedy_cut_at_zero():
    from lightning_bnnprune.pruning.budget import enforce_keep, rank_logits

    scores = torch.tensor([0.3, 0.1, 0.3, 0.9, 0.2])
    logits = rank_logits(scores, prune=2, spread=0.1)
    assert (logits < 0).tolist() == [False, True, False, False, True]  # the two lowest scores closed
    greedy_keep = torch.ones(5, dtype=torch.bool)
    greedy_keep[torch.argsort(scores, stable=True)[:2]] = False
    assert torch.equal(enforce_keep(logits, 3), greedy_keep)
    assert float(logits.max() - logits.min()) < 0.1


def test_final_retrain_closes_the_schedule_and_scales():
    s = LayerwiseSchedule.from_groups(["a", "b"], selector=2, retrain=3, final=5)
    assert s.total == 15 and s.phase_at(10).name == "final" and s.phase_at(14).stage == 2
    assert s.phase_at(15).name == DONE and LayerwiseSchedule(**s.state()) == s
    assert "final retrain" in str(s) and "final=5" in repr(s)
    small = s.scaled(8)
    assert small.total <= 8 and small.final >= 0 and small.selector >= 1
    with pytest.raises(ValueError, match="final length must be an int >= 0"):
        LayerwiseSchedule([["a"]], 1, 1, final=-1)


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
