"""Larq Compute Engine export: LCE's own interpreter against PyTorch, sizes, refusals, the
engine-friendly ``round_to`` budget, and the app's ``export=`` (LCE's and the packed file).

The export needs the ``lce`` extra (``larq-compute-engine``); running the file needs LCE's
interpreter, which is built against numpy 1 (see :func:`lce_predict`): in a numpy 2 process the
tests that run it need ``BNNPRUNE_LCE_PYTHON`` (CI's ``.ci/run`` makes that Python). Each test
skips with its reason when what it needs is absent.
"""
import numpy as np
import pytest
import timm
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_bnnprune import GreedyFilterPruning, MainSubsidiaryPruning, ZeroFilterPruning, quantizers
from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.layers import BinaryConv2d
from lightning_bnnprune.pruning.allocation import allocate
from lightning_bnnprune.pruning.export import export_packed, load_packed
from lightning_bnnprune.pruning.export_lce import LceExportError, export_lce, lce_predict
from lightning_bnnprune.pruning.gates import attach_gates
from lightning_bnnprune.pruning.lce_runtime import KERNELS
from lightning_bnnprune.pruning.groups import find_channel_groups
from lightning_bnnprune.pruning.surgery import remove_filters

from helpers import LCE_INTERPRETER, TINY, needs_interpreter, needs_lce, random_images, randomise_norms, small_trainer, stderr_lines, UserModule


def pruned(name, size=32, share=0.4, round_to=1):
    """A binarised timm network with ``share`` of its filters removed (lowest index first after a
    seeded shuffle), batch norms randomised so that every folded term matters."""
    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=10)
    binarize_model(net)
    randomise_norms(net)
    net.eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    analysis = find_channel_groups(net, x[:1])
    sizes = {g.name: g.size for g in analysis.groups}
    counts = allocate(sizes, share, round_to=round_to)
    g = torch.Generator().manual_seed(0)
    masks = {}
    for group in analysis.groups:
        keep = torch.ones(group.size, dtype=torch.bool)
        keep[torch.randperm(group.size, generator=g)[: counts[group.name]]] = False
        masks[group.name] = keep
    record = remove_filters(net, analysis, masks=masks, example_inputs=x)
    return net, record


def agree(net, path, x):
    """The largest |LCE - PyTorch| over LCE's three kernel paths (one interpreter process)."""
    got = lce_predict(path, x, kernels=list(KERNELS))
    with torch.no_grad():
        ref = net.eval()(x).numpy()
    ref = ref.transpose(0, 2, 3, 1) if ref.ndim == 4 else ref
    return max(np.abs(out - ref).max() for out in got.values()), ref


# ------------------------------------------------------------------ LCE's interpreter = PyTorch
@needs_interpreter
def test_pruned_resnet20_runs_in_lce_as_in_pytorch(tmp_path):
    net, _ = pruned("resnet20_cifar")
    info = export_lce(net, tmp_path / "model.tflite", input_size=(3, 32, 32))
    assert info["binary_layers"] == sum(isinstance(m, BinaryConv2d) for m in net.modules()) == 20
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    outputs = lce_predict(tmp_path / "model.tflite", x, kernels=list(KERNELS))
    with torch.no_grad():
        ref = net(x).numpy()
    for kernels, got in outputs.items():
        # Equal up to float rounding, except where a pre-activation within ~1e-7 of zero flips its
        # sign bit under the folded batch norm's different rounding (one image of these 16 has one).
        close = np.abs(got - ref).max(axis=1) < 1e-5
        assert close.sum() >= 14, (kernels, np.abs(got - ref).max(axis=1))
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 15 / 16, kernels


@needs_interpreter
@pytest.mark.parametrize("kernel, stride, padding, size, channels", [
    (3, 1, 1, 5, 8), (3, 2, 1, 6, 8), (3, 2, 1, 7, 8), (1, 2, 0, 6, 8), (5, 2, 2, 8, 8),
    (3, 1, 1, 2, 8), (3, 1, 1, 1, 8), (3, 2, 1, 2, 40),  # maps smaller than the kernel
    (3, 1, 1, 4, 77),  # channels across three 32-bit words, the last one partial
])
def test_binary_conv_padding_cases_are_exact(tmp_path, kernel, stride, padding, size, channels):
    torch.manual_seed(0)
    net = nn.Sequential(BinaryConv2d(channels, 12, kernel, stride, padding=padding, bias=True), nn.BatchNorm2d(12))
    randomise_norms(net)
    export_lce(net, tmp_path / "m.tflite", input_size=(channels, size, size))
    diff, _ = agree(net, tmp_path / "m.tflite", torch.randn(3, channels, size, size))
    assert diff < 1e-4


@needs_interpreter
def test_float_stem_pooling_and_hardtanh_are_exact(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 7, 2, padding=3), nn.BatchNorm2d(16), nn.Hardtanh(), nn.MaxPool2d(3, 2, 1),
        BinaryConv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    randomise_norms(net)
    export_lce(net, tmp_path / "m.tflite", input_size=(3, 32, 32))
    diff, _ = agree(net, tmp_path / "m.tflite", torch.randn(3, 3, 32, 32))
    assert diff < 1e-4


