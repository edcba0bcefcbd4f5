"""Engine-aware counts: ``round_to="lce"`` / ``"onednn"`` keep what the engine turns into time."""
import logging

import pytest
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_bnnprune.callbacks.binarize import Binarize
from lightning_bnnprune.callbacks.greedy import GreedyFilterPruning
from lightning_bnnprune.callbacks.msf import MainSubsidiaryPruning
from lightning_bnnprune.pruning.allocation import ENGINES, engine_steps, round_counts

from helpers import UserModule, random_images, small_trainer


def _fit(tmp_path, pruning, caplog, max_steps=4):
    seed_everything(0)
    module = UserModule("test_resnet", lr=1e-2, example_input_size=(3, 32, 32))
    trainer = small_trainer(tmp_path, [Binarize(), pruning], max_steps)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, random_images(16, 8))
    return module


@pytest.mark.parametrize("make", [
    lambda: GreedyFilterPruning(0.3, round_to="lce", warmup=1),
    lambda: GreedyFilterPruning(0.3, round_to="lce", allocation="global", warmup=1),
    lambda: MainSubsidiaryPruning(0.3, round_to="lce", warmup=0, selector=1, retrain=1, final_retrain=0),
], ids=["greedy", "greedy-global", "msf-learned"])
def test_lce_keeps_words_where_it_can_and_says_where_not(tmp_path, caplog, make):
    pruning = make()
    _fit(tmp_path, pruning, caplog)
    sizes = {name: pruning.analysis[name].size for name in pruning.record.groups}
    kept = {name: len(keep) for name, keep in pruning.record.groups.items()}
    for name, n in sizes.items():
        quantum = 32 if n > 32 else 8  # test_resnet: 48, 96, 192 reach a word; 16 and 32 cannot
        assert kept[name] == n or kept[name] % quantum == 0, (name, n, kept[name])
    assert any(kept[n] < sizes[n] for n in sizes if sizes[n] > 32)  # words were cut, not only narrow groups
    assert abs(pruning.record.pfr - 0.3) <= 0.01
    lines = [r.getMessage() for r in caplog.records if "round_to='lce'" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].endswith("keep multiples of 8: conv1.3 (16), conv1.6 (32), layer1.0.conv1 (32)"), lines[0]


def test_engine_steps():
    sizes = {"narrow": 16, "word": 32, "wide": 64, "odd": 40}
    assert engine_steps(sizes, "lce") == ({"narrow": 8, "word": 8, "wide": 32, "odd": 32}, ["narrow", "word"])
    assert engine_steps(sizes, "onednn") == ({"narrow": 8, "word": 16, "wide": 16, "odd": 16}, ["narrow"])
    assert engine_steps(sizes, 4) == ({k: 4 for k in sizes}, [])
    counts = round_counts(sizes, {"narrow": 7, "word": 15, "wide": 33, "odd": 9}, "lce")
    kept = {k: sizes[k] - c for k, c in counts.items()}
    assert kept["wide"] % 32 == 0 and kept["narrow"] % 8 == 0 and kept["word"] % 8 == 0
    assert kept == {"narrow": 8, "word": 16, "wide": 32, "odd": 32}
    with pytest.raises(ValueError, match="round_to must be an int >= 1 or one of 'lce', 'onednn'; got 'tensorrt'"):
        engine_steps(sizes, "tensorrt")


@pytest.mark.parametrize("strategy", [GreedyFilterPruning, MainSubsidiaryPruning])
def test_unknown_engine_refused(strategy):
    with pytest.raises(MisconfigurationException,
                       match=r"`round_to` must be an int >= 1, got 'tflite' \(or an engine: 'lce', 'onednn'\)"):
        strategy(0.4, round_to="tflite")
    assert set(ENGINES) == {"lce", "onednn"}


@pytest.mark.parametrize("prune", ["msf", "greedy_l1", "stq", "random", "bdg"])
def test_export_lce_makes_lce_counts_the_default(compose_train, prune):
    """The app: `export=lce` rounds to LCE's blocks unless the user says otherwise; other exports don't."""
    from hydra.utils import instantiate

    assert compose_train([f"prune={prune}", "export=lce"]).prune.round_to == "lce"
    assert compose_train([f"prune={prune}", "export=packed"]).prune.round_to == 1
    assert compose_train([f"prune={prune}"]).prune.round_to == 1
    assert compose_train([f"prune={prune}", "export=lce", "schedule.round_to=4"]).prune.round_to == 4
    if prune != "bdg":
        cfg = compose_train([f"prune={prune}", "export=lce", "schedule.target_pfr=null", "schedule.target_speedup=2.0"])
        pruning = instantiate(cfg.prune)
        assert (pruning.target_pfr, pruning.target_speedup, pruning.round_to) == (None, 2.0, "lce")
