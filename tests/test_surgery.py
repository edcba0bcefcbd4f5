"""Physical filter removal on real timm families: exact, reloadable, refused where it cannot be exact."""
import os

import pytest
import timm
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_bnnprune import Binarize
from lightning_bnnprune.binarize import binarize_model, binary_layers
from lightning_bnnprune.callbacks.base import FilterPruning
from lightning_bnnprune.pruning.gates import attach_gates, gates_of
from lightning_bnnprune.pruning.groups import find_channel_groups
from lightning_bnnprune.pruning.record import (
    CHECKPOINT_KEY, PruningRecord, load_pruned, restore_pruned, save_pruned, shape_manifest,
)
from lightning_bnnprune.pruning.surgery import remove_filters, resolve_keep

from conftest import UserModule, randomise_norms

FAMILIES = [
    "test_resnet", "test_efficientnet", "test_byobnet", "test_nfnet", "resnet18", "resnet50",
    "vgg11", "mobilenetv3_small_100", "efficientnet_b0", "regnetx_002", "densenet121",
]
# timm's VGG head is a 7x7 conv to 4096 filters (102M weights) that no 32x32 test needs; a narrower
# hidden layer keeps the same code path (ConvMlp, binarised, pruned) at 1/16 of the size. It also
# exercises a constructor keyword that the record must carry to rebuild the model.
TIMM_KWARGS = {"vgg11": {"mlp_ratio": 0.0625}}


def binary_net(name: str, seed: int = 0) -> nn.Module:
    """A binarised timm model in eval mode with random BN statistics (so a wrong cut shows)."""
    torch.manual_seed(seed)
    net = timm.create_model(name, num_classes=10, **TIMM_KWARGS.get(name, {}))
    binarize_model(net)
    return randomise_norms(net).eval()


def close_random(net, analysis, seed=0, low=0.3, high=0.5):
    """Attach gates and close a seeded random 30-50% of every prunable group."""
    g = torch.Generator().manual_seed(seed)
    gates = attach_gates(net, analysis)
    masks = {}
    for group in analysis.groups:
        share = low + (high - low) * float(torch.rand(1, generator=g))
        p = group.num_parts  # a group feeding a grouped conv closes as many channels in every cell
        closed = min(p * int(round(share * group.size / p)), group.capacity())
        keep = ~group.keep_top(torch.rand(group.size, generator=g), closed)
        gates[group.name].set_mask(keep)
        masks[group.name] = keep
    return masks


def inputs(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def num_params(net):
    return sum(p.numel() for n, p in net.named_parameters() if "filter_gate" not in n)


@pytest.mark.parametrize("name", FAMILIES)
def test_removal_is_exact_smaller_and_reloads(tmp_path, name):
    net = binary_net(name)
    x = inputs()
    analysis = find_channel_groups(net, x[:1])
    assert analysis.groups, analysis.refused
    masks = close_random(net, analysis)
    params_before = num_params(net)
    with torch.no_grad():
        gated = net(x)

    record = remove_filters(net, analysis, example_inputs=x, timm_kwargs=TIMM_KWARGS.get(name))

    with torch.no_grad():
        pruned = net(x)
    assert (pruned - gated).abs().max() <= 1e-4
    assert record.max_abs_diff <= 1e-4
    assert not gates_of(net) and not net.training
    assert record.groups == {n: torch.nonzero(k).flatten().tolist() for n, k in masks.items()}
    assert 0.25 <= record.pfr <= 0.55
    # parameters dropped exactly as the record says
    assert record.params_before == params_before
    assert num_params(net) == record.params_after < params_before
    assert shape_manifest(net) == record.shapes
    for module_name, dim, kept in record.removed:
        module = net.get_submodule(module_name)
        size = module.weight.shape[1] * getattr(module, "groups", 1) if dim == "in" else module.weight.shape[0]
        assert size == len(kept)

    path = save_pruned(net, record, tmp_path / "pruned.pt")
    loaded = load_pruned(path)  # rebuilt from the record alone: timm name + kwargs, binarise, replay
    assert binary_layers(loaded) == binary_layers(net)
    assert num_params(loaded) == record.params_after
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned)


def test_a_family_without_prunable_group_is_refused_naming_the_layer():
    net = binary_net("test_convnext")
    analysis = find_channel_groups(net, inputs(1))
    assert not analysis.groups and analysis.refused
    assert all("LayerNorm normalises across channels" in why for why in analysis.refused.values())
    with pytest.raises(ValueError, match=r"no prunable channel group.*blocks\.0\.norm: LayerNorm normalises across channels"):
        remove_filters(net, analysis, example_inputs=inputs())
    refused = next(iter(analysis.refused))
    with pytest.raises(ValueError, match=rf"group '{refused}' cannot be pruned: .*LayerNorm normalises across channels"):
        remove_filters(net, analysis, masks={refused: [0]}, example_inputs=inputs())


@pytest.fixture(scope="module")
def small():
    net = binary_net("test_nfnet")
    return net, find_channel_groups(net, inputs(1))


