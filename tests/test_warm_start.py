"""``benchmarks/warm_start.py`` on a tiny npz: a run stopped mid-epoch and at an epoch's end and
run again with the same command ends bit-identical to an uninterrupted one; manifest, log and
final weights are written; a rerun with other settings is refused."""
import hashlib
import json
import sys

import pytest
import torch

from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.batches import StepSeededLoader
from lightning_bnnprune.data import TensorImageDataset
from lightning_bnnprune.layers import BinaryConv2d

from helpers import benchmark_script, tiny_npz


@pytest.fixture(scope="module")
def warm():
    yield benchmark_script("warm_start")
    sys.modules.pop("warm_start", None)


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the script sets its own


def _args(data, out, *extra):
    # 40 images, batch 16: 3 steps per epoch (the last batch smaller), 2 epochs
    return ["--data-dir", str(data), "--out", str(out), "--assets", str(out / "assets"), "--epochs", "2",
            "--batch-size", "16", "--ckpt-every", "1", "--threads", "1", *extra]


def test_resumed_run_equals_uninterrupted(warm, tmp_path):
    data = tiny_npz(tmp_path / "data", 40, 16)
    full = warm.main(_args(data, tmp_path / "full"))
    for stop in ("2", "3"):  # mid-epoch, then exactly at the first epoch's end
        with pytest.raises(warm.Interrupted):
            warm.main(_args(data, tmp_path / "split", "--stop-after", stop))
    split = warm.main(_args(data, tmp_path / "split"))

    a = torch.load(tmp_path / "full" / "assets" / "resnet20_cifar_binary.pt")
    b = torch.load(tmp_path / "split" / "assets" / "resnet20_cifar_binary.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert split["epochs_done"] == full["epochs_done"] == 2 and split["global_step"] == 6
    assert split["test_acc"] == full["test_acc"]
    assert len(split["sittings"]) == 3 and "--stop-after 2" in split["sittings"][0]["command"]
    with open(split["checkpoint"], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == split["checkpoint_sha256"]
    rows = (tmp_path / "split" / "accuracy.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,test_acc") and [r.split(",")[:2] for r in rows[1:]] == [["1", "3"], ["2", "6"]]
    final = json.loads((tmp_path / "split" / "assets" / "resnet20_cifar_binary.json").read_text())
    assert final["binarize"]["keep_fp"] == ["*.downsample.*"] and final["weights_sha256"]
    # the script's Binarize keeps the two 1x1 downsample shortcuts full precision, and only them
    net = warm.ImageClassifier("resnet20_cifar").net
    swapped = binarize_model(net, keep_fp=warm.binarize(warm.parse_args(_args(data, tmp_path))).keep_fp)
    assert len(swapped) == 18 and not any("downsample" in n for n in swapped)
    assert not isinstance(net.get_submodule("layer2.0.downsample.0"), BinaryConv2d)

    with pytest.raises(SystemExit, match="other settings"):
        warm.main(_args(data, tmp_path / "split", "--lr", "0.01"))


def test_step_seeded_loader_is_a_function_of_the_step():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    data = TensorImageDataset(x, torch.arange(10))
    step = {"now": 0}
    loader = StepSeededLoader(data, batch_size=4, seed=1, step=lambda: step["now"])
    assert len(loader) == 3
    epoch0 = [y for _, y in loader]
    assert sorted(torch.cat(epoch0).tolist()) == list(range(10))  # a permutation
    step["now"] = 3
    epoch1 = [y for _, y in loader]
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))  # a new order each epoch
    step["now"] = 4  # one step into epoch 1: the rest of that epoch, the same batches
    assert all(torch.equal(a, b) for a, b in zip([y for _, y in loader], epoch1[1:]))
    with pytest.raises(ValueError, match="batch_size"):
        StepSeededLoader(data, batch_size=0, seed=0, step=lambda: 0)


def test_full_precision_run_keeps_every_conv_real(warm, tmp_path):
    data = tiny_npz(tmp_path / "data", 40, 16)
    out = tmp_path / "fp"
    result = warm.main(_args(data, out, "--epochs", "1", "--full-precision", "--name", "fp",
                             "--optimizer", "sgd", "--lr", "0.1", "--weight-decay", "5e-4"))
    final = json.loads((out / "assets" / "fp.json").read_text())
    assert final["binarize"] is None and final["settings"]["full_precision"] is True
    assert final["settings"]["optimizer"] == "sgd" and result["epochs_done"] == 1
    state = torch.load(out / "assets" / "fp.pt")
    net = warm.ImageClassifier("resnet20_cifar").net
    net.load_state_dict(state)  # the plain timm network's keys: nothing binary was swapped in
    # a settings file from before these options existed still matches a default (binary, Adam) rerun
    legacy = {k: v for k, v in warm.settings(warm.parse_args(_args(data, tmp_path / "old"))).items()
              if k not in warm.ADDED_SETTINGS}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "settings.json").write_text(json.dumps(legacy))
    warm.check_settings(warm.parse_args(_args(data, tmp_path / "old")))
    with pytest.raises(SystemExit, match="full_precision"):
        warm.check_settings(warm.parse_args(_args(data, tmp_path / "old", "--full-precision")))


def test_binary_run_from_the_full_precision_weights_with_its_teacher(warm, tmp_path, capsys):
    """Issue 21's warm start: the binary network starts from the full-precision run's weights,
    distils from them (``--teacher full_precision``) and binarises its weights from epoch 1; the
    weights file is part of the settings (by its sha256), so a rerun from other weights is refused."""
    data = tiny_npz(tmp_path / "data", 40, 16)
    warm.main(_args(data, tmp_path / "fp", "--epochs", "1", "--full-precision", "--name", "fp"))
    fp = tmp_path / "fp" / "assets" / "fp.pt"
    out = tmp_path / "binary"
    argv = _args(data, out, "--init-from", str(fp), "--teacher", "full_precision", "--teacher-weight", "0.5",
                 "--binary-weights-from-epoch", "1", "--name", "binary_fp")
    result = warm.main(argv)
    assert "from " + str(fp) in capsys.readouterr().out
    final = json.loads((out / "assets" / "binary_fp.json").read_text())
    assert final["settings"]["init_from_sha256"] == hashlib.sha256(fp.read_bytes()).hexdigest()
    assert (final["settings"]["teacher"], final["settings"]["teacher_weight"]) == ("full_precision", 0.5)
    assert final["settings"]["binary_weights_from_epoch"] == 1 and result["epochs_done"] == 2
    other = tmp_path / "other.pt"
    state = torch.load(fp)
    state["conv1.weight"] = state["conv1.weight"] + 1
    torch.save(state, other)
    with pytest.raises(SystemExit, match="init_from_sha256"):
        warm.check_settings(warm.parse_args(argv[:argv.index("--init-from") + 1] + [str(other)]
                                            + argv[argv.index("--init-from") + 2:]))
    with pytest.raises(SystemExit):
        warm.parse_args(_args(data, out, "--full-precision", "--teacher", "full_precision"))
