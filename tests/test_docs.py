"""docs/: the strategy that docs/extending.md shows runs as the page says, its YAML lists every
argument, and every page the package's docstrings cite exists."""
import inspect
import re
import types
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_bnnprune import Binarize, FilterPruning

from conftest import UserModule

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
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    pruning = at_end.PruneAtEnd(target_pfr=0.4)
    assert isinstance(pruning, FilterPruning)
    module = UserModule(example_input_size=(3, 32, 32))
    Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[Binarize(), pruning]).fit(module, DataLoader(data, batch_size=8))
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
