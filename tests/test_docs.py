"""docs/: the strategy, quantizers and export target that docs/extending.md shows run as the page
says, the strategy's YAML lists every argument, and every page the package's docstrings cite exists."""
import inspect
import os
import re
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_bnnprune import Binarize, FilterPruning, export_targets, quantizers
from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.layers import BinaryConv2d
from lightning_bnnprune.pruning.export import export_packed, load_packed
from lightning_bnnprune.pruning.export_lce import export_lce, lce_available, lce_predict
from lightning_bnnprune.pruning.groups import find_channel_groups
from lightning_bnnprune.pruning.report import compression_report
from lightning_bnnprune.pruning.surgery import remove_filters

from helpers import TINY, UserModule, random_images, randomise_norms, small_trainer, stderr_lines

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "extending.md").read_text()


def _block(lang: str, first_line: str) -> str:
    """The ``lang`` code block of docs/extending.md that starts with ``first_line``."""
    for body in re.findall(rf"```{lang}\n(.*?)```", PAGE, flags=re.DOTALL):
        if body.startswith(first_line):
            return body
    raise AssertionError(f"no {lang} block starting with {first_line!r} in docs/extending.md")


@pytest.fixture(scope="module")
def at_end():
    module = types.ModuleType("at_end")
    exec(compile(_block("python", "# lightning_bnnprune/callbacks/at_end.py"), "docs/extending.md", "exec"),
         module.__dict__)
    return module


def test_the_strategy_example_prunes_at_fit_end(at_end, tmp_path):
    seed_everything(0)
    pruning = at_end.PruneAtEnd(target_pfr=0.4)
    assert isinstance(pruning, FilterPruning)
    module = UserModule(example_input_size=(3, 32, 32))
    small_trainer(tmp_path, [Binarize(), pruning], 2).fit(module, random_images(n=16, batch_size=8))
    record = pruning.record
    assert record.num_pruned == round(0.4 * record.num_filters)  # the target, exactly
    assert record.max_abs_diff <= 1e-4
    assert sum(m.out_channels for m in module.net.modules() if isinstance(m, torch.nn.Conv2d)) < sum(
        m.out_channels for m in UserModule().net.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(MisconfigurationException, match=r"`criterion`: Unknown criterion 'l2'"):
        at_end.PruneAtEnd(0.4, criterion="l2")
    with pytest.raises(MisconfigurationException, match=r"`target_pfr` must be in \[0, 1\)"):
        at_end.PruneAtEnd(target_pfr=1.0)


def test_the_strategy_yaml_lists_every_argument(at_end):
    node = yaml.safe_load(_block("yaml", "_target_: lightning_bnnprune.callbacks.at_end.PruneAtEnd"))
    params = [n for n in inspect.signature(at_end.PruneAtEnd.__init__).parameters if n != "self"]
    assert sorted(k for k in node if k != "_target_") == sorted(params)


def _run_beside(module, first_line: str, name: str):
    """The python block starting with ``first_line``, run as if written in ``module`` (with its
    names in scope); what it registers is undone when the test module ends."""
    namespace = types.ModuleType(name)
    namespace.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
    registry = module._REGISTRY
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "_classes", dict(registry._classes))
        exec(compile(_block("python", first_line), "docs/extending.md", "exec"), namespace.__dict__)
        yield namespace


@pytest.fixture(scope="module")
def doc_quantizers():
    yield from _run_beside(quantizers, "# lightning_bnnprune/quantizers.py", "doc_quantizers")


@pytest.fixture(scope="module")
def doc_targets():
    yield from _run_beside(export_targets, "# lightning_bnnprune/export_targets.py", "doc_targets")


def _pruned(share=0.4, **binarize_kwargs):
    """A binary resnet20_cifar with ``share`` of every group removed (seeded), and its record."""
    import lightning_bnnprune.models  # noqa: F401  registers resnet20_cifar

    torch.manual_seed(0)
    net = timm.create_model("resnet20_cifar", num_classes=10)
    binarize_model(net, **binarize_kwargs)
    randomise_norms(net).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    analysis = find_channel_groups(net, x[:1])
    g = torch.Generator().manual_seed(0)
    masks = {grp.name: torch.randperm(grp.size, generator=g) >= round(share * grp.size) for grp in analysis.groups}
    return net, remove_filters(net, analysis, masks=masks, example_inputs=x), x