def test_refused_group_of_a_partly_prunable_family():
    net = binary_net("test_efficientnet_gn")
    analysis = find_channel_groups(net, inputs(1))
    assert analysis.groups
    refused, why = next(iter(analysis.refused.items()))
    assert "GroupNormAct normalises across channels" in why
    with pytest.raises(ValueError, match=rf"group '{refused}' cannot be pruned: .*GroupNormAct normalises"):
        remove_filters(net, analysis, masks={refused: [0]})


@pytest.mark.parametrize(
    "masks, match",
    [
        ({"nope": [0]}, r"unknown group 'nope'; prunable groups: stem"),
        ({"FIRST": [0, 99]}, r"keep indices for '.*' must be in \[0, \d+\), got \[0, 99\]"),
        ({"FIRST": [True, False]}, r"keep mask for '.*' has 2 entries, the group has \d+ channels"),
        ({"FIRST": [0.5, 0.2]}, r"keep-set for '.*' must be channel indices or a 0/1 mask"),
    ],
)
def test_bad_keep_sets(small, masks, match):
    net, analysis = small
    masks = {(analysis.names[0] if k == "FIRST" else k): v for k, v in masks.items()}
    with pytest.raises(ValueError, match=match):
        remove_filters(net, analysis, masks=masks)


def test_keep_sets_as_indices_or_masks_and_min_filters(small):
    net, analysis = small
    first, second = analysis.names[:2]
    size = analysis[first].size
    by_idx = resolve_keep(net, analysis, {first: [1, 3], second: []}, min_filters=2)
    by_mask = resolve_keep(
        net, analysis, {first: torch.tensor([i in (1, 3) for i in range(size)]), second: torch.zeros(analysis[second].size)},
        min_filters=2,
    )
    assert torch.nonzero(by_idx[first]).flatten().tolist() == [1, 3]
    assert torch.equal(by_idx[first], by_mask[first])
    assert int(by_idx[second].sum()) == 2  # an emptied group keeps min_filters channels
    assert all(bool(k.all()) for n, k in by_idx.items() if n not in (first, second))  # no gates: keep all
    with pytest.raises(ValueError, match="min_filters must be >= 1, got 0"):
        resolve_keep(net, analysis, {}, min_filters=0)


def test_explicit_keep_sets_on_an_ungated_model_and_gate_minimum(tmp_path):
    net = binary_net("test_resnet")
    x = inputs()
    analysis = find_channel_groups(net, x[:1])
    gates = attach_gates(net, analysis)
    owner = analysis.names[0]
    gates[owner].set_mask(torch.zeros(analysis[owner].size))  # every gate closed
    gates[owner].logits.data[3] = -0.1  # ... this one least
    net.train()
    record = remove_filters(net, analysis, masks={analysis.names[1]: [0, 1]}, example_inputs=x, min_filters=1)
    assert net.training and all(m.training for m in net.modules())  # the mode is given back
    assert record.groups[owner] == [3]  # the closed channel with the highest logit reopens
    assert record.groups[analysis.names[1]] == [0, 1]
    assert PruningRecord.from_json(record.to_json()) == record


def test_reload_into_a_model_that_does_not_match_is_a_clear_error(tmp_path):
    net = binary_net("test_resnet")
    x = inputs()
    analysis = find_channel_groups(net, x[:1])
    close_random(net, analysis)
    record = remove_filters(net, analysis, example_inputs=x)
    path = save_pruned(net, record, tmp_path / "p.pt")
    with pytest.raises(ValueError, match=r"does not match the pruning record before the removal: .*model \[5, \d+\], record \[10, \d+\]"):
        load_pruned(path, model=timm.create_model("test_resnet", num_classes=5))
    with pytest.raises(ValueError, match=r"the model's binary layers differ from the record's"):
        other = timm.create_model("test_resnet", num_classes=10)
        binarize_model(other, keep_fp=["layer1.*"])
        load_pruned(path, model=other)
    with pytest.raises(ValueError, match=r"the model's weights do not match the record"):
        save_pruned(binary_net("test_resnet"), record, tmp_path / "q.pt")
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"is not a pruned model written by save_pruned"):
        load_pruned(tmp_path / "plain.pt")


# --------------------------------------------------------------------------- in a real Trainer
class RandomClosing(FilterPruning):
    """The smallest strategy: close a fixed seeded random share of every group once the gates exist
    (in ``setup``, before DDP wraps the module: the gates never train, so DDP must not wait for
    their gradients)."""

    @override
    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        g = torch.Generator().manual_seed(0)
        for gate in self.gates.values():
            gate.logits.requires_grad_(False)
            n = gate.logits.numel()
            keep = torch.ones(n, dtype=torch.bool)
            keep[torch.randperm(n, generator=g)[: int(self.target_pfr * n)]] = False
            gate.set_mask(keep)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (16,), generator=g)), batch_size=8)


