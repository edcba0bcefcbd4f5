"""``benchmarks/coverage.py --lce``: the pruned network exported for LCE, run by LCE's interpreter
and compared with PyTorch; the table gets an LCE column only when a run used the flag."""
import lightning_bnnprune.models  # noqa: F401  registers resnet20_cifar

from helpers import benchmark_script, needs_interpreter


def coverage_script():
    return benchmark_script("coverage", "coverage_bench")  # not `coverage`: that is a package's name


@needs_interpreter
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


@needs_interpreter
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
