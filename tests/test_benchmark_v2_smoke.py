"""``benchmarks/cifar10_cpu_v2.py`` end to end on a tiny npz, from a warm start that
``benchmarks/warm_start.py`` itself wrote: cells written as they end, skipped when rerun, the
summary's mean +- std per strategy and msf - best greedy with its standard error."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import benchmark_script, engine_like_table, tiny_npz


def _warm_start(tmp_path, n_train):
    """A tiny npz and the warm start ``benchmarks/warm_start.py`` writes from it (one epoch)."""
    data = tiny_npz(tmp_path / "data", n_train, 16)
    benchmark_script("warm_start").main(["--data-dir", str(data), "--out", str(tmp_path / "warm"), "--assets",
                                         str(tmp_path / "assets"), "--epochs", "1", "--batch-size", "16",
                                         "--threads", "1"])
    return data


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_grid_fills_cells_and_skips_finished_ones(tmp_path):
    data = _warm_start(tmp_path, 48)
    bench = benchmark_script("cifar10_cpu_v2")
    argv = ["--data-dir", str(data), "--warm-start", str(tmp_path / "assets" / "resnet20_cifar_binary.pt"),
            "--out", str(tmp_path / "results"), "--work-dir", str(tmp_path / "logs"),
            "--cells-dir", str(tmp_path / "work" / "cells"), "--steps", "8",
            "--batch-size", "8", "--threads", "1", "--pfrs", "0.4", "--seeds", "0", "1",
            "--strategies", "baseline", "greedy_l1", "msf:final_learned"]
    first = bench.main(argv)
    assert first == {"ran": 6, "skipped": 0, "grid": 6}
    cells = sorted(os.listdir(tmp_path / "work" / "cells"))
    assert cells == sorted(f"{s}_seed{k}.json" for s in ("baseline", "greedy_l1_pfr40", "msf-final_learned_pfr40")
                           for k in (0, 1))
    cell = json.loads((tmp_path / "work" / "cells" / "msf-final_learned_pfr40_seed1.json").read_text())
    assert cell["global_step"] == 8 and abs(cell["pfr"] - 0.4) <= 0.01 and cell["seed"] == 1
    summary = json.loads((tmp_path / "results" / "cifar10_cpu_v2.json").read_text())
    row = summary["rows"]["greedy_l1@0.4"]
    accs = [c["test_acc"] for c in summary["cells"] if c["strategy"] == "greedy_l1"]
    assert row["n"] == 2 and row["mean"] == pytest.approx(sum(accs) / 2)
    (comparison,) = summary["comparisons"]
    assert comparison["msf"] == "msf:final_learned" and comparison["greedy"] == "greedy_l1"
    assert comparison["se"] >= 0 and comparison["drop_vs_unpruned"] is not None
    for pair in summary["equal_macs"]:  # a rival never saves more MACs than the msf row it answers
        assert pair["mac_ratio"][1] <= pair["mac_ratio"][0] * (1 + 1e-3)
    assert "| greedy_l1 | 0.40 |" in (tmp_path / "results" / "cifar10_cpu_v2.md").read_text()
    assert (tmp_path / "results" / "cifar10_cpu_v2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert bench.main(argv) == {"ran": 0, "skipped": 6, "grid": 6}  # a rerun only skips
    os.remove(tmp_path / "work" / "cells" / "baseline_seed1.json")
    assert bench.main(argv) == {"ran": 1, "skipped": 5, "grid": 6}  # and fills what is missing

    # two processes share one work dir: a cell a live process holds is left to it, a dead one's is
    # taken over (the pid of a finished child is no process any more)
    os.remove(tmp_path / "work" / "cells" / "baseline_seed1.json")
    held = tmp_path / "work" / "cells" / "baseline_seed1.running"
    held.write_text(str(os.getppid()))
    assert bench.main(argv) == {"ran": 0, "skipped": 5, "grid": 6}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held.write_text(dead.stdout.strip())
    assert bench.main(argv) == {"ran": 1, "skipped": 5, "grid": 6}
    assert not held.exists()
    cell = json.loads((tmp_path / "work" / "cells" / "baseline_seed1.json").read_text())
    assert cell["command"].startswith("python benchmarks/cifar10_cpu_v2.py") and cell["commit"]

    # one grid, one start: cells from another warm start are refused in the same cells dir
    other = tmp_path / "other_start.pt"
    state = torch.load(tmp_path / "assets" / "resnet20_cifar_binary.pt", weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other)
    with pytest.raises(SystemExit, match="holds cells from another warm start"):
        bench.main(argv + ["--warm-start", str(other)])

    with pytest.raises(SystemExit):
        bench.parse_args(argv + ["--strategies", "msf:nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(argv + ["--strategies", "greedy_l1:learned"])  # variants: uniform|size|macs|global|distill


def test_cells_at_an_equal_lce_speedup(tmp_path):
    """``--target-speedups``: msf's learned counts and greedy L1 at one LCE speedup (an injected
    latency table: nothing timed for the counts), compared in their own table."""
    data = _warm_start(tmp_path, 32)
    table = tmp_path / "table.json"
    table.write_text(json.dumps(engine_like_table("resnet20_cifar", float_ms=0.05).to_dict()))
    bench = benchmark_script("cifar10_cpu_v2")
    argv = ["--data-dir", str(data), "--warm-start", str(tmp_path / "assets" / "resnet20_cifar_binary.pt"),
            "--out", str(tmp_path / "results"), "--work-dir", str(tmp_path / "logs"), "--steps", "6",
            "--batch-size", "8", "--threads", "1", "--pfrs", "0.4", "--seeds", "0", "--target-speedups", "1.3",
            "--latency-table", str(table), "--strategies", "msf:final_learned", "greedy_l1", "greedy_l1:macs"]
    keys = [c["key"] for c in bench.cells(bench.parse_args(argv))]
    # greedy_l1:macs has its own allocation: no speedup cell for it
    assert keys == ["msf-final_learned_pfr40_seed0", "msf-final_learned_speedup1.3x_seed0", "greedy_l1_pfr40_seed0",
                    "greedy_l1_speedup1.3x_seed0", "greedy_l1-macs_pfr40_seed0"]
    argv[argv.index("greedy_l1:macs")] = "baseline"
    assert bench.main(argv)["ran"] == 5
    summary = json.loads((tmp_path / "results" / "cifar10_cpu_v2.json").read_text())
    rows = {r["strategy"]: r for r in summary["equal_speedup"]}
    assert set(rows) == {"msf:final_learned", "greedy_l1"}
    for row in rows.values():
        assert row["target_speedup"] == 1.3 and row["n"] == 1
        assert 1.3 <= row["estimated"] <= 1.3 * 1.1  # met on the table
    cell = json.loads((tmp_path / "results" / "cifar10_cpu_v2_cells" / "greedy_l1_speedup1.3x_seed0.json").read_text())
    assert "lce_speedup" in cell or "lce_error" in cell  # measured where LCE runs, else why not
    assert "| 1.3x | greedy_l1 |" in (tmp_path / "results" / "cifar10_cpu_v2.md").read_text()
    assert not any(k.startswith("greedy_l1@") and "speedup" in k for k in summary["rows"])  # PFR rows stay PFR rows
    if "lce_speedup" in cell:  # timed where LCE runs; again (quietly), the cell keeps its first figure beside
        assert bench.main(argv + ["--retime-lce"])["ran"] == 0
        again = json.loads((tmp_path / "results" / "cifar10_cpu_v2_cells" / "greedy_l1_speedup1.3x_seed0.json").read_text())
        assert again["lce_speedup_in_cell"] == cell["lce_speedup"] and again["lce_retimed"]
        assert again["lce_speedup"] == pytest.approx(again["lce_unpruned_ms"] / again["lce_ms"])


def test_cells_with_the_full_precision_teacher(tmp_path, capsys):
    """Protocol v3's plumbing: every cell distils from ``--teacher`` (Binarize's teacher), and the
    pruning retraining may take it as its teacher too; without the weights that is refused."""
    from lightning_bnnprune.module import ImageClassifier

    data = _warm_start(tmp_path, 32)
    fp = tmp_path / "fp.pt"
    torch.save(ImageClassifier("resnet20_cifar").net.state_dict(), fp)
    bench = benchmark_script("cifar10_cpu_v2")
    argv = ["--data-dir", str(data), "--warm-start", str(tmp_path / "assets" / "resnet20_cifar_binary.pt"),
            "--out", str(tmp_path / "results"), "--work-dir", str(tmp_path / "logs"), "--name", "cifar10_cpu_v3",
            "--steps", "4", "--batch-size", "8", "--threads", "1", "--pfrs", "0.4", "--seeds", "0",
            "--strategies", "baseline", "greedy_l1:distill", "--distill-teacher", "full_precision"]
    assert bench.main(argv + ["--teacher", str(fp)])["ran"] == 2
    cell = json.loads((tmp_path / "results" / "cifar10_cpu_v3_cells" / "greedy_l1-distill_pfr40_seed0.json").read_text())
    assert cell["status"] == "ok" and "--teacher" in cell["command"] and cell["global_step"] == 4
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "--distill-teacher full_precision distils from --teacher" in capsys.readouterr().err


def test_v3_budget_curve_fills_each_budgets_grid_and_compares_across_r(tmp_path, capsys):
    """``benchmarks/cifar10_cpu_v3.py``: v2's grid at each budget R from one start, every cell with
    the full-precision teacher; the curve compares the rows across R, the paper's msf against the
    defaults, and the defaults against a greedy rival that saves no more MACs."""
    from lightning_bnnprune.module import ImageClassifier

    data = _warm_start(tmp_path, 32)
    fp = tmp_path / "fp.pt"
    torch.save(ImageClassifier("resnet20_cifar").net.state_dict(), fp)
    bench = benchmark_script("cifar10_cpu_v3")
    argv = ["--data-dir", str(data), "--warm-start", str(tmp_path / "assets" / "resnet20_cifar_binary.pt"),
            "--teacher", str(fp), "--out", str(tmp_path / "results"), "--work-dir", str(tmp_path / "logs"),
            "--budgets", "24", "30", "--rival-pfrs", "0.28", "--seeds", "0", "1", "--batch-size", "8",
            "--threads", "1"]
    curve = bench.main(argv)
    assert curve["ran"] == 2 * 2 * (len(bench.ROWS) + len(bench.RIVALS))
    assert [b["steps"] for b in curve["budgets"]] == [24, 30]
    for b in curve["budgets"]:
        cell = json.loads((tmp_path / "results" / "cifar10_cpu_v3" / f"cifar10_cpu_v3_r{b['steps']}_cells"
                           / "msf-paper_pfr40_seed1.json").read_text())
        assert cell["global_step"] == b["steps"] and "--teacher" in cell["command"]
        assert "--distill-teacher full_precision" in cell["command"]
        assert set(b["rows"]) == {f"{s}@{p}" for s, p in [("baseline", None)] + [(s, 0.4) for s in bench.ROWS[1:]]
                                  + [(s, 0.28) for s in bench.RIVALS]}
        paper, default = b["rows"]["msf:paper@0.4"], b["rows"]["msf:final_learned_l1init@0.4"]
        assert b["paper_vs_default"]["diff"] == pytest.approx(paper["mean"] - default["mean"])
        assert default["drop_vs_unpruned"] == pytest.approx(b["rows"]["baseline@None"]["mean"] - default["mean"])
        rival = b["default_vs_rival"]
        assert rival["greedy"].startswith("greedy_l1") and rival["mac_ratio"][1] <= rival["mac_ratio"][0] * (1 + 1e-3)
    goal = curve["goal"]
    assert goal["steps"] == 30 and goal["drop"] == curve["budgets"][1]["rows"]["msf:final_learned_l1init@0.4"]["drop_vs_unpruned"]
    assert goal["rivals_run"]
    # a lead not measured is not called missed: "missed" only once the rivals ran and none saves as few MACs
    unrivalled = {**curve, "goal": {**goal, "lead": None, "lead_met": False, "rivals_run": False}}
    assert "not measured yet (no equal-MAC rival has finished at R = 30)" in bench.markdown(unrivalled)
    assert "**missed** (no greedy row saves as few MACs" in bench.markdown(
        {**unrivalled, "goal": {**unrivalled["goal"], "rivals_run": True}})
    md = (tmp_path / "results" / "cifar10_cpu_v3.md").read_text()
    assert "| msf:paper | 0.40 |" in md and "R = 30 (14 cells)" in md and "Goal (issue 21), at R = 30" in md
    assert (tmp_path / "results" / "cifar10_cpu_v3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # each budget runs the goal's rows first, then the rivals, then the rest
    cells = tmp_path / "results" / "cifar10_cpu_v3" / "cifar10_cpu_v3_r24_cells"
    done = {f.stem: f.stat().st_mtime_ns for f in cells.glob("*.json")}
    goal_rows = [t for k, t in done.items() if k.startswith(("baseline", "msf-final_learned_l1init"))]
    rivals = [t for k, t in done.items() if "_pfr28_" in k]
    rest = [t for k, t in done.items() if k.startswith("msf-paper") or ("greedy" in k and "_pfr40_" in k)]
    assert len(goal_rows) == len(rivals) == 4 and len(rest) == 6
    assert max(goal_rows) < min(rivals) and max(rivals) < min(rest)

    assert bench.main(argv)["ran"] == 0  # a rerun continues: nothing left
    planned = bench.main(argv + ["--summary-only", "--budgets", "24", "30", "45"])  # the goal's R is the last planned
    assert planned["goal"] is None and "Goal (issue 21), at R = 45" in (
        tmp_path / "results" / "cifar10_cpu_v3.md").read_text()
    assert bench.main(argv + ["--summary-only"])["budgets"] == json.loads(
        (tmp_path / "results" / "cifar10_cpu_v3.json").read_text())["budgets"]
    with pytest.raises(SystemExit):
        bench.parse_args(argv + ["--teacher", str(tmp_path / "missing.pt")])
    assert "--teacher: no file" in capsys.readouterr().err


def test_a_cell_cut_short_resumes_from_its_epoch_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path, capsys):
    """A sitting that ends inside a cell (here: dies at step 6) leaves the checkpoint of its last
    epoch; the same command resumes the cell from it and ends with the weights of a cell never cut."""
    from lightning_bnnprune.module import ImageClassifier

    data = _warm_start(tmp_path, 32)  # 4 batches of 8: an epoch every 4 steps
    fp = tmp_path / "fp.pt"
    torch.save(ImageClassifier("resnet20_cifar").net.state_dict(), fp)
    bench = benchmark_script("cifar10_cpu_v2")

    def argv(name):
        return ["--data-dir", str(data), "--warm-start", str(tmp_path / "assets" / "resnet20_cifar_binary.pt"),
                "--teacher", str(fp), "--out", str(tmp_path / name), "--work-dir", str(tmp_path / name / "logs"),
                "--steps", "12", "--batch-size", "8", "--threads", "1", "--pfrs", "0.4", "--seeds", "0",
                "--strategies", "msf:final_learned", "greedy_l1"]

    assert bench.main(argv("whole"))["ran"] == 2
    assert bench.main(argv("cut") + ["--stop-at-step", "6"])["ran"] == 0  # both die after their first epoch
    for key in ("msf-final_learned_pfr40_seed0", "greedy_l1_pfr40_seed0"):
        assert (tmp_path / "cut" / "logs" / "ckpt" / key / "last.ckpt").is_file()
    assert bench.main(argv("cut"))["ran"] == 2
    for key in ("msf-final_learned_pfr40_seed0", "greedy_l1_pfr40_seed0"):
        whole, cut = (json.loads((tmp_path / name / "cifar10_cpu_v2_cells" / f"{key}.json").read_text())
                      for name in ("whole", "cut"))
        assert whole["resumed_from_step"] is None and cut["resumed_from_step"] == 4
        assert cut["global_step"] == 12 and cut["weights_sha256"] == whole["weights_sha256"]
        assert cut["test_acc"] == whole["test_acc"] and cut["kept_filters"] == whole["kept_filters"]
        assert not (tmp_path / "cut" / "logs" / "ckpt" / key).exists()  # the finished cell's JSON is what stays
        assert not (tmp_path / "cut" / "logs" / "ckpt" / f"{key}.settings.json").exists()

    # a checkpoint made with other settings is not resumed: the cell starts over
    greedy = argv("other")[:-2] + ["greedy_l1"]
    assert bench.main(greedy + ["--stop-at-step", "6"])["ran"] == 0
    assert bench.main(greedy + ["--lr", "0.002"])["ran"] == 1
    assert "made with other settings; starting over" in capsys.readouterr().out
    cell = json.loads((tmp_path / "other" / "cifar10_cpu_v2_cells" / "greedy_l1_pfr40_seed0.json").read_text())
    assert cell["resumed_from_step"] is None and cell["global_step"] == 12


def test_two_processes_writing_one_summary_leave_it_whole(tmp_path):
    """Two grid processes summarise into the same files; a reader never sees a half-written json
    and neither writer fails (a shared temporary name once did both)."""
    path = tmp_path / "summary.json"
    writer = ("import sys; sys.path.insert(0, 'benchmarks'); from _report import write_json\n"
              "for i in range(300): write_json(sys.argv[1], {'cells': [{'i': i, 'x': 'y' * 64}] * 2000})")
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(path)], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    reads = 0
    while any(p.poll() is None for p in procs):
        if path.exists():
            assert len(json.loads(path.read_text())["cells"]) == 2000
            reads += 1
    assert [p.wait() for p in procs] == [0, 0], [p.stderr.read()[-500:] for p in procs]
    assert reads > 0 and os.listdir(tmp_path) == ["summary.json"]


def test_a_cell_after_a_grid_rewrote_its_tables_is_not_marked_dirty(tmp_path):
    """Every cell records the commit it ran at; a grid rewrites benchmarks/results after each cell,
    which once marked every later cell "+local changes". Only code counts."""
    git_commit = benchmark_script("_report").git_commit

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for name in ("benchmarks/results/grid.md", "benchmarks/grid.py", "lightning_bnnprune/layers.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("v1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    head = git_commit(root=str(tmp_path))
    assert len(head) >= 7 and "+" not in head
    (tmp_path / "benchmarks/results/grid.md").write_text("a cell later\n")
    assert git_commit(root=str(tmp_path)) == head
    (tmp_path / "benchmarks/grid.py").write_text("v2\n")
    assert git_commit(root=str(tmp_path)) == head + "+local changes"
    assert git_commit(("lightning_bnnprune",), root=str(tmp_path)) == head
