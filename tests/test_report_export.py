"""The compression report's figures against independent counts, the packed export, the export
targets (packed, ONNX, LCE; the app's ``export=`` runs in tests/test_export_lce.py)."""
import csv
import os
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_bnnprune import export_targets, quantizers
from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.layers import BinaryConv2d
from lightning_bnnprune.pruning.export import MAGIC, PackedKernel, export_packed, load_packed, unpruned_record
from lightning_bnnprune.pruning.export_lce import lce_available
from lightning_bnnprune.pruning.groups import find_channel_groups
from lightning_bnnprune.pruning.report import compression_report
from lightning_bnnprune.pruning.surgery import remove_filters

from helpers import inputs, randomise_norms

PFR = 0.4


def prune_share(name, share=PFR, **binarize_kwargs):
    """``(original FP net, pruned binary net, record)``: exactly ``round(share * size)`` of every
    group removed, chosen at random (seeded)."""
    torch.manual_seed(0)
    original = timm.create_model(name, num_classes=10).eval()
    randomise_norms(original)
    net = timm.create_model(name, num_classes=10)
    net.load_state_dict(original.state_dict())
    binarize_model(net, **binarize_kwargs)
    net.eval()
    analysis = find_channel_groups(net, inputs(1))
    g = torch.Generator().manual_seed(0)
    masks = {}
    for group in analysis.groups:
        keep = torch.ones(group.size, dtype=torch.bool)
        keep[torch.randperm(group.size, generator=g)[: round(share * group.size)]] = False
        masks[group.name] = keep
    record = remove_filters(net, analysis, masks=masks, example_inputs=inputs())
    return original, net, record


@pytest.fixture(scope="module")
def resnet18():
    return prune_share("resnet18")


def flops(net):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(inputs(1))
    return counter.get_total_flops()


def test_report_figures_match_independent_counts(resnet18, tmp_path):
    original, net, record = resnet18
    report = compression_report(net, record)
    s = report.summary

    sizes = record.group_sizes
    assert s["pfr"] == pytest.approx(sum(round(PFR * n) for n in sizes.values()) / sum(sizes.values()))
    # FP32 bits of the original, unbinarised network: every float value of its state dict.
    fp_values = sum(v.numel() for v in original.state_dict().values() if v.is_floating_point())
    assert s["bits_before"] == 32 * fp_values
    # Stored bits: 1 per binary weight, 32 per XNOR scale (one per filter) and per other float value.
    binary = {n: m for n, m in net.named_modules() if isinstance(m, BinaryConv2d)}
    expected = 0
    for key, value in net.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in binary and key.endswith(".weight"):
            expected += value.numel() + 32 * binary[owner].out_channels
        elif value.is_floating_point():
            expected += 32 * value.numel()
    assert s["bits_after"] == expected
    assert s["compression"] == pytest.approx(s["bits_before"] / s["bits_after"])
    # MACs: the forward-hook count against torch's own FLOP counter (2 FLOPs per MAC).
    assert s["macs_before"] * 2 == flops(original)
    assert s["macs_after"] * 2 == flops(net)
    assert s["mac_ratio"] == pytest.approx(flops(original) / flops(net))
    assert s["params_after"] == sum(p.numel() for p in net.parameters())

    # Inner binary layers approach 32 / (1 - p)^2 (= 88.9x at 40%), short of it by the scales.
    assert s["inner_limit"] == pytest.approx(32 / 0.6 ** 2)
    assert report.inner and all(r["compression"] < r["limit"] for r in report.inner)
    # a 3x3 filter of >= 38 inputs holds >= 342 bits beside its 32-bit scale: within 10% of the limit
    assert all(0.9 * r["limit"] < r["compression"] for r in report.inner if "downsample" not in r["layer"])
    assert 80 < s["inner_compression"] < 88.9
    assert "limit 32/(1-0.40)^2 = 88.9x" in str(report)

    paths = report.save(str(tmp_path / "report"))
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(report.rows) and rows[0].keys() >= {"layer", "filters_before", "filters_after", "bits_after"}
    layer1 = next(r for r in rows if r["layer"] == "layer1.0.conv1")
    assert (int(layer1["filters_before"]), int(layer1["filters_after"])) == (64, 64 - round(PFR * 64))
    assert "| layer1.0.conv1 | binary conv | 64 | 38 |" in open(paths["md"]).read()
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_packed_export_size_matches_stored_bits_and_logits_are_exact(resnet18, tmp_path):
    _, net, record = resnet18
    path = tmp_path / "resnet18.bnn"
    info = export_packed(net, path, record)
    stored_bytes = compression_report(net, record).summary["bits_after"] / 8
    assert os.path.getsize(path) == info["file_bytes"]
    assert abs(os.path.getsize(path) / stored_bytes - 1) < 0.02
    loaded = load_packed(path)
    assert all(isinstance(m.kernel_quantizer, PackedKernel) for m in loaded.modules() if isinstance(m, BinaryConv2d))
    x = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


