"""A latency budget: ``target_speedup`` met on a per-layer LCE latency table, by greedy and msf."""
import math
import os

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_bnnprune.callbacks.binarize import Binarize
from lightning_bnnprune.callbacks.greedy import GreedyFilterPruning
from lightning_bnnprune.callbacks.msf import MainSubsidiaryPruning
from lightning_bnnprune.pruning.allocation import allocate_latency
from lightning_bnnprune.pruning.groups import find_channel_groups
from lightning_bnnprune.pruning.latency_table import (WORD, LatencyTable, binary_conv_sites, measure_table,
                                                      network_ms)

from helpers import UserModule, engine_like_table, needs_interpreter, random_images, small_trainer


SIZE = 32


def _fit(tmp_path, pruning, max_steps=4):
    seed_everything(0)
    module = UserModule("test_resnet", lr=1e-2, example_input_size=(3, SIZE, SIZE))
    trainer = small_trainer(tmp_path, [Binarize(), pruning], max_steps)
    trainer.fit(module, random_images(16, 8, size=SIZE))
    return module, trainer


def _estimated_speedup(table, pruning):
    kept = {name: len(keep) for name, keep in pruning.record.groups.items()}
    return network_ms(table, pruning._sites, {}) / network_ms(table, pruning._sites, kept)


@pytest.mark.parametrize("make", [
    lambda t: GreedyFilterPruning(target_speedup=1.6, latency_table=t, warmup=1),
    lambda t: MainSubsidiaryPruning(target_speedup=1.6, latency_table=t, warmup=0, selector=1, retrain=1,
                                    final_retrain=0),
], ids=["greedy", "msf"])
def test_target_speedup_reaches_the_estimate(tmp_path, make):
    table = engine_like_table()
    pruning = make(table)
    _fit(tmp_path, pruning)
    speedup = _estimated_speedup(table, pruning)
    # the budget is met, by no more than the last move overshoots it
    assert 1.6 <= speedup <= 1.6 * 1.1, speedup
    assert pruning.summary["estimated_lce_speedup"] == pytest.approx(speedup)
    assert "measured_lce_speedup" not in pruning.summary  # a given table may be another machine's: not re-timed here
    assert pruning.record.pfr > 0


