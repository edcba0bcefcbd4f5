"""Smoke run of ``benchmarks/step_time.py``: the plain and the pruning Trainer take turns, every
phase of the paper's layer-by-layer schedule gets a row, and the selector's teacher forwards are
counted where it runs (selector steps) and not where it does not (retrain steps)."""
import re

from lightning_bnnprune.pruning import selector

from helpers import benchmark_script


def test_tiny_run_times_every_phase_and_counts_the_teacher(tmp_path):
    bench = benchmark_script("step_time")
    forward = selector.open_gates_forward
    out = tmp_path / "step_time.md"
    bench.main(["--model", "resnet20_cifar", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--threads", "1",
                "--tmp", str(tmp_path / "runs"), "--out", str(out)])
    assert selector.open_gates_forward is forward  # the counting wrapper is taken off again
    md = out.read_text()
    assert "| plain |" in md
    for phase in ("selector", "retrain"):
        for layer in ("layer1.0.conv1", "layer3.2.conv1"):
            row = re.search(rf"\| {phase} \({re.escape(layer)}\) \|.*\| (\d+)/(\d+) \|", md)
            assert row, (phase, layer, md)
            forwards, steps = map(int, row.groups())
            assert steps == 2 and forwards == (steps if phase == "selector" else 0)
