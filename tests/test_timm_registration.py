"""The CIFAR networks are in timm's registry once the package and timm are both imported, in
either order, as a timm plugin's are; the app's config path still loads neither torch nor timm."""
from __future__ import annotations

import subprocess
import sys

import pytest

USER_MODULE = """
import timm
import torch
from lightning.pytorch import LightningModule

import lightning_bnnprune


class MyModule(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = timm.create_model("resnet18_cifar", num_classes=10)

    def forward(self, x):
        return self.net(x)


print(tuple(MyModule()(torch.zeros(1, 3, 32, 32)).shape))
"""


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter: what a user's script sees, no import left by pytest."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("code", [
    "import timm, lightning_bnnprune; print(type(timm.create_model('resnet20_cifar')).__name__)",
    "import lightning_bnnprune; from timm.models import create_model; print(type(create_model('resnet20_cifar')).__name__)",
    # an availability check (Lightning's RequirementCache style) before the import
    "import importlib.util, lightning_bnnprune; importlib.util.find_spec('timm'); import timm; "
    "print(type(timm.create_model('resnet20_cifar')).__name__)",
], ids=["timm_first", "timm_submodule_after", "find_spec_before_import"])
def test_importing_the_package_registers_the_cifar_networks(code):
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["CifarResNet"]


def test_a_users_module_builds_a_cifar_network_before_touching_a_callback():
    proc = _python(USER_MODULE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["(1,", "10)"]


def test_the_config_module_still_loads_neither_torch_nor_timm():
    proc = _python("import sys, lightning_bnnprune.config\n"
                   "print(sorted(m for m in ('torch', 'timm', 'lightning') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]"]


def test_timm_imported_after_the_package_registers_them_and_keeps_its_own_loader():
    proc = _python("import lightning_bnnprune, sys, timm\n"
                   "print(type(timm.create_model('resnet20_cifar')).__name__,\n"
                   "      type(timm.__loader__).__name__, type(timm.__spec__.loader).__name__,\n"
                   "      any(type(f).__name__ == '_RegisterWithTimm' for f in sys.meta_path))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the hook has left sys.meta_path; timm's module shows its usual loader
    assert proc.stdout.split() == ["CifarResNet", "SourceFileLoader", "SourceFileLoader", "False"]
