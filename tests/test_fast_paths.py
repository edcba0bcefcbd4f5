"""The fast paths of issue #10 change speed, never results: the cached eval kernel follows every
change of the weights, and a compiled ImageClassifier trains, prunes and removes like an eager one."""
from __future__ import annotations

import copy

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F

import lightning_bnnprune.models  # noqa: F401  (registers the CIFAR networks)
from lightning_bnnprune import Binarize
from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.callbacks.msf import MainSubsidiaryPruning
from lightning_bnnprune.layers import BinaryConv2d
from lightning_bnnprune.module import ImageClassifier

from helpers import random_images, small_trainer


def _binary_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = timm.create_model("test_resnet", num_classes=10, zero_init_last=False)
    binarize_model(net)
    return net


def _count_quantizer_calls(net: torch.nn.Module) -> list:
    calls = [0]
    for m in net.modules():
        if isinstance(m, BinaryConv2d):
            m.kernel_quantizer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _uncached(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # With autograd on, eval mode recomputes every kernel from the current weights.
    with torch.enable_grad():
        return net(x).detach()


def test_eval_kernel_is_reused_until_a_training_step_changes_the_weights():
    net = _binary_net(0)
    layers = sum(isinstance(m, BinaryConv2d) for m in net.modules())
    calls = _count_quantizer_calls(net)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    net.eval()
    with torch.inference_mode():
        first = net(x)
        assert calls[0] == layers
        again = net(x)
    assert calls[0] == layers, "the second eval call binarised the weights again"
    assert torch.equal(first, again) and torch.equal(first, _uncached(net, x))

    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    # a training step in train mode, back to eval
    net.train()
    F.cross_entropy(net(x), torch.arange(4)).backward()
    opt.step()
    net.eval()
    with torch.no_grad():
        after_step = net(x)
    assert not torch.allclose(after_step, first)
    assert torch.equal(after_step, _uncached(net, x))

    # an optimizer step taken while the module stays in eval mode (the weights' version moves)
    opt.zero_grad()
    F.cross_entropy(net(x), torch.arange(4)).backward()
    opt.step()
    with torch.no_grad():
        after_eval_step = net(x)
    assert not torch.allclose(after_eval_step, after_step)
    assert torch.equal(after_eval_step, _uncached(net, x))


def test_load_state_dict_drops_the_cached_eval_kernel():
    net, other = _binary_net(0).eval(), _binary_net(1).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = net(x)  # fills the cache
        net.load_state_dict(other.state_dict())
        loaded = net(x)
    assert not torch.allclose(before, loaded)
    assert torch.equal(loaded, _uncached(other, x))
    # copies never share a cache with their original
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(net)(x), loaded)


def _fit(tmp_path, compile: bool):
    L.seed_everything(0)
    module = ImageClassifier(
        "test_resnet", num_classes=10, optimizer="sgd", lr=0.05, scheduler=None,
        model_kwargs={"zero_init_last": False}, compile=compile,
        # aot_eager: dynamo's capture and AOTAutograd's graphs without inductor's C++ build, which
        # takes minutes on a small CPU; inductor is timed in benchmarks/throughput.py.
        compile_kwargs={"backend": "aot_eager"} if compile else None,
    )
    data = random_images(n=24, batch_size=4)
    msf = MainSubsidiaryPruning(target_pfr=0.4, selector=1, retrain=1, layers_per_stage=4)
    trainer = small_trainer(tmp_path / ("compiled" if compile else "eager"), [Binarize(), msf], 6)
    trainer.fit(module, data)
    return module, msf


@pytest.mark.slow
def test_compiled_module_trains_prunes_and_removes_like_eager(tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, eager_msf = _fit(tmp_path, compile=False)
    compiled, compiled_msf = _fit(tmp_path, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert compiled_msf.record is not None and compiled_msf.kept_filters() == eager_msf.kept_filters()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=1e-4)
    # the network stays the plain module tree: same state-dict keys, reloadable by an eager module
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    clone = copy.deepcopy(compiled)
    assert "_compiled_net_call" not in clone.__dict__
    with torch.no_grad():
        torch.testing.assert_close(clone(x), eager(x), rtol=0, atol=1e-4)


def test_throughput_benchmark_writes_every_mode(tmp_path):
    from helpers import benchmark_script

    throughput = benchmark_script("throughput")
    out = tmp_path / "throughput.md"
    assert throughput.main(["--model", "test_resnet", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                            "--infer-model", "test_resnet", "--infer-repeats", "1", "--out", str(out)]) == 0
    text = out.read_text()
    for mode in ("| fp |", "| binary (before #10) |", "| binary |", "| fp channels_last |", "| binary channels_last |"):
        assert mode in text, mode
    assert "| 1 |" in text and "| 64 |" in text  # the inference batches
