"""The real ``bnnprune`` app in a subprocess: a tiny run and its outputs, resume, a sweep, the
one-line errors, and the config lookup of an installed (wheel-layout) package."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_bnnprune
from lightning_bnnprune.config import conf_dir, recipe_names, recipes_dir

from helpers import TINY, stderr_lines


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_tiny_run_leaves_its_outputs_and_resumes_in_place(run_app, call_main, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_app(*TINY, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bnnprune summary" in proc.stdout and "test accuracy" in proc.stdout
    summary = _summary(run_dir)
    assert 0.0 <= summary["test_acc"] <= 1.0
    assert summary["binarized_layers"] == 18  # resnet20_cifar: every conv but the stem and the two shortcuts
    assert summary["choices"]["data"] == "digits" and summary["choices"]["binarize"] == "bireal"
    assert summary["epochs"] == 1 and summary["steps"] == 6
    pruning = summary["pruning"]  # the quickstart prunes (prune=msf) and removes the filters
    assert abs(pruning["pfr"] - 0.4) <= 0.01 and pruning["mac_ratio"] > 1 and pruning["compression"] > 1
    assert summary["parameters"] == pruning["params_after"] < pruning["params_before"]
    assert "pruned           PFR 40.0 %" in proc.stdout
    assert Path(summary["pruned_model"]) == run_dir / "checkpoints" / "pruned.pt"
    assert (run_dir / "checkpoints" / "pruned.pt").is_file()
    assert (run_dir / "checkpoints" / "pruning_report.md").is_file()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert Path(summary["last_checkpoint"]) == last and last.is_file()
    assert (run_dir / "csv" / "version_0" / "metrics.csv").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert "is deprecated" not in proc.stdout + proc.stderr  # Lightning's LeafSpec warning is silenced

    # The folder now holds results: a new run there is refused, in one line ...
    refused = call_main(*TINY, f"hydra.run.dir={run_dir}")
    assert refused.returncode == 2
    assert stderr_lines(refused) == [
        f"bnnprune: error: hydra.run.dir={run_dir} already holds results; choose a new folder, "
        "or resume from it with ckpt_path=<a checkpoint in it>"
    ]
    # ... unless it resumes from a checkpoint in it: one more epoch on top of the first.
    resumed = run_app(*[o for o in TINY if "max_epochs" not in o], "trainer.max_epochs=2",
                      f"hydra.run.dir={run_dir}", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["epochs"] == 2 and summary["steps"] == 12
    assert (run_dir / "csv" / "version_1" / "metrics.csv").is_file()  # the first run's log is kept


def test_sweep_runs_every_job(run_app, tmp_path):
    """A sweep over strategies at tiny size: one run folder per job, each on the shared schedule
    (the default one, 60 warm-up steps: every strategy scales it into the 6 steps alike), and a
    summary of the sweep."""
    sweep_dir = tmp_path / "sweep"
    proc = run_app("-m", "prune=none,msf,stq", *TINY, "logger=none", f"hydra.sweep.dir={sweep_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep_dir / "sweep_summary.csv").open()))
    assert [r["overrides"] for r in rows] == ["prune=none", "prune=msf", "prune=stq"]
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert float(rows[0]["mac_ratio"]) == 1.0 and float(rows[1]["mac_ratio"]) > 1.5
    assert (sweep_dir / "sweep_summary.png").stat().st_size > 0
    assert "| 1" in (sweep_dir / "sweep_summary.md").read_text()
    assert f"summary in {sweep_dir / 'sweep_summary.md'}" in proc.stdout
    jobs = {_summary(sweep_dir / str(i))["choices"]["prune"]: _summary(sweep_dir / str(i)) for i in (0, 1, 2)}
    assert set(jobs) == {"none", "msf", "stq"}
    assert jobs["none"]["pruning"] is None
    for strategy in ("msf", "stq"):
        assert abs(jobs[strategy]["pruning"]["pfr"] - 0.4) <= 0.01
        assert jobs[strategy]["parameters"] < jobs["none"]["parameters"]
        assert jobs[strategy]["steps"] == jobs["none"]["steps"] == 6  # one budget for every job
    # stq's uniform shares and msf's learned counts put the same number of cuts in different layers
    assert jobs["msf"]["parameters"] != jobs["stq"]["parameters"]
    assert proc.stdout.count("bnnprune summary") == 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["recipe=nope"], "bnnprune: error: unknown recipe 'nope'; choose one of: "),
        (["model=nope"], "bnnprune: error: unknown model option 'nope'; choose one of: nin_cifar, resnet18_cifar, "),
        (["foo=1"], "bnnprune: error: unknown key 'foo'; top-level keys: binarize, callbacks, ckpt_path, data, "),
        (["-m", "binarize=xnor,nope"], "bnnprune: error: unknown binarize option 'nope'; choose one of: bdg, bireal, none, xnor"),
    ],
    ids=["recipe", "option", "key", "sweep-option"],
)
def test_mistakes_are_one_line_errors(call_main, args, message):
    proc = call_main(*args)
    assert proc.returncode == 2
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(message), lines[0]


def test_installed_layout_finds_conf_and_recipes_from_any_folder(tmp_path):
    """A wheel carries conf/ and recipes/ inside the package: copy the package that way and call
    the console script's entry point (``lightning_bnnprune.train:main``) in a new interpreter, from
    an unrelated folder, with no checkout on the path. ``recipe=nope`` composes the primary config
    and lists the recipes it found: a one-line error, exit status 2."""
    site = tmp_path / "site"
    package = Path(lightning_bnnprune.__file__).parent
    shutil.copytree(package, site / "lightning_bnnprune", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(conf_dir(), site / "lightning_bnnprune" / "conf")
    shutil.copytree(recipes_dir(), site / "lightning_bnnprune" / "recipes")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = str(site)
    code = (
        "import sys, lightning_bnnprune.config as c, lightning_bnnprune.train as t;"
        "print(c.conf_dir(), c.recipes_dir(), flush=True);"
        "sys.argv = ['bnnprune', 'recipe=nope'];"
        "t.main()"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.stdout.split() == [str(site / "lightning_bnnprune" / "conf"),
                                   str(site / "lightning_bnnprune" / "recipes")]
    assert proc.returncode == 2
    assert stderr_lines(proc) == ["bnnprune: error: unknown recipe 'nope'; choose one of: "
                                  + ", ".join(recipe_names())]
    assert not any(elsewhere.iterdir())  # nothing ran, nothing written


def _readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in README.md."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index(heading):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def test_readme_callback_snippet_runs_and_prunes(tmp_path, monkeypatch):
    """The README's "callbacks in your own Trainer" snippet, verbatim but for a shorter run."""
    code = _readme_block("### 1. Callbacks in your own Trainer")
    shorter = {
        "max_epochs=6,": "max_epochs=1, limit_train_batches=6, limit_val_batches=1, logger=False, "
                         "enable_progress_bar=False, enable_model_summary=False,",
        "warmup=60, selector=10, retrain=20)": "warmup=0, selector=1, retrain=1)",
        "print(model.backbone)": "",
    }
    for old, new in shorter.items():
        assert old in code, f"README snippet changed: {old!r} not found"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, "README.md", "exec"), namespace)
    model, trainer = namespace["model"], namespace["trainer"]
    pruner = trainer.callbacks[1]
    assert abs(pruner.summary["pfr"] - 0.4) <= 0.01
    assert sum(p.numel() for p in model.backbone.parameters()) == pruner.summary["params_after"]
    assert pruner.summary["params_after"] < pruner.summary["params_before"]
    # the checkpoint folder: lightning_logs/version_0/checkpoints with the README's logger; none here
    assert Path(pruner.pruned_path) == tmp_path / "checkpoints" / "pruned.pt"
    # ... and the README's reloading snippet, verbatim, in the same session
    exec(compile(_readme_block("It reloads without training"), "README.md", "exec"), namespace)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    for reloaded in (namespace["net"], namespace["same"].backbone if hasattr(namespace["same"], "backbone")
                     else namespace["same"]):
        assert torch.allclose(reloaded(x), model.backbone(x), atol=1e-5)


def test_cpu_budget_recipe_runs_on_npz_files(run_app, tmp_path):
    """A paper recipe end to end through the npz data module, on arrays written here (shortened)."""
    data = tmp_path / "data" / "cifar10"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 64), ("test", 16)):
        np.savez(data / f"{name}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 10, n, dtype=np.int64))
    run_dir = tmp_path / "run"
    proc = run_app("recipe=cifar10_vgg11_cpu_budget", "prune=stq", f"paths.data_dir={tmp_path / 'data'}",
                   "data.val_split=16", "data.batch_size=8", "trainer.max_steps=4", "schedule.warmup=2",
                   "trainer.limit_val_batches=1", "logger=none", "trainer.enable_progress_bar=false",
                   "trainer.enable_model_summary=false", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(run_dir)
    assert summary["choices"]["recipe"] == "cifar10_vgg11_cpu_budget" and summary["choices"]["prune"] == "stq"
    assert summary["model_name"] == "vgg11_cifar" and summary["steps"] == 4
    assert abs(summary["pruning"]["pfr"] - 0.4) <= 0.01
