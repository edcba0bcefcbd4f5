"""The selector phase's pieces alone (pruning/selector.py, no Trainer): the budget term and its
adaptive weight, the criterion-ranked start logits, and the selection that ends a phase
(ChannelGroup.keep_top, the one top-k, and keep_top_across for a shared budget). Moved from
test_budget.py with their assertions; the selector in a real Trainer is test_msf*.py."""
from __future__ import annotations

import pytest
import torch

from lightning_bnnprune.pruning.gates import FilterGate
from lightning_bnnprune.pruning.groups import ChannelGroup
from lightning_bnnprune.pruning.selector import (
    budget_term, budget_weight, gradient_spread, keep_top_across, rank_logits,
)


def whole(size: int) -> ChannelGroup:
    """A group without cells (no grouped conv): any count is fine."""
    return ChannelGroup("g", size, ())


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


def test_keep_top_takes_the_highest_logits_ties_to_the_lower_index():
    logits = torch.tensor([0.3, -0.2, 0.3, 0.9, -0.5, 0.0])
    group = whole(6)
    assert group.keep_top(logits, 3).tolist() == [True, False, True, True, False, False]
    assert group.keep_top(logits, 0).sum() == 0 and group.keep_top(logits, 6).all()
    with pytest.raises(ValueError, match=r"keep must be in \[0, 6\], got 7"):
        group.keep_top(logits, 7)


def test_keep_top_ranks_float64_logits_at_their_own_precision():
    """Logits trained in float64 (``precision="64-true"``) that float32 cannot tell apart."""
    logits = torch.tensor([1.0, 1.0 + 1e-12, 1.0 - 1e-12, 1.0 + 2e-12], dtype=torch.float64)
    assert whole(4).keep_top(logits, 2).tolist() == [False, True, False, True]
    cells = ChannelGroup("g", 4, (), parts=(0, 0, 1, 1))
    assert cells.keep_top(logits, 2).tolist() == [False, True, False, True]


def test_keep_top_across_shares_one_budget_and_keeps_the_floors():
    logits = {"a": torch.tensor([0.9, 0.8, 0.7, 0.6]), "b": torch.tensor([-0.5, -0.4, 0.1, -0.3])}
    masks = keep_top_across(logits, keep=5, floors={"a": 1, "b": 2})
    assert masks["b"].tolist() == [False, False, True, True]  # its floor: its own two highest
    assert masks["a"].tolist() == [True, True, True, False]  # then the highest logits anywhere
    with pytest.raises(ValueError, match=r"keep=2 must lie in \[3"):
        keep_top_across(logits, keep=2, floors={"a": 1, "b": 2})


def test_rank_logits_put_the_greedy_cut_at_zero():
    scores = torch.tensor([0.3, 0.1, 0.3, 0.9, 0.2])
    logits = rank_logits(scores, prune=2, spread=0.1)
    assert (logits < 0).tolist() == [False, True, False, False, True]  # the two lowest scores closed
    greedy_keep = torch.ones(5, dtype=torch.bool)
    greedy_keep[torch.argsort(scores, stable=True)[:2]] = False
    assert torch.equal(whole(5).keep_top(logits, 3), greedy_keep)
    assert float(logits.max() - logits.min()) < 0.1


@pytest.mark.parametrize("parts", [(), (0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2)], ids=["whole", "cells"])
def test_ranked_logits_select_what_the_greedy_rule_closes(parts):
    """The selector started from a criterion's ranking, unmoved, ends where the greedy rule cuts:
    both select through ChannelGroup.keep_top (the rule: ``~keep_top(-scores, p)``), per cell
    where a grouped conv needs it. Tied scores included."""
    group = ChannelGroup("g", 12, (), parts)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 4, (12,), generator=g).float()  # many ties
        for prune in range(0, 13, group.num_parts):
            rule = ~group.keep_top(-scores, prune)
            learned = group.keep_top(rank_logits(scores, prune, spread=0.1), 12 - prune)
            assert torch.equal(learned, rule), (scores, prune)