# ------------------------------------------------------------------ size
@needs_lce
def test_tflite_size_is_the_packed_bits_within_ten_percent(tmp_path):
    # resnet18's widths (64..512) pruned with round_to=32: LCE's 32-channel words add nothing.
    net, record = pruned("resnet18", size=64, round_to=32)
    info = export_lce(net, tmp_path / "m.tflite", input_size=(3, 64, 64))
    payload = export_packed(net, tmp_path / "m.bnnpack", record)["payload_bytes"]
    assert abs(info["file_bytes"] / payload - 1.0) <= 0.10


# ------------------------------------------------------------------ refusals: one line, the layer named
@needs_lce
def test_bdg_kernels_are_refused_naming_the_layer(tmp_path):
    net = timm.create_model("resnet20_cifar", num_classes=10)
    binarize_model(net, kernel_quantizer="bdg")
    with torch.no_grad():
        net.get_submodule("layer1.0.conv1").kernel_quantizer.phi.fill_(0.25)
    with pytest.raises(LceExportError) as err:
        export_lce(net, tmp_path / "m.tflite", input_size=(3, 32, 32))
    message = str(err.value)
    assert "\n" not in message and "'layer1.0.conv1'" in message and "phi - tau" in message
    assert not (tmp_path / "m.tflite").exists()


@needs_lce
@pytest.mark.parametrize("make, layer, words", [
    (lambda: nn.Sequential(BinaryConv2d(4, 4, 3, padding=1), nn.GELU()), "'1'", "GELU has no"),
    (lambda: nn.Sequential(BinaryConv2d(4, 4, 3, padding=1, input_quantizer=None)), "'0'", "input quantizer is None"),
    (lambda: nn.Sequential(BinaryConv2d(4, 4, 3, padding=1, groups=2)), "'0'", "grouped binary convolution"),
    (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")), "'0'", "padding_mode='reflect'"),
])
def test_unsupported_layers_are_refused_naming_the_layer(tmp_path, make, layer, words):
    with pytest.raises(LceExportError) as err:
        export_lce(make(), tmp_path / "m.tflite", input_size=(4, 6, 6))
    assert "\n" not in str(err.value) and layer in str(err.value) and words in str(err.value)


class _ShiftedSign(quantizers.InputQuantizer):
    """sign(x - 0.5): binary, but not the sign LCE computes (it does not declare is_sign)."""

    def forward(self, x):
        return quantizers.ste_sign(x - 0.5)


class _Ternary(quantizers.KernelQuantizer):
    """{-1, 0, +1} kernels: not two values."""

    value_set = "{-1, 0, +1}"

    def forward(self, weight, in_mask=None):
        return torch.where(weight.abs() < 0.05, 0.0, torch.sign(weight)), None


@needs_lce
@pytest.mark.parametrize("kwargs, words", [
    (dict(input_quantizer=_ShiftedSign()),
     "LCE binarises inputs with sign(); this layer's input quantizer is _ShiftedSign, not declared is_sign"),
    (dict(kernel_quantizer=_Ternary()), "kernel quantizer _Ternary gives 3 distinct kernel values (-1, 0, 1), not two"),
])
def test_a_quantizer_lce_cannot_run_is_refused_by_name(tmp_path, kwargs, words):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BinaryConv2d(4, 4, 3, padding=1, **kwargs))
    with pytest.raises(LceExportError) as err:
        export_lce(net, tmp_path / "m.tflite", input_size=(3, 6, 6))
    assert str(err.value) == f"cannot export '1' to LCE: {words}"


@needs_lce
def test_a_network_with_gates_attached_is_refused(tmp_path):
    net = timm.create_model("resnet20_cifar", num_classes=10)
    binarize_model(net)
    attach_gates(net, find_channel_groups(net, torch.randn(1, 3, 32, 32)))
    with pytest.raises(LceExportError, match=r"gates are still attached; export the pruned network"):
        export_lce(net, tmp_path / "m.tflite", input_size=(3, 32, 32))


def test_without_the_extra_the_error_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    from lightning_bnnprune.pruning import export_lce as module

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "larq_compute_engine" else real(name, *a))
    module._schema.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install 'lightning-bnnprune\[lce\]'"):
            export_lce(nn.Sequential(nn.Conv2d(3, 4, 3)), tmp_path / "m.tflite", input_size=(3, 8, 8))
    finally:
        module._schema.cache_clear()


# ------------------------------------------------------------------ round_to
@pytest.mark.parametrize("cls, kwargs", [
    (GreedyFilterPruning, {"target_pfr": 0.4}), (MainSubsidiaryPruning, {"target_pfr": 0.4}), (ZeroFilterPruning, {}),
])
def test_every_pruning_callback_takes_round_to(cls, kwargs):
    assert cls(round_to=32, **kwargs).round_to == 32
    with pytest.raises(MisconfigurationException, match=r"`round_to` must be an int >= 1, got 0"):
        cls(round_to=0, **kwargs)


