"""Smoke run of ``benchmarks/cifar10_cpu.py`` end to end on a tiny npz dataset.

Real Trainer, real resnet20_cifar, real files: a few optimizer steps per run, every output written
(md, png, json), and a strategy whose schedule cannot fit is recorded as a failure while the
others go on.
"""
import json
import re
import sys

import pytest
import torch

from helpers import benchmark_script, tiny_npz


@pytest.fixture(scope="module")
def bench():
    yield benchmark_script("cifar10_cpu")
    sys.modules.pop("cifar10_cpu", None)


def test_tiny_run_writes_everything_and_records_a_failure(bench, tmp_path):
    data = tiny_npz(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--data-dir", str(data), "--out", str(out), "--work-dir", str(tmp_path / "work"),
            "--steps-warmup", "1", "--steps", "2", "--batch-size", "8", "--pfrs", "0.4", "--threads", "1",
            "--strategies", "baseline", "stq", "msf", "bdg"]
    threads = torch.get_num_threads()
    try:
        # R=2 cannot hold msf's 12 selector + 12 retrain phases: a failure, recorded, the others run
        assert bench.main(argv) == 2
    finally:
        torch.set_num_threads(threads)  # main() sets it for the whole process

    report = json.loads((out / "cifar10_cpu.json").read_text())
    runs = {(r["strategy"], r["target_pfr"]): r for r in report["results"]}
    assert set(runs) == {("warm_start", None), ("baseline", None), ("stq", 0.4), ("msf", 0.4), ("bdg", None)}
    assert runs[("msf", 0.4)]["status"] == "failed"
    assert "schedule needs" in runs[("msf", 0.4)]["error"]
    for key in (("baseline", None), ("stq", 0.4), ("bdg", None)):
        assert runs[key]["status"] == "ok", runs[key]
        assert runs[key]["global_step"] == 2
        assert 0.0 <= runs[key]["test_acc"] <= 100.0
    assert runs[("stq", 0.4)]["pfr"] == pytest.approx(0.4, abs=0.01)
    assert runs[("stq", 0.4)]["mac_ratio"] > 1.0
    assert runs[("baseline", None)]["pfr"] == 0.0
    assert report["meta"]["n_test"] == 24

    md = (out / "cifar10_cpu.md").read_text()
    assert "python benchmarks/cifar10_cpu.py --data-dir" in md
    assert report["meta"]["git"]["commit"] in md
    assert "| Main/Subsidiary (learned selector) | 40% | **failed**" in md
    assert "| STQ binarisation error, one-shot | 40% |" in md
    assert "0.33 pt" in md and "89x" in md and "1-2 pt" in md
    assert "no comparison" in md  # msf failed: the verdict says so instead of inventing one
    assert (out / "cifar10_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "work" / "warm_start.ckpt").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--pfrs", "1.5"], r"--pfrs must lie in \(0, 1\), got \[1.5\]"),
        (["--steps", "0"], r"--steps must be >= 1, got 0"),
        (["--msf-selector-share", "1"], r"--msf-selector-share must lie in \(0, 1\), got 1.0"),
        (["--strategies", "magic"], r"invalid choice: 'magic'"),
        (["--greedy-mode", "layerwise", "--msf-layers-per-stage", "2"], r"needs --msf-layers-per-stage 1"),
    ],
)
def test_bad_arguments_are_refused(bench, capsys, argv, message):
    with pytest.raises(SystemExit, match="2"):
        bench.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)
