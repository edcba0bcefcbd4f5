"""LCE's interpreter run by the package: its three kernel paths, latency timing, and files that load
under every path (odd and small input-channel counts, ResNet-D's average-pool shortcut).

Running a file needs LCE's interpreter (numpy<2 here, or ``BNNPRUNE_LCE_PYTHON``); those tests
skip with the reason when it is absent. Each file runs all three paths in one interpreter process.
"""
import json

import numpy as np
import pytest
import timm
import torch
from torch import nn

from lightning_bnnprune import lce_latency, lce_predict
from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.layers import BinaryConv2d
from lightning_bnnprune.pruning.allocation import allocate
from lightning_bnnprune.pruning.export_lce import LceExportError, export_lce
from lightning_bnnprune.pruning.groups import find_channel_groups
from lightning_bnnprune.pruning.lce_runtime import KERNELS, lce_python
from lightning_bnnprune.pruning.surgery import remove_filters

from helpers import needs_interpreter, needs_lce, randomise_norms


def every_path(net, path, x):
    """``{kernel path: max |LCE - PyTorch|}`` for the three paths, run in one interpreter process."""
    outputs = lce_predict(path, x, kernels=list(KERNELS))
    with torch.no_grad():
        ref = net.eval()(x).numpy()
    ref = ref.transpose(0, 2, 3, 1) if ref.ndim == 4 else ref
    return {k: float(np.abs(out - ref).max()) for k, out in outputs.items()}


def conv_file(tmp_path, channels, size=5, stride=1, dilation=1):
    torch.manual_seed(channels)
    net = nn.Sequential(BinaryConv2d(channels, 6, 3, stride, padding=dilation, dilation=dilation, bias=True),
                        nn.BatchNorm2d(6))
    randomise_norms(net)
    path = tmp_path / f"c{channels}.tflite"
    export_lce(net, path, input_size=(channels, size, size))
    return net, path


# ------------------------------------------------------------------ naming the path, bad values
def test_a_bad_kernel_path_is_one_line_listing_the_paths(tmp_path):
    with pytest.raises(ValueError, match=r"^kernels must be one of 'indirect_bgemm', 'optimized', 'reference' "
                                         r"\(or a list of them\); got 'fast'$"):
        lce_predict(tmp_path / "m.tflite", np.zeros((1, 3, 4, 4)), kernels="fast")
    with pytest.raises(ValueError, match=r"^kernels must be one of .*; got \['reference', 'ref'\]$"):
        lce_predict(tmp_path / "m.tflite", np.zeros((1, 3, 4, 4)), kernels=["reference", "ref"])
    with pytest.raises(ValueError, match=r"^kernels must be one of 'indirect_bgemm', 'optimized', 'reference'; "
                                         r"got \['reference'\]$"):
        lce_latency(tmp_path / "m.tflite", kernels=["reference"])


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": 0}, r"threads must be an int >= 1, got 0"),
    ({"rounds": 1.5}, r"rounds must be an int >= 1, got 1.5"),
    ({"warmup": -1}, r"warmup must be an int >= 0, got -1"),
])
def test_bad_latency_arguments_are_one_line(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        lce_latency(tmp_path / "m.tflite", **kwargs)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"^no such file: .*nowhere\.tflite$"):
        lce_latency([tmp_path / "nowhere.tflite"])


def test_under_numpy2_without_an_lce_python_the_error_says_what_to_set(monkeypatch):
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("numpy 1 runs LCE's interpreter in this process")
    monkeypatch.delenv("BNNPRUNE_LCE_PYTHON", raising=False)
    with pytest.raises(RuntimeError, match=r"set BNNPRUNE_LCE_PYTHON to a Python with 'numpy<2'"):
        lce_python()


@needs_interpreter
def test_what_lce_refuses_is_one_line_with_its_reason():
    with pytest.raises(RuntimeError) as err:
        lce_predict(b"not a flatbuffer", np.zeros((1, 3, 4, 4)), kernels="reference")
    assert "\n" not in str(err.value) and "Invalid model" in str(err.value)


# ------------------------------------------------------------------ files that load everywhere
@needs_interpreter
@pytest.mark.parametrize("channels, size, stride, dilation", [
    (1, 5, 1, 1), (3, 6, 2, 1), (15, 5, 1, 1), (15, 6, 2, 1),  # odd: the reference kernel's refusal before
    (33, 6, 1, 2), (2, 5, 1, 1),  # odd across a word, dilated; small and even
])
def test_odd_and_small_channel_counts_load_and_agree_under_every_path(tmp_path, channels, size, stride, dilation):
    net, path = conv_file(tmp_path, channels, size, stride, dilation)
    diffs = every_path(net, path, torch.randn(3, channels, size, size))
    assert set(diffs) == set(KERNELS) and max(diffs.values()) < 1e-4, diffs


