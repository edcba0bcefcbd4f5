"""A real ``bnnprune`` process killed mid-schedule resumes from ``last.ckpt`` and ends as the
uninterrupted run does, bit for bit: the same filters removed and the same weights; checkpoints
are written during training, not only at its end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_bnnprune.pruning.record import read_pruned

# 4 epochs of 6 steps; the msf schedule scaled into 24 steps (warm-up 12, then 3 stages of 1 + 3
# steps: pruning from step 12 to 23); a step checkpoint every 3 steps, so the kill can land
# mid-epoch.
ARGS = [
    "data.batch_size=16",
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.step_checkpoint.every_n_train_steps=3",
    "logger=none",
]


def _app(args, cwd: Path) -> list:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LOCAL_RANK", "NODE_RANK")}
    # SIGINT as a terminal delivers it: a shell without job control starts background commands
    # with SIGINT ignored, and a child inherits that (then Ctrl-C could not reach the run at all)
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    return [sys.executable, "-m", "lightning_bnnprune.train", *args], dict(
        cwd=cwd, env=env, text=True, preexec_fn=default_sigint)


def _run(args, cwd: Path) -> subprocess.CompletedProcess:
    cmd, kw = _app(args, cwd)
    return subprocess.run(cmd, capture_output=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run folder of the same run, not interrupted."""
    folder = tmp_path_factory.mktemp("full")
    full = _run([*ARGS, f"hydra.run.dir={folder / 'run'}"], folder)
    assert full.returncode == 0, full.stderr[-3000:]
    return folder / "run"


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, sig, code):
    full_dir, cut_dir = uninterrupted, tmp_path / "cut"
    cmd, kw = _app([*ARGS, f"hydra.run.dir={cut_dir}"], tmp_path)
    with open(tmp_path / "cut.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
        checkpoints = cut_dir / "checkpoints"
        deadline = time.monotonic() + 600
        # mid-schedule: after the step-15 checkpoint (stage 1 pruned, stage 2 under way), before the
        # end; 9 steps of margin, as under load the poll can lag the run by several steps
        while proc.poll() is None and time.monotonic() < deadline:
            # last.ckpt itself says how far it got (file times are too coarse under load); a file
            # caught mid-write fails to load and is read again on the next poll
            try:
                step = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
            except Exception:
                step = -1
            if step >= 15:
                proc.send_signal(sig)
                break
            time.sleep(0.1)
        proc.wait(timeout=120)
    assert proc.returncode == code, "the run ended before it could be interrupted"
    said = (tmp_path / "cut.log").read_text()
    assert f"resume with: bnnprune {' '.join(ARGS)} hydra.run.dir={cut_dir} ckpt_path={cut_dir / 'checkpoints' / 'last.ckpt'}" in said
    assert not (checkpoints / "pruned.pt").exists()  # killed before the removal
    last = checkpoints / "last.ckpt"
    assert sorted(p.name for p in checkpoints.glob("last*")) == ["last.ckpt"]  # one, always current
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert 15 <= state["global_step"] < 24

    first_sitting = (cut_dir / ".hydra" / "overrides.yaml").read_text()
    resumed = _run([*ARGS, f"hydra.run.dir={cut_dir}", f"ckpt_path={last}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the resumed sitting's configs are new; the first sitting's are kept beside, not overwritten
    assert (cut_dir / ".hydra-sitting1" / "overrides.yaml").read_text() == first_sitting
    assert "ckpt_path" in (cut_dir / ".hydra" / "overrides.yaml").read_text() and "ckpt_path" not in first_sitting
    record_full, weights_full = read_pruned(full_dir / "checkpoints" / "pruned.pt")
    record_cut, weights_cut = read_pruned(cut_dir / "checkpoints" / "pruned.pt")
    assert record_cut.shapes == record_full.shapes  # the same pruned architecture
    assert record_cut.groups == record_full.groups  # the same filters removed
    assert weights_cut.keys() == weights_full.keys()
    for name, weight in weights_full.items():
        assert torch.equal(weights_cut[name], weight), name  # the same weights, bit for bit
    summary = json.loads((cut_dir / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["pruning"]["pfr"] == pytest.approx(0.4, abs=0.01)


def test_resume_with_a_changed_pruning_setting_is_refused_in_one_line(tmp_path, uninterrupted):
    """The run was made at the schedule's 0.4; resuming at 0.6 would go on with 0.4's counts while
    printing 0.6 (issue 23, item 2): one line naming the setting and both values, exit 2, and the
    new folder gets no results."""
    ckpt = uninterrupted / "checkpoints" / "last.ckpt"
    proc = _run([*ARGS, f"hydra.run.dir={tmp_path / 'again'}", f"ckpt_path={ckpt}", "prune.target_pfr=0.6"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bnnprune: error:")]
    assert errors == [
        "bnnprune: error: ResumeMismatch: MainSubsidiaryPruning cannot resume from this checkpoint with "
        "target_pfr=0.6: it was made with target_pfr=0.4; restore target_pfr=0.4 to resume it, or start a new run "
        "(no ckpt_path) (HYDRA_FULL_ERROR=1 for the traceback)"
    ]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "again" / "summary.json").exists()


def test_resume_with_a_longer_trainer_goes_on_with_the_same_pruning(tmp_path, uninterrupted):
    """The trainer's length may change: the schedule is the first sitting's (its final retrain
    kept its length), the training goes on with the gates fixed, the same filters are removed."""
    ckpt = uninterrupted / "checkpoints" / "last.ckpt"
    longer = [a for a in ARGS if not a.startswith("trainer.max_epochs=")] + ["trainer.max_epochs=5"]
    proc = _run([*longer, f"hydra.run.dir={tmp_path / 'longer'}", f"ckpt_path={ckpt}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "longer" / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["pruning"]["pfr"] == pytest.approx(0.4, abs=0.01)
    record_full, _ = read_pruned(uninterrupted / "checkpoints" / "pruned.pt")
    record_longer, _ = read_pruned(tmp_path / "longer" / "checkpoints" / "pruned.pt")
    assert record_longer.groups == record_full.groups