def test_the_quantizer_example_exports_reports_and_rebuilds(doc_quantizers, tmp_path):
    # the forward and the gradient the docstring states
    x = torch.linspace(-1.0, 1.0, 9, requires_grad=True)
    q = quantizers.get("swish_sign", beta=2.0)
    y = q(x)
    assert torch.equal(y, torch.where(x >= 0, 1.0, -1.0))
    y.sum().backward()
    b = 2.0 * x.detach()
    assert torch.allclose(x.grad, 2.0 * (2 - b * torch.tanh(b / 2)) / (1 + torch.cosh(b)))

    net, record, x = _pruned(input_quantizer="swish_sign", kernel_quantizer="learned_scale")
    convs = [m for m in net.modules() if isinstance(m, BinaryConv2d)]
    assert convs[0].kernel_quantizer.learned_parameters() == ("gamma",)
    with torch.no_grad():
        for i, conv in enumerate(convs):
            conv.kernel_quantizer.gamma.fill_(0.5 + 0.1 * i)  # learned: one value per layer
        ref = net(x)
    # The rebuild records the quantizers by name, the learned gamma left to the weights.
    kw = record.binarize_kwargs
    assert (kw["input_quantizer"], kw["input_quantizer_kwargs"]) == ("swish_sign", {"beta": 5.0})
    assert (kw["kernel_quantizer"], kw["kernel_quantizer_kwargs"]) == ("learned_scale", {"clip_value": 1.0})

    # Packed: {-1, +1} bits and the per-filter scale, reloaded by name, the same logits bit for bit.
    export_packed(net, tmp_path / "m.bnn", record)
    with torch.no_grad():
        assert torch.equal(load_packed(tmp_path / "m.bnn")(x), ref)

    # Report: 1 bit per binary weight, 32 per per-filter scale and per gamma.
    modules = dict(net.named_modules())
    expected = 0
    for key, value in net.state_dict().items():
        owner = modules.get(key.rsplit(".", 1)[0])
        if isinstance(owner, BinaryConv2d) and key.endswith(".weight"):
            expected += value.numel() + 32 * owner.out_channels
        elif value.is_floating_point():
            expected += 32 * value.numel()
    assert sum(k.endswith("kernel_quantizer.gamma") for k in net.state_dict()) == len(convs)
    assert compression_report(net, record).summary["bits_after"] == expected

    # LCE: a declared sign and a {-1, +1} kernel times its scale export; LCE's interpreter agrees.
    if not lce_available():
        pytest.skip("the lce extra (larq-compute-engine) is not installed: packed, report and rebuild checked")
    info = export_lce(net, tmp_path / "m.tflite", input_size=(3, 32, 32))
    assert info["binary_layers"] == len(convs)
    if int(np.__version__.split(".")[0]) >= 2 and not os.environ.get("BNNPRUNE_LCE_PYTHON"):
        pytest.skip("LCE's interpreter needs numpy<2 here or BNNPRUNE_LCE_PYTHON: the file is written, not run")
    got = lce_predict(tmp_path / "m.tflite", x)
    close = np.abs(got - ref.numpy()).max(axis=1) < 1e-4  # a pre-activation ~1e-7 from 0 may flip a bit
    assert close.sum() >= 3 and (got.argmax(1) == ref.numpy().argmax(1)).all()


def test_the_export_target_example_writes_a_program_that_loads(doc_targets, tmp_path, call_main):
    target = export_targets.get("pt2")
    assert (target.suffix, target.label) == (".pt2", "ExportedProgram")
    net, record, x = _pruned()
    path = str(tmp_path / "model.pt2")
    assert target(net, path, (3, 32, 32), record=record) == path
    with torch.no_grad():
        assert torch.allclose(torch.export.load(path).module()(x[:1]), net(x[:1]), atol=1e-5)
    # Registered is all the app needs: export=pt2 is one of its choices.
    proc = call_main(*TINY, "export=nope")
    assert stderr_lines(proc) == ["bnnprune: error: `export` must be one of: null, lce, onnx, packed, pt2; got 'nope'"]


def test_docstrings_cite_pages_that_exist():
    cited = set()
    for path in (ROOT / "lightning_bnnprune").rglob("*.py"):
        text = path.read_text()
        assert "METHOD.md" not in text, path  # the method notes are docs/method.md, in the repository
        cited |= set(re.findall(r"docs/[\w./-]+\.md", text))
    assert "docs/method.md" in cited
    assert all((ROOT / page).is_file() for page in cited), cited


def test_public_names_have_one_spelling():
    """README imports and config targets name exported objects at the top level, and every
    exported name resolves."""
    import lightning_bnnprune

    exported = set(lightning_bnnprune.__all__)
    assert all(getattr(lightning_bnnprune, name) is not None for name in exported)
    readme = (ROOT / "README.md").read_text()
    assert not re.findall(r"from lightning_bnnprune\.\w+ import", readme)
    files = [*(ROOT / "conf").rglob("*.yaml"), *(ROOT / "recipes").glob("*.yaml")]
    deep = [f"{path.name}: {target}" for path in files
            for target in re.findall(r"lightning_bnnprune\.[\w.]*\.(\w+)\b", path.read_text())
            if target in exported]
    assert not deep, deep