@pytest.mark.slow
@needs_interpreter
def test_resnet_d_with_odd_counts_exports_and_agrees_under_every_path(tmp_path):
    """timm's test_resnet has ResNet-D's AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    shortcut; at 48x48 the last one pools a 3x3 map (ceil_mode's overhanging window)."""
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=10)
    assert any(isinstance(m, nn.AvgPool2d) and m.ceil_mode and not m.count_include_pad for m in net.modules())
    binarize_model(net)
    randomise_norms(net)
    net.eval()
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    analysis = find_channel_groups(net, x[:1])
    counts = allocate({g.name: g.size for g in analysis.groups}, 0.4)
    masks = {}
    for g in analysis.groups:
        keep = torch.ones(g.size, dtype=torch.bool)
        keep[torch.randperm(g.size, generator=torch.Generator().manual_seed(0))[: counts[g.name]]] = False
        masks[g.name] = keep
    remove_filters(net, analysis, masks=masks, example_inputs=x[:2])
    odd = [m.in_channels for m in net.modules() if isinstance(m, BinaryConv2d) and m.in_channels % 2]
    assert odd, "the test wants odd kept counts"
    export_lce(net, tmp_path / "m.tflite", input_size=(3, 48, 48))
    diffs = every_path(net, tmp_path / "m.tflite", x)
    assert max(diffs.values()) < 1e-3, diffs


@needs_lce
@pytest.mark.parametrize("pool, size", [
    (nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), 6),  # PyTorch's pad is SAME's trailing one
    (nn.AvgPool2d(3, 2, padding=1, ceil_mode=True), 6),  # the overhanging window counts padding
    (nn.AvgPool2d(2, divisor_override=3), 6),
])
def test_average_pools_that_tflite_cannot_match_are_refused_naming_the_layer(tmp_path, pool, size):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), pool)
    with pytest.raises(LceExportError) as err:
        export_lce(net, tmp_path / "m.tflite", input_size=(3, size, size))
    assert "\n" not in str(err.value) and str(err.value).startswith("cannot export '1' to LCE: AvgPool2d")


@needs_interpreter
@pytest.mark.parametrize("pool, size", [
    (nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), 7),  # ResNet-D's, odd map
    (nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), 6),
    (nn.AvgPool2d(3, 2, padding=1, count_include_pad=True), 6),  # zero pad written, then VALID
    (nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), 7),  # SAME
])
def test_average_pools_export_exactly(tmp_path, pool, size):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), pool)
    export_lce(net, tmp_path / "m.tflite", input_size=(3, size, size))
    diffs = every_path(net, tmp_path / "m.tflite", torch.randn(2, 3, size, size))
    assert max(diffs.values()) < 1e-5, diffs


# ------------------------------------------------------------------ latency
@needs_interpreter
def test_latency_of_one_file_and_of_several_round_robin(tmp_path):
    _, small = conv_file(tmp_path, 8, size=4)
    _, large = conv_file(tmp_path, 64, size=16)
    one = lce_latency(small, rounds=3, calls=2, warmup=1)
    assert one["path"] == str(small) and one["kernels"] == "indirect_bgemm"
    assert one["flags"] == {"use_reference_bconv": False, "use_indirect_bgemm": True, "use_xnnpack": True}
    assert len(one["round_ms"]) == 3 and 0 < one["min_ms"] <= one["median_ms"]
    both = lce_latency([small, large], threads=2, kernels="reference", rounds=3, calls=1, warmup=0)
    assert [r["path"] for r in both] == [str(small), str(large)]
    assert all(r["threads"] == 2 and r["flags"]["use_reference_bconv"] for r in both)
    json.dumps(both)  # plain data, as the benchmark stores it
    with pytest.raises(RuntimeError, match=r"takes batch 1, not batch=4 \(export_lce writes batch 1\)"):
        lce_latency(small, batch=4, rounds=1, calls=1)


# ------------------------------------------------------------------ the app's summary
def _summary(tflite):
    return {"test_acc": 0.5, "test_acc_top5": None, "val_acc": 0.5, "binarized_layers": 1, "model_name": "m",
            "pruning": {"pfr": 0.4, "mac_ratio": 2.0}, "parameters": 10, "epochs": 1, "steps": 1,
            "wall_time_s": 1.0, "export": "lce", "exported_model": str(tflite)}


@needs_lce
def test_the_summary_says_why_without_an_lce_python(tmp_path, monkeypatch, capsys):
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("numpy 1 runs LCE's interpreter in this process")
    from lightning_bnnprune.train import _lce_latency, _report

    _, path = conv_file(tmp_path, 4)
    monkeypatch.delenv("BNNPRUNE_LCE_PYTHON", raising=False)
    _report({**_summary(path), **_lce_latency(path)}, tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["lce_latency_ms"] is None and "BNNPRUNE_LCE_PYTHON" in saved["lce_latency_error"]
    assert "  LCE latency      not measured: LCE's interpreter needs numpy<2" in capsys.readouterr().out


@needs_interpreter
def test_the_summary_prints_the_latency_beside_the_mac_ratio(tmp_path, capsys):
    from lightning_bnnprune.train import _lce_latency, _report

    _, path = conv_file(tmp_path, 4)
    _report({**_summary(path), **_lce_latency(path)}, tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["lce_kernels"] == "indirect_bgemm" and saved["lce_threads"] == 1
    assert 0 < saved["lce_latency_ms"] <= saved["lce_latency_median_ms"]
    out = capsys.readouterr().out.splitlines()
    mac = next(i for i, line in enumerate(out) if "MAC reduction 2.00x" in line)
    assert out[mac + 1].startswith(f"  LCE latency      {saved['lce_latency_ms']:.3f} ms per image"), out
