"""GreedyFilterPruning inside a real Trainer, on a timm network held by the user's own module."""
import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_bnnprune.callbacks.binarize import Binarize
from lightning_bnnprune.callbacks.greedy import GreedyFilterPruning
from lightning_bnnprune.layers import BinaryConv2d

from helpers import UserModule, random_images, small_trainer


def user_module() -> UserModule:
    """A user's own module: the timm network under an arbitrary attribute name, AdamW with decay
    over every parameter, the gates' logits included: they must still never move."""
    return UserModule("test_resnet", attr="my_net", lr=1e-2, optimizer=torch.optim.AdamW, weight_decay=0.1,
                      example_input_size=(3, 32, 32))


class Probe(Callback):
    """Placed after the pruning callback: sees the gates right after each step's pruning."""

    def __init__(self, pruning, at_step=None):
        self.pruning, self.at_step = pruning, at_step
        self.closed_by_step = {}  # step -> names of groups with a closed gate
        self.logits_at = {}
        self.weights_at = {}

    def snapshot(self, pl_module):
        net = self.pruning.network_of(pl_module)
        return {n: m.weight.detach().clone() for n, m in net.named_modules() if isinstance(m, BinaryConv2d)}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.closed_by_step[step] = [n for n, g in self.pruning.gates.items() if g.num_open < g.logits.numel()]
        self.logits_at[step] = {n: g.logits.detach().clone() for n, g in self.pruning.gates.items()}
        if step == self.at_step:
            self.weights_at[step] = self.snapshot(pl_module)


def _fit(tmp_path, pruning, max_steps, extra=(), module=None, ckpt_path=None, **kwargs):
    seed_everything(0)
    module = module or user_module()
    trainer = small_trainer(tmp_path, [Binarize(), pruning, *extra], max_steps, **kwargs)
    trainer.fit(module, random_images(n=32, batch_size=8), ckpt_path=ckpt_path)
    return module, trainer


def _masks(pruning):
    return {n: g.mask().clone() for n, g in pruning.gates.items()}


def _achieved(pruning):
    sizes = {g.name: g.size for g in pruning.analysis.groups}
    return sum(sizes[n] - int(m.sum()) for n, m in _masks(pruning).items()) / sum(sizes.values())


@pytest.mark.parametrize(
    "criterion, allocation",
    [(c, a) for c in ("l1", "binarization_error", "random") for a in ("uniform", "global")]
    + [("l1", "size"), ("l1", "macs")],
)
def test_each_criterion_hits_target_pfr(tmp_path, criterion, allocation):
    pruning = GreedyFilterPruning(0.4, criterion=criterion, allocation=allocation, min_filters=4, remove_at_end=False)
    _fit(tmp_path, pruning, max_steps=2)
    assert abs(_achieved(pruning) - 0.4) <= 0.01
    assert pruning.pfr() == pytest.approx(_achieved(pruning))
    assert min(_masks(pruning)[n].sum() for n in pruning.gates) >= 4  # min_filters held in every group
    if allocation == "uniform":  # the same share everywhere, up to one filter of rounding
        for name, mask in _masks(pruning).items():
            size = mask.numel()
            assert abs((size - mask.sum()) - 0.4 * size) <= 1.0 + 1e-9, name


@pytest.mark.parametrize("criterion", ["l1", "binarization_error"])
def test_closes_the_lowest_scored_filters_by_direct_computation(tmp_path, criterion):
    pruning = GreedyFilterPruning(0.3, criterion=criterion, remove_at_end=False)
    probe = Probe(pruning, at_step=0)
    _fit(tmp_path, pruning, max_steps=1, extra=[probe])
    weights = probe.weights_at[0]  # the latent weights the rule saw (pruned before the first step)

    def per_filter(w):
        if criterion == "l1":
            return w.abs().mean((1, 2, 3))
        return w.abs().mean((1, 2, 3)) ** 2 / w.pow(2).mean((1, 2, 3))  # 1 - relative binarisation error

    for group in pruning.analysis.groups:
        scores = torch.zeros(group.size)
        for member in group.members:
            if member.role == "out" and member.module in weights:
                scores[list(member.root_idxs)] += per_filter(weights[member.module])[list(member.idxs)]
        closed = set(torch.nonzero(pruning.gates[group.name].mask() == 0).flatten().tolist())
        expected = set(torch.argsort(scores)[: len(closed)].tolist())
        assert len(closed) == round(0.3 * group.size) or abs(len(closed) - 0.3 * group.size) <= 1
        assert closed == expected, group.name


