"""The app's edges: printing a config or a config mistake without the training stack, no folder
left by a mistake, one short-run message for every strategy, a sweep whose failed job is a row."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time

import pytest

from helpers import TINY, stderr_lines

PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('LOADED', sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules)))\n"
    "sys.argv = ['bnnprune', *sys.argv[1:]]\n"
    "from lightning_bnnprune.train import main\n"
    "main()\n"
)


@pytest.mark.parametrize("args, code", [(["--cfg", "job"], 0), (["model=nope"], 2), (["foo=1"], 2)])
def test_config_and_config_errors_answer_without_the_training_stack(tmp_path, args, code):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout, proc.stdout[-500:]
    assert seconds < 30, seconds  # ~1 s alone; generous for a shared machine
    assert list(tmp_path.iterdir()) == []  # no outputs/ or multirun/ folder


def test_a_config_error_found_while_building_leaves_no_run_folder(call_main, tmp_path):
    proc = call_main("prune.target_pfr=2")
    assert proc.returncode == 2
    assert [line for line in stderr_lines(proc) if line != "Seed set to 0"] == [
        "bnnprune: error: prune: MisconfigurationException: `target_pfr` must be in [0, 1), got 2 "
        "(HYDRA_FULL_ERROR=1 for the traceback)"
    ]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("prune, name", [("msf", "MainSubsidiaryPruning"), ("greedy_l1", "GreedyFilterPruning")])
def test_every_strategy_refuses_a_short_run_in_the_same_words(call_main, tmp_path, prune, name):
    proc = call_main(f"prune={prune}", "prune.scale_to_fit=false", *TINY, "logger=none")
    assert proc.returncode == 2
    (line,) = [line for line in stderr_lines(proc) if line.startswith("bnnprune")]
    assert line.startswith(f"bnnprune: error: {name}'s schedule needs "), line
    assert "but the trainer runs 6: set trainer.max_epochs >= " in line and "(6 steps per epoch)" in line, line
    assert "or shorten the schedule to fit, e.g. schedule.warmup=" in line, line
    assert not (tmp_path / "outputs").exists()


def test_a_failed_sweep_job_is_a_row_and_the_sweep_goes_on(run_app, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_app("-m", "prune=greedy_l1", "schedule.target_pfr=0.999,0.4", "prune.min_filters=2", *TINY,
                   "logger=none", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [(r["job"], r["status"]) for r in rows] == [("0", "failed"), ("1", "ok")]
    assert "target_pfr=0.999" in rows[0]["error"] and "min_filters=2" in rows[0]["error"]
    assert float(rows[1]["pfr"]) == pytest.approx(0.4, abs=0.01) and rows[1]["best_tradeoff"] == "True"
    assert "failed: " in (sweep_dir / "sweep_summary.md").read_text()
    lines = stderr_lines(proc)
    assert any(line.startswith("bnnprune: error: job 0: ") for line in lines), lines
    assert lines[-1] == f"bnnprune: error: 1 of 2 jobs failed; see {sweep_dir / 'sweep_summary.md'}"
    assert "Tip:" not in proc.stdout + proc.stderr  # Lightning's promotions are silenced


@pytest.mark.parametrize("where", ["new_folder", "its_run_folder"])
def test_a_truncated_checkpoint_is_one_line_and_leaves_the_folders_as_they_were(run_app, tmp_path, where):
    import torch

    from lightning_bnnprune.module import ImageClassifier

    old_run = tmp_path / "old_run"
    (old_run / "checkpoints").mkdir(parents=True)
    intact = old_run / "checkpoints" / "intact.ckpt"
    torch.save({"state_dict": ImageClassifier("resnet20_cifar").state_dict(), "global_step": 50}, intact)
    data = intact.read_bytes()
    cut = old_run / "checkpoints" / "last.ckpt"
    cut.write_bytes(data[: len(data) // 2])  # a copy cut in half
    run_dir = old_run if where == "its_run_folder" else tmp_path / "new_run"
    proc = run_app(*TINY, "logger=none", f"ckpt_path={cut}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert stderr_lines(proc) == [
        f"bnnprune: error: ckpt_path: {cut} is truncated or not a checkpoint "
        f"(its zip index is missing: the file ends early; {len(data) // 2} bytes)"
    ]
    assert not (tmp_path / "new_run").exists()  # no folder left by the mistake
    assert sorted(p.name for p in (old_run / "checkpoints").iterdir()) == ["intact.ckpt", "last.ckpt"]
    assert cut.read_bytes() == data[: len(data) // 2]