@pytest.mark.parametrize("make, steps", [
    (lambda: GreedyFilterPruning(0.4, criterion="l1", round_to=32, input_size=(3, 32, 32)), 1),
    # the defaults: learned counts, rounded to the multiples at the end of the selector
    (lambda: MainSubsidiaryPruning(target_pfr=0.4, selector=1, retrain=1, round_to=32, input_size=(3, 32, 32)), 3),
], ids=["greedy", "msf_learned"])
def test_with_round_to_the_counts_are_multiples(tmp_path, make, steps):
    from lightning.pytorch import seed_everything

    from lightning_bnnprune import Binarize

    seed_everything(0)
    pruning = make()
    trainer = small_trainer(tmp_path, [Binarize(), pruning], steps)
    trainer.fit(UserModule("resnet18_cifar", lr=0.01, optimizer=torch.optim.SGD), random_images(n=4, batch_size=4))
    rows = pruning.report.layer_rows()
    binary = [r for r in rows if r["kind"] == "binary conv"]
    assert binary and all(r["filters_after"] % 32 == 0 for r in binary), binary[:3]
    assert any(r["filters_after"] < r["filters_before"] for r in binary)
    assert "filters_after" in pruning.report.to_markdown() or "| 32 |" in pruning.report.to_markdown()
    assert abs(pruning.summary["pfr"] - 0.4) <= 0.01


# ------------------------------------------------------------------ the app
@pytest.mark.slow
@pytest.mark.parametrize("target, file, label", [
    pytest.param("lce", "model.tflite", "LCE model", marks=needs_lce),
    ("packed", "model.bnn", "packed model"),
])
def test_app_export_writes_the_model_file_beside_pruned_pt(run_app, tmp_path, target, file, label):
    import json
    from pathlib import Path

    from lightning_bnnprune.pruning.record import load_pruned

    run_dir = tmp_path / "run"
    proc = run_app(*TINY, f"export={target}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    path = run_dir / "checkpoints" / file
    assert Path(summary["exported_model"]) == path and Path(summary["pruned_model"]).parent == path.parent
    assert summary["export"] == target and f"{label:<17}{path}" in proc.stdout
    net = load_pruned(summary["pruned_model"]).eval()  # the file is the pruned.pt network
    if target == "packed":
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(load_packed(path)(x), net(x))
        return
    assert path.read_bytes()[4:8] == b"TFL3"
    if LCE_INTERPRETER:  # measured beside the MAC ratio, on LCE's fast path
        assert summary["lce_kernels"] == "indirect_bgemm" and summary["lce_latency_ms"] > 0, summary
        assert "LCE latency      " in proc.stdout and "indirect_bgemm kernels" in proc.stdout
    if LCE_INTERPRETER:  # at the datamodule's image size
        x = torch.randn(2, *_input_of(path))
        with torch.no_grad():
            ref = net(x).numpy()
        for kernels, got in lce_predict(path, x, kernels=list(KERNELS)).items():  # learned counts: odd ones too
            assert np.abs(got - ref).max() < 1e-3, kernels


def _input_of(tflite):
    from lightning_bnnprune.pruning.export_lce import _schema

    model = _schema().Model.GetRootAs(tflite.read_bytes(), 0)
    graph = model.Subgraphs(0)
    _, h, w, c = graph.Tensors(graph.Inputs(0)).ShapeAsNumpy().tolist()
    return c, h, w


def test_app_refuses_an_unknown_export_in_one_line(call_main):
    proc = call_main(*TINY, "export=nope")
    assert proc.returncode == 2
    assert stderr_lines(proc) == ["bnnprune: error: `export` must be one of: null, lce, onnx, packed; got 'nope'"]


def test_zero_filter_pruning_rounds_up_by_keeping_empty_filters(tmp_path):
    from lightning.pytorch import seed_everything

    from lightning_bnnprune import Binarize

    class EmptyFive(ZeroFilterPruning):
        def setup(self, trainer, pl_module, stage):
            super().setup(trainer, pl_module, stage)
            with torch.no_grad():
                pl_module.model.layer1[0].conv1.weight[:5] = -0.9  # five filters all zero

    seed_everything(0)
    pruning = EmptyFive(round_to=4)
    kw = dict(kernel_quantizer="bdg", kernel_quantizer_kwargs={"zero_lower": True})
    module = UserModule(attr="model", lr=1e-4)
    small_trainer(tmp_path, [Binarize(**kw), pruning], 1).fit(module, random_images(n=8, batch_size=8))
    size = pruning.analysis["layer1.0.conv1"].size
    assert module.model.layer1[0].conv1.out_channels == min(size, -(-(size - 5) // 4) * 4)
    assert module.model.layer1[0].conv1.out_channels < size  # some of the five still went