@needs_interpreter
def test_target_speedup_is_checked_on_the_exported_file(tmp_path, monkeypatch, caplog):
    """With the table measured here, the plan is exported and timed against the whole network, and
    re-planned (at most 3 files) while the file is more than 2 % off the target."""
    monkeypatch.setenv("BNNPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    pruning = GreedyFilterPruning(target_speedup=1.3, warmup=1)
    with caplog.at_level("INFO"):
        _fit(tmp_path, pruning, max_steps=2)
    checks = [r.getMessage() for r in caplog.records if "checked on the exported file" in r.getMessage()]
    assert 1 <= len(checks) <= 3, checks
    measured = [float(m.split("measured ")[1].split(" ")[0]) for m in checks]
    kept = pruning.summary["measured_lce_speedup"]
    assert kept == pytest.approx(min(measured, key=lambda v: abs(v / 1.3 - 1)), abs=1e-3)  # the nearest plan
    assert pruning.summary["mac_ratio"] > 1 and pruning.summary["estimated_lce_speedup"] > 1


def test_latency_allocation_spends_where_time_is_bought():
    """Two groups alike but for time: the one whose channels cost more time loses more of them."""
    sizes = {"cheap": 64, "dear": 64}
    ones = {k: torch.ones(64) for k in sizes}
    cost = {"cheap": 1.0, "dear": 4.0}

    def latency(kept):
        return sum(cost[k] * math.ceil(kept[k] / WORD) for k in sizes)

    counts = allocate_latency(sizes, ones, latency, budget_ms=latency(sizes) / 1.5, steps={"cheap": 8, "dear": 8})
    assert counts == {"cheap": 0, "dear": 32}  # one word of 'dear' saves 4 of 10: enough, and 32 lost
    with pytest.raises(ValueError, match="out of reach"):
        allocate_latency(sizes, ones, latency, budget_ms=0.1)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_pfr": 0.4, "target_speedup": 2.0}, "exactly one of `target_pfr` and `target_speedup`"),
    ({"target_speedup": 0.9}, "`target_speedup` must be a number > 1"),
    ({"target_pfr": 0.4, "latency_table": "t.json"}, "`latency_table` is for target_speedup"),
])
@pytest.mark.parametrize("strategy", [GreedyFilterPruning, MainSubsidiaryPruning])
def test_exactly_one_target(strategy, kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        strategy(**kwargs)


def test_neither_target():
    # (GreedyFilterPruning() still means 0.1's target_pfr=0.4, with a FutureWarning, until 0.3.0)
    with pytest.raises(MisconfigurationException,
                       match="exactly one of `target_pfr` and `target_speedup`, got neither"):
        MainSubsidiaryPruning()


def test_target_speedup_needs_its_allocation():
    with pytest.raises(MisconfigurationException, match="allocation='learned'"):
        MainSubsidiaryPruning(target_speedup=2.0, allocation="uniform")
    with pytest.raises(MisconfigurationException, match="leave `allocation` at 'uniform'"):
        GreedyFilterPruning(target_speedup=2.0, allocation="macs")


def test_resume_records_target_speedup(tmp_path):
    table = engine_like_table()
    first = GreedyFilterPruning(target_speedup=1.6, latency_table=table, warmup=1, remove_at_end=False)
    _fit(tmp_path, first, max_steps=2)
    assert first.state_dict()["settings"]["target_speedup"] == 1.6
    again = GreedyFilterPruning(target_speedup=1.8, latency_table=table, warmup=1)
    with pytest.raises(MisconfigurationException, match="target_speedup"):
        again.load_state_dict(first.state_dict())


@pytest.mark.skipif(not os.environ.get("BNNPRUNE_LCE_PYTHON"),
                    reason="set BNNPRUNE_LCE_PYTHON to a numpy<2 Python with larq-compute-engine to time LCE")
def test_measure_one_tiny_layer(tmp_path):
    """A real measurement: one binary conv at its candidate counts, cached, and the float part."""
    from lightning_bnnprune.layers import BinaryConv2d

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                              BinaryConv2d(64, 64, 3, padding=1, bias=False), torch.nn.BatchNorm2d(64),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    x = torch.randn(1, 3, 8, 8)
    sites = binary_conv_sites(net, find_channel_groups(net, x), x)
    assert len(sites) == 1 and sites[0].out_group is not None  # the stem is float: C_in stays
    table = measure_table(net, sites, x, cache_dir=str(tmp_path), rounds=3, calls=2,
                          analysis=find_channel_groups(net, x))
    # the candidates, and the half network's counts (its float part's second point)
    assert set(table.points[sites[0].geometry]) >= {(i, o) for i in (32, 64) for o in (32, 64)}
    assert table.float_half is not None and 0 < table.float_half[0] < 1
    assert all(ms > 0 for ms in table.points[sites[0].geometry].values())
    assert len(os.listdir(tmp_path)) == 2  # the geometry's cache file, the network's float part
    assert table.float_ms >= 0 and table.meta["network_ms"] > 0
    again = measure_table(net, sites, x, cache_dir=str(tmp_path), rounds=3, calls=2)  # from the cache
    assert again.points == table.points and again.float_ms == table.float_ms
    assert "network_ms" not in again.meta  # nothing timed the second time


def test_float_part_through_two_points_clamped():
    table = LatencyTable({}, float_ms=4.0, float_half=(0.5, 3.0))
    assert table.float_part(1.0) == 4.0 and table.float_part(0.5) == pytest.approx(3.0)
    assert table.float_part(0.25) == pytest.approx(2.5)  # on the line
    steep = LatencyTable({}, float_ms=4.0, float_half=(0.9, 1.0))  # faster than proportional: noise
    assert steep.float_part(0.5) == pytest.approx(2.0)  # clamped to proportional
    rising = LatencyTable({}, float_ms=4.0, float_half=(0.5, 5.0))
    assert rising.float_part(0.5) == 4.0  # clamped to fixed
    assert LatencyTable.from_dict(table.to_dict()).float_half == (0.5, 3.0)


class _SavePlanPerRank(Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, GreedyFilterPruning))
        torch.save({"groups": pruning.record.groups, "estimated": pruning.summary["estimated_lce_speedup"]},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))

    def teardown(self, trainer, pl_module, stage):
        # Rank 1 twice aborted at exit in CI (SIGABRT, "terminate called without an active
        # exception") after the fit had ended. End the process group here, while the process is
        # whole, rather than in the interpreter's shutdown. A mitigation: the cause is not proven.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_under_ddp_every_rank_cuts_rank_zeros_plan(tmp_path):
    """Timings differ per process, so the plan is rank zero's, broadcast: both ranks cut alike."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import DDPStrategy

    seed_everything(0)
    module = UserModule("test_resnet", lr=1e-2, example_input_size=(3, SIZE, SIZE))
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo", start_method="spawn"),
        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[Binarize(), GreedyFilterPruning(target_speedup=1.6, latency_table=engine_like_table(), warmup=1),
                   _SavePlanPerRank(str(tmp_path))])
    trainer.fit(module, random_images(16, 8, size=SIZE))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0 == r1 and r0["estimated"] >= 1.6