def _fit(tmp_path, module):
    pruning = RandomClosing(target_pfr=0.4, input_size=(3, 32, 32))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[Binarize(), pruning, checkpoint],
    )
    trainer.fit(module, _loader())
    return trainer, pruning, checkpoint


def test_fit_end_removes_in_place_writes_pruned_checkpoint_report_and_restores(tmp_path):
    seed_everything(0)
    module = UserModule()
    params_fp = num_params(module)
    trainer, pruning, checkpoint = _fit(tmp_path, module)

    record = pruning.record
    assert record is not None and record.network_path == "net"
    assert num_params(module) == record.params_after < params_fp  # the user's module IS the smaller net
    assert not gates_of(module.net)
    assert 0.35 <= pruning.pfr() <= 0.45 and pruning.kept_filters() == {n: len(k) for n, k in record.groups.items()}
    assert set(pruning.summary) >= {"pfr", "mac_ratio", "compression"}
    assert pruning.summary["mac_ratio"] > 2.0 and pruning.summary["compression"] > 32.0
    assert pruning.pruned_path == os.path.join(tmp_path / "ckpt", "pruned.pt")
    for suffix in ("csv", "md", "png"):
        assert os.path.getsize(pruning.report_paths[suffix]) > 0
    assert os.path.dirname(pruning.report_paths["md"]) == str(tmp_path / "ckpt")

    x = inputs()
    module.eval()
    with torch.no_grad():
        expected = module(x)
        assert torch.equal(load_pruned(pruning.pruned_path)(x), expected)

    # A Lightning checkpoint saved after the removal carries the record: one call restores it.
    final = tmp_path / "ckpt" / "final.ckpt"
    trainer.save_checkpoint(final)
    ckpt = torch.load(final, weights_only=True)
    assert ckpt[CHECKPOINT_KEY]["groups"] == record.groups
    assert "optimizer_states" not in ckpt  # the fit's optimizer state belongs to the uncut tensors
    fresh = restore_pruned(UserModule(), final).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    bare = restore_pruned(timm.create_model("test_resnet", num_classes=10), final).eval()
    with torch.no_grad():
        assert torch.equal(bare(x), expected)

    # The checkpoints ModelCheckpoint wrote during fit are the gated network: not restorable as pruned.
    during = checkpoint.best_model_path or checkpoint.last_model_path
    with pytest.raises(ValueError, match="holds no pruning record: it was saved before the filters were removed"):
        restore_pruned(UserModule(), during)

    # A second run into the same folder never overwrites: it gets -v1 names.
    _, second, _ = _fit(tmp_path, UserModule())
    assert second.pruned_path == os.path.join(tmp_path / "ckpt", "pruned-v1.pt")
    assert second.report_paths["csv"].endswith("pruning_report-v1.csv")
    with torch.no_grad():
        assert torch.equal(load_pruned(pruning.pruned_path)(x), expected)


def test_remove_at_end_false_leaves_the_gated_network(tmp_path):
    seed_everything(0)
    module = UserModule()
    pruning = RandomClosing(target_pfr=0.4, input_size=(3, 32, 32), remove_at_end=False)
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[Binarize(), pruning])
    trainer.fit(module, _loader())
    assert pruning.record is None and gates_of(module.net)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(("pruned", "pruning_report"))]


def test_replay_on_an_already_pruned_model_is_a_no_op(tmp_path):
    from lightning_bnnprune.pruning.record import replay

    net = binary_net("test_resnet")
    x = inputs()
    analysis = find_channel_groups(net, x[:1])
    close_random(net, analysis)
    record = remove_filters(net, analysis, example_inputs=x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert replay(net, record) is net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class SaveRecordPerRank(Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_fit_end(self, trainer, pl_module):
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, FilterPruning))
        torch.save({"record": pruning.record.to_dict(), "summary": pruning.summary},
                   os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


def test_ddp_spawn_every_rank_cuts_the_same_network_and_rank_zero_writes(tmp_path):
    # A spawn launcher hands rank zero's state dict back to the main process's (uncut) module, so
    # the workers cut a copy and the pruned model is the file; the main process must not fail.
    seed_everything(0)
    module = UserModule()
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo", start_method="spawn"),
        max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[Binarize(), RandomClosing(target_pfr=0.4, input_size=(3, 32, 32)), SaveRecordPerRank(str(tmp_path))],
    )
    trainer.fit(module, _loader())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    diffs = [r["record"].pop("max_abs_diff") for r in (r0, r1)]  # float noise may differ per process
    assert max(diffs) <= 1e-4
    assert r0["record"] == r1["record"] and r0["summary"] == r1["summary"]
    files = sorted(f for f in os.listdir(tmp_path) if f.startswith(("pruned", "pruning_report")))
    assert files == ["pruned.pt", "pruning_report.csv", "pruning_report.md", "pruning_report.png"]
    loaded = load_pruned(tmp_path / "pruned.pt")
    assert sum(p.numel() for p in loaded.parameters()) == r0["record"]["params_after"]
