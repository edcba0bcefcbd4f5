"""The allocation (pruning/allocation.py): a global target shared out over layers (allocate, the
engine-friendly rounding, the global ranking). The selector's budget term and the selection from
learned logits are in test_selector.py."""
from __future__ import annotations

import pytest
import torch

from lightning_bnnprune.pruning.allocation import allocate, global_counts, round_counts

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
