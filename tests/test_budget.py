"""The pruning budget (pruning/budget.py): a global target shared out over layers (allocate, the
engine-friendly rounding, the global ranking) and the selector's budget term, moved here from
test_schedule.py, test_export_lce.py and test_greedy.py unchanged."""
from __future__ import annotations

import pytest
import torch

from lightning_bnnprune.pruning.budget import (
    allocate, budget_term, budget_weight, enforce_keep, enforce_keep_across, global_counts, gradient_spread, rank_logits,
    round_counts,
)
from lightning_bnnprune.pruning.gates import FilterGate

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
    logits = {"a": torch.tensor([0.9, 0.8, 0.7, 0.6]), "b": torch.tensor([-0.5, -0.4, 0.1, -0.3])}
    masks = enforce_keep_across(logits, keep=5, floors={"a": 1, "b": 2})
    assert masks["b"].tolist() == [False, False, True, True]  # its floor: its own two highest
    assert masks["a"].tolist() == [True, True, True, False]  # then the highest logits anywhere
    with pytest.raises(ValueError, match=r"keep=2 must lie in \[3"):
        enforce_keep_across(logits, keep=2, floors={"a": 1, "b": 2})


def test_rank_logits_put_the_greedy_cut_at_zero():
    scores = torch.tensor([0.3, 0.1, 0.3, 0.9, 0.2])
    logits = rank_logits(scores, prune=2, spread=0.1)
    assert (logits < 0).tolist() == [False, True, False, False, True]  # the two lowest scores closed
    greedy_keep = torch.ones(5, dtype=torch.bool)
    greedy_keep[torch.argsort(scores, stable=True)[:2]] = False
    assert torch.equal(enforce_keep(logits, 3), greedy_keep)
    assert float(logits.max() - logits.min()) < 0.1


def test_round_counts_keep_multiples_and_the_pfr_within_one_point():
    sizes = {"a": 64, "b": 128, "c": 256, "d": 512}
    for round_to in (8, 32):
        counts = allocate(sizes, 0.4, round_to=round_to)
        kept = {k: sizes[k] - v for k, v in counts.items()}
        assert all(v % round_to == 0 or v == sizes[k] for k, v in kept.items()), kept
        assert abs(sum(counts.values()) / sum(sizes.values()) - 0.4) <= 0.01
    assert allocate(sizes, 0.4, round_to=1) == allocate(sizes, 0.4)
    assert allocate(sizes, 0.4, round_to=32) == {"a": 32, "b": 64, "c": 96, "d": 192}


def test_round_counts_refuses_an_unreachable_target_in_one_line():
    with pytest.raises(ValueError, match=r"round_to=32 cannot keep the PFR within 1% of 0.4000: the nearest reachable is"):
        allocate({"a": 16, "b": 16, "c": 32, "d": 32, "e": 64}, 0.4, round_to=32)
    with pytest.raises(ValueError, match=r"round_to must be an int >= 1, got 0"):
        round_counts({"a": 8}, {"a": 2}, 0)


def test_global_ranking_respects_floors_and_normalises_per_group():
    sizes = {"a": 3, "b": 7, "c": 7, "d": 100, "e": 2}
    scores = {g: torch.rand(n, generator=torch.Generator().manual_seed(n)) for g, n in sizes.items()}
    scores["d"] = scores["d"] * 1000  # a layer on another scale is not spared by it
    for total in (0, 1, 50, 109):
        counts = global_counts(scores, total, min_filters=2)
        assert sum(counts.values()) == total and counts["e"] == 0
        assert all(counts[g] <= sizes[g] - 2 for g in ("a", "b", "c", "d"))
    assert 0 < global_counts(scores, 50, min_filters=2)["d"] < 100
    with pytest.raises(ValueError, match="cannot close 110 filters: min_filters=2 leaves 109"):
        global_counts(scores, 110, min_filters=2)
