"""The strategies' constructors read alike (issue 22, item 4): the target first, every other
argument keyword-only in one order for the concepts they share, the base class's arguments passed
on by keyword; 0.1's spellings still run until 0.3.0, each with a FutureWarning naming the new one;
``gate_init``'s two meanings are two arguments, each started as it says."""
from __future__ import annotations

import inspect
import warnings
from typing import Dict

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_bnnprune import (Binarize, FilterPruning, GreedyFilterPruning, MainSubsidiaryPruning,
                                ZeroFilterPruning)

from helpers import UserModule, random_images, small_trainer

STRATEGIES = [FilterPruning, MainSubsidiaryPruning, GreedyFilterPruning, ZeroFilterPruning]
#: The concepts strategies share, in the one order their signatures follow.
SHARED = ["target_pfr", "target_speedup", "latency_table", "criterion", "allocation", "unit", "warmup", "retrain",
          "scale_to_fit", "network", "input_size", "exclude", "min_filters", "round_to", "distill", "distill_temperature", "remove_at_end"]


@pytest.mark.parametrize("cls", STRATEGIES, ids=lambda c: c.__name__)
def test_the_target_is_the_one_positional_argument_and_shared_ones_come_in_one_order(cls):
    params = [p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"]
    positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == ([] if cls is ZeroFilterPruning else ["target_pfr"])  # no target: all keyword-only
    assert all(p.kind == p.KEYWORD_ONLY for p in params if p.name not in positional)
    names = [p.name for p in params]
    shared = [n for n in names if n in SHARED]
    assert shared == sorted(shared, key=SHARED.index)
    targets = ("target_pfr", "target_speedup", "latency_table")  # the target opens the signature
    base = [n for n in inspect.signature(FilterPruning.__init__).parameters if n in names and n not in targets]
    assert names[-len(base):] == base  # FilterPruning's arguments (those it takes) close the signature, in order


@pytest.mark.parametrize("make", [
    lambda: MainSubsidiaryPruning(0.4), lambda: GreedyFilterPruning(0.4), lambda: ZeroFilterPruning(),
    lambda: MainSubsidiaryPruning(0.4, gate_init_criterion=None, gate_init_logit=0.2, distill=1.0, round_to=2),
], ids=["msf", "greedy", "zero", "msf-options"])
def test_the_strategies_pass_the_base_arguments_by_keyword(make):
    """A positional pass to FilterPruning would take 0.1's path and warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make()


def _state(callback) -> Dict:
    return {k: v for k, v in vars(callback).items() if not k.startswith("_") and k not in ("criterion",
                                                                                          "gate_init_criterion")}


@pytest.mark.parametrize("old, new, says", [
    (lambda: MainSubsidiaryPruning(0.3, 5, 6, 1), lambda: MainSubsidiaryPruning(0.3, selector=5, retrain=6, warmup=1),
     r"MainSubsidiaryPruning's arguments after target_pfr are keyword-only: pass selector, retrain, warmup by keyword"),
    (lambda: MainSubsidiaryPruning(0.3, lambda_kd=0.5), lambda: MainSubsidiaryPruning(0.3, selector_distill=0.5),
     r"MainSubsidiaryPruning\(lambda_kd=...\) is now MainSubsidiaryPruning\(selector_distill=...\)"),
    (lambda: MainSubsidiaryPruning(0.3, temperature=2.0),
     lambda: MainSubsidiaryPruning(0.3, selector_distill_temperature=2.0), r"\(selector_distill_temperature=...\)"),
    (lambda: MainSubsidiaryPruning(0.3, gate_init=0.2, gate_init_criterion=None),
     lambda: MainSubsidiaryPruning(0.3, gate_init_logit=0.2, gate_init_criterion=None), r"\(gate_init_logit=...\)"),
    (lambda: MainSubsidiaryPruning(0.3, gate_init=0.3), lambda: MainSubsidiaryPruning(0.3, gate_init_spread=0.3),
     r"\(gate_init_spread=...\)"),
    (lambda: MainSubsidiaryPruning(0.3, gate_init=0.0),  # 0.1 spread a ranking by at least 0.01
     lambda: MainSubsidiaryPruning(0.3, gate_init_spread=0.01), r"\(gate_init_spread=...\)"),
    (lambda: GreedyFilterPruning("binarization_error", 0.3, "layerwise", retrain=2),
     lambda: GreedyFilterPruning(0.3, criterion="binarization_error", mode="layerwise", retrain=2),
     r"GreedyFilterPruning's arguments after target_pfr are keyword-only: pass criterion, mode by keyword"),
    (lambda: GreedyFilterPruning(), lambda: GreedyFilterPruning(0.4),
     r"GreedyFilterPruning\(\) without target_pfr used target_pfr=0.4; pass it"),
    (lambda: ZeroFilterPruning(0.1, None, None, ["x"]), lambda: ZeroFilterPruning(atol=0.1, exclude=["x"]),
     r"ZeroFilterPruning's arguments are keyword-only: pass atol, network, input_size, exclude by keyword"),
], ids=["msf-positional", "lambda_kd", "temperature", "gate_init-logit", "gate_init-spread", "gate_init-0",
        "greedy-criterion-first", "greedy-no-target", "zero-positional"])
def test_old_spellings_run_until_0_3_with_a_warning(old, new, says):
    with pytest.warns(FutureWarning, match=says) as record:
        built = old()
    assert all("fails from 0.3.0" in str(w.message) for w in record if w.category is FutureWarning)
    assert _state(built) == _state(new())


def test_a_strategy_written_for_0_1_still_builds():
    """docs/extending.md's 0.1 example passed the base arguments positionally."""

    class Old(FilterPruning):
        def __init__(self, target_pfr=0.4, network=None, input_size=None, exclude=(), min_filters=1,
                     remove_at_end=True, round_to=1):
            super().__init__(target_pfr, network, input_size, exclude, min_filters, remove_at_end, round_to=round_to)

    with pytest.warns(FutureWarning, match=r"FilterPruning's arguments after target_pfr are keyword-only: pass "
                                           r"network, input_size, exclude, min_filters, remove_at_end by keyword"):
        old = Old(0.3, "net", None, ["a"], 2, False, round_to=4)
    assert (old.target_pfr, old.network, old.exclude, old.min_filters, old.remove_at_end, old.round_to) == (
        0.3, "net", ["a"], 2, False, 4)


@pytest.mark.parametrize("call, match", [
    (lambda: MainSubsidiaryPruning(0.3, lambda_kd=1.0, selector_distill=1.0),
     r"got both 'lambda_kd' \(0.1's name\) and 'selector_distill'"),
    (lambda: GreedyFilterPruning("l1", criterion="l1"), r"got multiple values for argument 'criterion'"),
    (lambda: ZeroFilterPruning(*range(8)), r"takes at most 7 positional arguments in 0.1's order \(0 now\), got 8"),
])
def test_a_call_neither_spelling_accepts_is_a_type_error(call, match):
    with pytest.raises(TypeError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        call()


@pytest.mark.parametrize("kwargs, match", [
    ({"gate_init_logit": 0.2}, r"`gate_init_logit` is the start of gates opened alike \(gate_init_criterion=None\); "
                               r"with gate_init_criterion='l1' set `gate_init_spread`"),
    ({"gate_init_criterion": None, "gate_init_spread": 0.2}, r"`gate_init_spread` spreads a criterion's ranking"),
    ({"gate_init_criterion": None, "gate_init_logit": 1.5}, r"`gate_init_logit` must be None or in \[0, 1\], got 1.5"),
    ({"gate_init_spread": 0}, r"`gate_init_spread` must be None or in \(0, 1\], got 0"),
])
def test_the_two_gate_starts_refuse_each_others_case(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        MainSubsidiaryPruning(0.3, **kwargs)


class FirstLogits(Callback):
    """The gates' logits as the selector's first step starts (after the callback set them)."""

    def __init__(self) -> None:
        self.logits: Dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.logits:
            self.logits = {n: g.logits.detach().clone() for n, g in self.msf.gates.items()}


@pytest.mark.parametrize("start", [{"gate_init_criterion": None, "gate_init_logit": 0.3},
                                   {"gate_init_criterion": "l1", "gate_init_spread": 0.2}], ids=["logit", "spread"])
def test_each_gate_start_does_what_its_name_says(tmp_path, start):
    L.seed_everything(0)
    msf = MainSubsidiaryPruning(0.4, selector=1, retrain=1, final_retrain=0, remove_at_end=False, **start)
    first = FirstLogits()
    first.msf = msf
    small_trainer(tmp_path, [Binarize(), msf, first], 2).fit(UserModule(), random_images(n=4, batch_size=4))
    for name, logits in first.logits.items():
        n = logits.numel()
        if "gate_init_logit" in start:  # every gate open at the same logit
            assert torch.equal(logits, torch.full_like(logits, 0.3)), name
        else:  # ranks spread evenly over `spread`, the planned count closed
            assert float(logits.max() - logits.min()) == pytest.approx(0.2 * (n - 1) / n, rel=1e-5), name
            assert int((logits < 0).sum()) == msf.prune_counts[name], name
