"""``benchmarks/coverage.py --lce``: the pruned network exported for LCE, run by LCE's interpreter
and compared with PyTorch; the table gets an LCE column only when a run used the flag."""
import importlib.util
import os

import numpy as np
import pytest

import lightning_bnnprune.models  # noqa: F401  registers resnet20_cifar
from lightning_bnnprune.pruning.export_lce import lce_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INTERPRETER = int(np.__version__.split(".")[0]) < 2 or bool(os.environ.get("BNNPRUNE_LCE_PYTHON"))


def coverage_script():
    spec = importlib.util.spec_from_file_location("coverage_bench", os.path.join(ROOT, "benchmarks", "coverage.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (lce_available() and _INTERPRETER),
                    reason="LCE's interpreter needs the lce extra and numpy<2 here or BNNPRUNE_LCE_PYTHON")
def test_lce_column_agrees_with_pytorch_on_a_pruned_network(tmp_path):
    cov = coverage_script()
    row = cov.run_family("resnet20_cifar", 32, 0.4, 0, str(tmp_path), lce=True)
    assert row["status"] == "ok" and row["lce"]["status"] == "ok"
    assert row["lce"]["top1_agreement"] == 1.0 and row["lce"]["max_abs_diff"] < 1e-4
    results = {"resnet10t": dict(row), "resnet18d": dict(row, lce=dict(status="refused", message="cannot export 'x'"))}
    results["resnet10t"].pop("lce")
    meta = dict(pfr=0.4, size=32, commit="c", command="cmd", torch="t", timm="t", machine="m")
    cov.write_markdown(str(tmp_path / "cov.md"), results, meta)
    table = (tmp_path / "cov.md").read_text()
    assert "| refused groups: reason | LCE |" in table
    assert "| – |" in table and "| refused: cannot export 'x' |" in table  # not run / the refusal
    cov.write_markdown(str(tmp_path / "plain.md"), {"resnet10t": results["resnet10t"]}, meta)
    assert "LCE" not in (tmp_path / "plain.md").read_text()  # without --lce the table is as before


@pytest.mark.skipif(not (lce_available() and _INTERPRETER),
                    reason="LCE's interpreter needs the lce extra and numpy<2 here or BNNPRUNE_LCE_PYTHON")
def test_lce_column_of_a_timm_family_with_norm_act_se_and_depthwise_layers(tmp_path):
    # test_efficientnet: timm's BatchNormAct2d, SE gates, depthwise binary convs (written as float)
    cov = coverage_script()
    row = cov.run_family("test_efficientnet", 32, 0.4, 0, str(tmp_path), lce=True)
    lce = row["lce"]
    assert lce["status"] == "ok" and lce["top1_agreement"] == 1.0 and lce["inputs_off"] == 0, lce
    assert lce["float_binary_layers"] > 0 and lce["binary_layers"] > 0
    cell = cov._fmt_lce(row)
    assert cell.startswith("100% top-1 (") and f"grouped: {lce['float_binary_layers']} of " in cell
    off = cov._fmt_lce(dict(row, lce=dict(lce, inputs_off=3, float_binary_layers=0)))
    assert "3/64 inputs off by > 1e-03" in off and "grouped" not in off