@pytest.mark.parametrize(
    "binarize_kwargs",
    [dict(kernel_quantizer="bdg", kernel_quantizer_kwargs=dict(tau=0.7, phi=0.2)),
     dict(kernel_quantizer="xnor", kernel_quantizer_kwargs=dict(center=True), input_quantizer="approx_sign")],
    ids=["bdg", "xnor-centred"],
)
def test_packed_export_other_quantizers(tmp_path, binarize_kwargs):
    _, net, record = prune_share("test_resnet", **binarize_kwargs)
    assert record.binarize_kwargs["kernel_quantizer"] == binarize_kwargs["kernel_quantizer"]
    export_packed(net, tmp_path / "m.bnn", record)
    loaded = load_packed(tmp_path / "m.bnn")
    x = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_packed_errors(resnet18, tmp_path):
    _, net, record = resnet18
    (tmp_path / "junk.bnn").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"is not a packed export \(no b'BNNPACK1' header\)"):
        load_packed(tmp_path / "junk.bnn")
    fresh = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"the model does not match the record: \['conv1.weight'"):
        export_packed(fresh, tmp_path / "x.bnn", record)
    assert MAGIC == b"BNNPACK1"


@pytest.mark.parametrize("name", ["packed", "onnx", "lce"])
def test_each_export_target_writes_a_file_that_computes_the_network(tmp_path, name):
    import lightning_bnnprune.models  # noqa: F401  registers resnet20_cifar (test_resnet's ResNet-D pool is not in LCE)

    _, net, record = prune_share("resnet20_cifar")
    target = export_targets.get(name)
    path = str(tmp_path / f"model{target.suffix}")
    x = inputs()
    with torch.no_grad():
        expected = net(x)
    if name == "lce" and not lce_available():
        pytest.skip("the lce extra (larq-compute-engine) is not installed")
    assert target(net, path, (3, 32, 32), record=record) == path
    if name == "packed":
        with torch.no_grad():
            assert torch.equal(load_packed(path)(x), expected)
    elif name == "onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"x": x.numpy()})  # batch 2: the batch size is free
        assert logits.shape == expected.shape
        assert abs(logits - expected.numpy()).max() < 1e-3
    else:
        with open(path, "rb") as f:
            assert f.read(8)[4:8] == b"TFL3"  # LCE's interpreter runs it in tests/test_export_lce.py


def test_export_targets_are_a_registry_the_app_reads_without_torch():
    assert export_targets.available() == ("lce", "onnx", "packed")
    with pytest.raises(ValueError, match=r"Unknown export target 'nope'; registered export targets: lce, onnx, packed"):
        export_targets.get("nope")
    code = "import sys, lightning_bnnprune.export_targets, lightning_bnnprune.train; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


class Ternary(quantizers.KernelQuantizer):
    """``{-1, 0, +1}`` kernels in 2 bits: counted by the report, refused by the packed export."""

    precision = 2
    value_set = "{-1, 0, +1}"

    def forward(self, weight, in_mask=None):
        return torch.where(weight.abs() < 0.05, 0.0, torch.sign(weight)), None


def test_a_kernel_that_cannot_be_packed_is_refused_by_name_and_still_counted(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), BinaryConv2d(8, 8, 3, padding=1, kernel_quantizer=Ternary()),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    record = unpruned_record(net)
    bits = compression_report(net, record).summary["bits_after"]
    assert bits == 32 * (8 * 3 * 9 + 8) + 2 * 8 * 8 * 9 + 32 * 8 + 32 * (8 * 10 + 10)  # 2 bits per ternary weight
    with pytest.raises(ValueError) as err:
        export_packed(net, tmp_path / "m.bnn")
    assert str(err.value) == "cannot pack 1: kernel quantizer Ternary gives 3 distinct kernel values (-1, 0, 1), not two"
    assert not (tmp_path / "m.bnn").exists()
