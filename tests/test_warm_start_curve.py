"""``benchmarks/warm_start_curve.py`` on small accuracy files: the run from the teacher is shifted by
the teacher's hours, each whole hour gives the best accuracy reached by then, the goal is judged."""
import json

import pytest

from helpers import benchmark_script


def _csv(path, rows):
    lines = ["epoch,step,test_acc,test_loss,train_loss,lr,wall_s"]
    lines += [f"{e},{100 * e},{acc},1.0,1.0,0.001,{s}" for e, acc, s in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_curves_against_hours_with_the_teacher_counted(tmp_path):
    bench = benchmark_script("warm_start_curve")
    scratch = _csv(tmp_path / "scratch.csv", [(1, 0.40, 1800), (2, 0.55, 3600), (3, 0.50, 7200), (4, 0.60, 10800)])
    run = _csv(tmp_path / "run.csv", [(1, 0.70, 1800), (2, 0.85, 3600)])
    teacher = tmp_path / "fp.json"
    teacher.write_text(json.dumps({"wall_time_s": 3600, "test_acc": 0.87}))
    curves = bench.main(["--scratch", str(scratch), "--run", str(run), "--teacher", str(teacher),
                         "--out", str(tmp_path / "out")])
    assert [h for h, _, _ in curves["from the full-precision weights, its teacher"]] == pytest.approx([1.5, 2.0])
    md = (tmp_path / "out" / "warm_start_curve.md").read_text()
    assert "| 1 | 55.00 % | - |" in md  # before the teacher's hour is over the run has no epoch
    assert "| 2 | 55.00 % | 85.00 % |" in md and "| 3 | 60.00 % | - |" in md  # best so far; past its end: -
    assert "epoch 2 at 2.00 h, test top-1 85.00 % (best 85.00 %); the goal reached at 2.00 h." in md
    assert "the goal not reached in its 3.00 h." in md and "87.00 % test top-1" in md
    assert (tmp_path / "out" / "warm_start_curve.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        bench.parse_args(["--run", str(tmp_path / "missing.csv")])
