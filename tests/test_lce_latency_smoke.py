"""Smoke run of ``benchmarks/lce_latency.py``: a tiny grid on resnet20_cifar, every output written
(md, json, png) in tmp_path, a refusal recorded, a rerun that resumes instead of redoing, and
the one-line refusals of bad arguments and of a results file timed otherwise."""
import json
import re

import pytest

from helpers import benchmark_script, needs_interpreter


@pytest.fixture(scope="module")
def bench():
    return benchmark_script("lce_latency", "lce_latency_bench")


@needs_interpreter
def test_tiny_grid_writes_everything_resumes_and_refuses_other_settings(bench, tmp_path, capsys):
    out, work, cells = tmp_path / "out", tmp_path / "work", tmp_path / "cells"
    cells.mkdir()  # one finished v2 cell of msf with learned counts, as cifar10_cpu_v2.py writes it
    kept = {"layer1.0.conv2": 12, "layer2.0.conv2": 20, "layer3.0.conv2": 40}
    (cells / "msf-final_learned_l1init_pfr40_seed3.json").write_text(json.dumps(
        {"strategy": "msf:final_learned_l1init", "target_pfr": 0.4, "seed": 3, "status": "ok", "kept_filters": kept}))
    argv = ["--networks", "resnet20_cifar", "--strategies", "greedy_l1", "stq", "--pfrs", "0.4", "--round-to", "1",
            "32", "--threads", "1", "--rounds", "2", "--calls", "1", "--warmup", "0", "--msf-cells", str(cells),
            "--out", str(out), "--work-dir", str(work)]
    assert bench.main(argv) == 0
    results = json.loads((out / "lce_latency.json").read_text())
    entry = results["networks"]["resnet20_cifar"]
    l1, learned = "greedy_l1:uniform@0.4/r1", "msf_learned:v2_seed3@0.4/r1"
    assert set(entry["files"]) == {"float", "binary", l1, "greedy_l1:uniform@0.4/r32", "stq:uniform@0.4/r1",
                                   "stq:uniform@0.4/r32", learned}
    assert "16" in entry["files"]["greedy_l1:uniform@0.4/r32"]["error"]  # 16-wide stages cannot keep multiples of 32
    pruned = entry["files"][l1]
    assert pruned["pfr"] == pytest.approx(0.4, abs=0.01) and pruned["mac_ratio"] > 2
    # the learned counts cut in (3 groups, 40 of their filters): pruned, less than 40 %
    assert 0 < entry["files"][learned]["pfr"] < pruned["pfr"] and entry["files"][learned]["mac_ratio"] > 1
    # greedy L1 and STQ keep the same uniform counts: one file, timed once
    assert entry["files"]["stq:uniform@0.4/r1"]["path"] == pruned["path"]
    group = entry["timings"]["1"]
    assert set(group["times"]) == {"float", "binary", l1, "stq:uniform@0.4/r1", learned}
    assert group["files_timed"] == 4 and group["times"]["stq:uniform@0.4/r1"] == group["times"][l1]
    assert group["flags"] == {"use_reference_bconv": False, "use_indirect_bgemm": True, "use_xnnpack": True}
    md = (out / "lce_latency.md").read_text()
    assert "python benchmarks/lce_latency.py --networks resnet20_cifar" in md and results["meta"]["commit"] in md
    assert re.search(r"\| resnet20_cifar \| greedy_l1:uniform@0.4/r1 \| 40.0 % \| 2\.\d\dx \| [\d.]+ \([\d.]+\) \| "
                     r"[\d.]+x \| [\d.]+ \|", md), md
    assert "| resnet20_cifar | greedy_l1:uniform@0.4/r32 | - | - | refused: round_to=32" in md
    assert "binary against float in LCE" in md and "load average" in md
    assert (out / "lce_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    assert bench.main(argv) == 0  # resumed: nothing exported or timed again
    assert "timed already, skipped" in capsys.readouterr().out
    assert json.loads((out / "lce_latency.json").read_text())["networks"]["resnet20_cifar"]["timings"] == entry["timings"]

    assert bench.main(argv[:-4] + ["--rounds", "3", "--out", str(out), "--work-dir", str(work)]) == 2
    assert re.search(r"was timed with .*'rounds': 2.*not .*'rounds': 3.*; pass another --name or --out",
                     capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["--strategies", "msf"], r"unknown strategy 'msf': choose <greedy_l1\|stq\|random>\[:<uniform\|size\|macs\|global>\]"),
    (["--strategies", "greedy_l1:learned"], r"unknown strategy 'greedy_l1:learned'"),
    (["--pfrs", "1.0"], r"--pfrs must lie in \(0, 1\), got \[1.0\]"),
    (["--round-to", "0"], r"--round-to must be >= 1, got \[0\]"),
    (["--kernels", "fast"], r"invalid choice: 'fast'"),
])
def test_bad_arguments_are_refused(bench, capsys, argv, message):
    with pytest.raises(SystemExit, match="2"):
        bench.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)