def test_a_callable_criterion_is_used_as_given(tmp_path):
    def by_index(network, group):  # the user's own rule: later channels are more important
        return torch.arange(group.size, dtype=torch.float32)

    pruning = GreedyFilterPruning(0.3, criterion=by_index, remove_at_end=False)
    _fit(tmp_path, pruning, max_steps=1)
    for name, mask in _masks(pruning).items():
        closed = int((mask == 0).sum())
        assert closed > 0 and mask[:closed].sum() == 0 and mask[closed:].all(), name


def test_random_is_reproducible_by_seed(tmp_path):
    runs = []
    for seed in (3, 3, 4):
        pruning = GreedyFilterPruning(0.4, criterion="random", seed=seed, remove_at_end=False)
        _fit(tmp_path, pruning, max_steps=1)
        runs.append(_masks(pruning))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert any(not torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


def test_layerwise_prunes_bottom_up_one_layer_at_a_time(tmp_path):
    pruning = GreedyFilterPruning(0.4, criterion="l1", mode="layerwise", warmup=1, retrain=2, remove_at_end=False)
    probe = Probe(pruning)
    _fit(tmp_path, pruning, max_steps=20, extra=[probe])
    order = pruning.analysis.names  # forward order, input side first
    assert len(order) == 10 and sorted(probe.closed_by_step) == list(range(20))
    for step, closed in probe.closed_by_step.items():
        expected = 0 if step < 1 else min(len(order), (step - 1) // 2 + 1)
        assert closed == order[:expected], step
    assert pruning.done == order
    assert abs(pruning.pfr() - 0.4) <= 0.01


def test_epoch_interval_waits_for_warmup(tmp_path):
    pruning = GreedyFilterPruning(0.25, criterion="l1", unit="epochs", warmup=1, remove_at_end=False)
    probe = Probe(pruning)
    _fit(tmp_path, pruning, max_steps=-1, extra=[probe], max_epochs=2, limit_train_batches=2)
    assert probe.closed_by_step[0] == [] and probe.closed_by_step[1] == []  # epoch 0: warm-up, all open
    assert probe.closed_by_step[2] == pruning.analysis.names  # epoch 1 starts pruned
    assert abs(pruning.pfr() - 0.25) <= 0.01


def test_gates_never_move_while_weights_train(tmp_path):
    pruning = GreedyFilterPruning(0.4, criterion="binarization_error", remove_at_end=False)
    probe = Probe(pruning, at_step=0)
    module, _ = _fit(tmp_path, pruning, max_steps=4, extra=[probe])
    assert all(not g.logits.requires_grad and g.logits.grad is None for g in pruning.gates.values())
    for step in (1, 2, 3):
        for name, logits in probe.logits_at[step].items():
            assert torch.equal(logits, probe.logits_at[0][name]), (step, name)
    for name, logits in probe.logits_at[0].items():
        assert torch.equal(pruning.gates[name].logits, logits)
    moved = [n for n, w in probe.weights_at[0].items() if not torch.equal(w, module.my_net.get_submodule(n).weight)]
    assert moved  # training happened, around fixed gates


def test_resume_continues_at_the_same_layer_and_ends_with_the_same_gates(tmp_path):
    def make():  # global allocation: the counts fixed at the first layer must survive the resume too
        return GreedyFilterPruning(
            0.4, criterion="l1", mode="layerwise", retrain=1, allocation="global", remove_at_end=False
        )

    class SaveAt(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    full = make()
    _fit(tmp_path, full, max_steps=12, extra=[SaveAt()])
    resumed = make()
    probe = Probe(resumed)
    _fit(tmp_path, resumed, max_steps=12, extra=[probe], ckpt_path=str(tmp_path / "mid.ckpt"))
    assert min(probe.closed_by_step) == 4
    assert probe.closed_by_step[4] == full.analysis.names[:5]  # layers 0-3 restored, layer 4 pruned now
    assert resumed.done == full.done and resumed.counts == full.counts
    assert abs(resumed.pfr() - 0.4) <= 0.01
    assert all(torch.equal(m, _masks(full)[n]) for n, m in _masks(resumed).items())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"criterion": "l2"}, r"`criterion`: Unknown criterion 'l2'; "
         r"registered criteria: binarization_error, l1, random"),
        ({"criterion": 0.5}, r"`criterion`: Cannot interpret 0.5 .*binarization_error, l1, random or a callable"),
        ({"target_pfr": 1.0}, r"`target_pfr` must be in \[0, 1\), got 1.0"),
        ({"target_pfr": -0.1}, r"`target_pfr` must be in \[0, 1\), got -0.1"),
        ({"mode": "iterative"}, r"`mode` must be one of oneshot, layerwise; got 'iterative'"),
        ({"allocation": "local"}, r"`allocation` must be one of uniform, size, macs, global; got 'local'"),
        ({"unit": "batches"}, r"`unit` must be one of steps, epochs; got 'batches'"),
        ({"warmup": -1}, r"`warmup` must be an int >= 0 \(steps\), got -1"),
        ({"warmup": 1.5, "unit": "epochs"}, r"`warmup` must be an int >= 0 \(epochs\), got 1.5"),
        ({"mode": "layerwise"}, r"mode='layerwise': `retrain` must be an int >= 1 \(steps\), got None"),
        ({"mode": "layerwise", "retrain": 0}, r"mode='layerwise': `retrain` must be an int >= 1 \(steps\), got 0"),
        ({"retrain": 3}, r"`retrain` is for mode='layerwise'; with mode='oneshot' it must be None .*got 3"),
        ({"seed": "x"}, r"`seed` must be an int, got 'x'"),
        ({"min_filters": 0}, r"`min_filters` must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        GreedyFilterPruning(**{"criterion": "l1", "target_pfr": 0.4, **kwargs})


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_unreachable_target_raises(tmp_path, allocation):  # the same message as allocation.allocate's
    pruning = GreedyFilterPruning(0.95, criterion="l1", min_filters=8, allocation=allocation)
    with pytest.raises(
        MisconfigurationException,
        match=r"target_pfr=0.95 needs 623 of 656 filters pruned, "
        r"but keeping min_filters=8 per layer allows at most 576 \(PFR 0.8780\)",
    ):
        _fit(tmp_path, pruning, max_steps=1)


def test_too_short_a_schedule_raises(tmp_path):
    with pytest.raises(MisconfigurationException, match=(
        r"^GreedyFilterPruning's schedule needs 19 steps \(warmup=0 \+ 9 x retrain=2 \+ 1\) but the trainer runs 5, "
        r"and even the shortest schedule needs 10: set max_steps >= 19$"
    )):
        _fit(tmp_path, GreedyFilterPruning(0.4, criterion="l1", mode="layerwise", retrain=2), max_steps=5)
    with pytest.raises(MisconfigurationException, match=(
        r"^GreedyFilterPruning's schedule needs 9 steps \(warmup=8 \+ 1\) but the trainer runs 5: set max_steps >= 9, "
        r"or shorten the schedule to fit, e.g. warmup=4 \(scale_to_fit=True does this\)$"
    )):
        _fit(tmp_path, GreedyFilterPruning(0.4, criterion="l1", warmup=8), max_steps=5)


def test_scale_to_fit_prunes_inside_a_short_run(tmp_path):  # the rule msf follows too
    pruning = GreedyFilterPruning(0.4, criterion="l1", mode="layerwise", warmup=10, retrain=4, scale_to_fit=True)
    _fit(tmp_path, pruning, max_steps=12)
    assert pruning.finished and abs(pruning.pfr() - 0.4) < 0.05
    assert pruning.due(len(pruning.stages) - 1) < 12


def test_a_run_stopped_early_still_reaches_the_target(tmp_path):
    class StopAt(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.global_step >= 3

    pruning = GreedyFilterPruning(0.4, criterion="l1", mode="layerwise", retrain=1, remove_at_end=False)
    with pytest.warns(UserWarning, match=r"fit ended before the schedule did; pruning the remaining 7 group\(s\) now"):
        _, trainer = _fit(tmp_path, pruning, max_steps=12, extra=[StopAt()])
    assert trainer.global_step == 3 and pruning.finished
    assert abs(pruning.pfr() - 0.4) <= 0.01


def test_after_fit_the_module_is_the_smaller_network_and_reloads(tmp_path):
    from lightning_bnnprune.pruning.record import load_pruned

    pruning = GreedyFilterPruning(0.4, criterion="binarization_error")
    module = user_module()
    params_before = sum(p.numel() for p in module.my_net.parameters())
    _fit(tmp_path, pruning, max_steps=2, module=module)
    net = module.my_net
    record = pruning.record
    assert record is not None and record.max_abs_diff <= 1e-4  # the removal's own exactness check
    assert abs(record.pfr - 0.4) <= 0.01 and pruning.pfr() == record.pfr
    for group in pruning.analysis.groups:  # each owner conv lost exactly what the rule closed
        assert net.get_submodule(group.name).out_channels == group.size - pruning.counts.get(group.name, 0)
    assert sum(p.numel() for p in net.parameters()) == record.params_after < params_before
    net.eval()
    x = torch.randn(4, 3, 32, 32)
    reloaded = load_pruned(pruning.pruned_path)
    torch.testing.assert_close(reloaded(x), net(x), rtol=0, atol=1e-5)
