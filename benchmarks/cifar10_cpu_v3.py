"""CIFAR-10 pruning benchmark, protocol v3 (issue 21): a budget curve from the full-precision start.

Protocol v2's grid (``cifar10_cpu_v2.py``: one cell per strategy, PFR and seed, each trained exactly
R steps from the kept warm start), with three changes:

* *Start*: the binary warm start trained from the full-precision ResNet-20's weights with it as
  teacher (``benchmarks/assets/resnet20_cifar_binary_fp.pt``).
* *Teacher*: every cell distils from the full-precision network through its whole fit (Binarize's
  ``teacher``, ReActNet's distributional loss, weight 1), and the distilling strategies' retraining
  distils from it too (``distill_teacher="full_precision"``): each strategy is offered it.
* *Budgets*: the grid at R = 700 and R = 3,900 steps (10 epochs), so the drop against the unpruned
  network reads as a function of R, and the paper's layer-by-layer schedule against the one-stage
  default at each R.

Rows: the unpruned network, msf's defaults (``msf:final_learned_l1init``), the paper's
layer-by-layer msf (``msf:paper``), greedy L1 with and without distillation, all at 40 % PFR, and
the default msf row's equal-MAC rivals: the greedy rows at ``--rival-pfrs`` (0.28 and 0.29: uniform
shares save 1.89x and 2.01x of resnet20_cifar's MACs there, under the 1.98-2.07x (mean 2.03x) of
msf's learned counts at 40 % from this start, so the rival never saves more compute than msf). The
paper's msf prunes uniform shares, so greedy at 40 % is its equal-MAC rival.

Each budget is v2's grid under its own name (``<out>/cifar10_cpu_v3/cifar10_cpu_v3_r<R>.*`` and
its cells dir), filled R by R, seed by seed, over as many sittings as it takes: rerunning the same
command continues it, and two processes with ``--threads 1`` share it (see v2). After every cell
the budget curve across R is rewritten: ``<out>/cifar10_cpu_v3.{md,json,png}``.

    python benchmarks/cifar10_cpu_v3.py --threads 1 &    # twice on 2 cores
    python benchmarks/cifar10_cpu_v3.py --summary-only   # the curve from the cells so far
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling v2 grid and _report
import cifar10_cpu_v2 as v2  # noqa: E402
from _report import git_commit, write_json, write_png, write_text  # noqa: E402

ROOT = v2.ROOT
ASSETS = os.path.join(ROOT, "benchmarks", "assets")
DEFAULT_MSF = "msf:final_learned_l1init"
PAPER_MSF = "msf:paper"
#: the rows at ``--pfr``; the goal's two (unpruned, msf's defaults) run first at each budget, then the
#: rivals, then the rest, so a budget cut short by a sitting's end answers the goal soonest
GOAL_ROWS = ["baseline", DEFAULT_MSF]
OTHER_ROWS = [PAPER_MSF, "greedy_l1", "greedy_l1:distill"]
ROWS = GOAL_ROWS + OTHER_ROWS
RIVALS = ["greedy_l1", "greedy_l1:distill"]
#: issue 21's goal at the longest budget: msf's defaults within 2.0 pt of the unpruned network, and
#: ahead of the best greedy rule at equal MACs by 1.0 pt, above two standard errors
GOAL_DROP, GOAL_LEAD = 2.0, 1.0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data", "cifar10"))
    p.add_argument("--warm-start", default=os.path.join(ASSETS, "resnet20_cifar_binary_fp.pt"))
    p.add_argument("--teacher", default=os.path.join(ASSETS, "resnet20_cifar_fp.pt"),
                   help="full-precision weights every cell distils from")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"),
                   help="the curve goes to <out>/<name>.*, each budget's grid to <out>/<name>/")
    p.add_argument("--name", default="cifar10_cpu_v3")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "lightning_logs", "cifar10_cpu_v3"), help="cells' logs")
    p.add_argument("--budgets", type=int, nargs="+", default=[700, 3900], help="R: steps per cell, filled in order")
    p.add_argument("--pfr", type=float, default=0.4)
    p.add_argument("--rival-pfrs", type=float, nargs="+", default=[0.28, 0.29],
                   help="the greedy rows that answer msf's learned counts (add a lower one if msf saves fewer MACs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--summary-only", action="store_true", help="train nothing: rewrite the curve from the cells")
    p.add_argument("--subset-train", type=int, default=None, help="tests")
    p.add_argument("--subset-test", type=int, default=None, help="tests")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not args.summary_only:
        for flag, path in (("--warm-start", args.warm_start), ("--teacher", args.teacher)):
            if not os.path.isfile(path):
                p.error(f"{flag}: no file {path!r} (benchmarks/warm_start.py writes it; see benchmarks/README.md)")
    if any(r < 1 for r in args.budgets):
        p.error(f"--budgets must be >= 1 step, got {args.budgets}")
    return args


def budget_name(args: argparse.Namespace, steps: int) -> str:
    return f"{args.name}_r{steps}"


def grid_argv(args: argparse.Namespace, steps: int, strategies: List[str], pfr: float) -> List[str]:
    """The v2 command of one budget's rows at one PFR (what each of its cells records)."""
    rel = os.path.relpath  # the cells record the command: paths as typed from here, not this machine's
    argv = ["--data-dir", rel(args.data_dir), "--warm-start", rel(args.warm_start), "--teacher", rel(args.teacher),
            "--distill-teacher", "full_precision", "--out", rel(os.path.join(args.out, args.name)),
            "--name", budget_name(args, steps), "--work-dir", rel(os.path.join(args.work_dir, f"r{steps}")),
            "--steps", str(steps), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
            "--pfrs", str(pfr), "--seeds", *map(str, args.seeds), "--strategies", *strategies]
    for flag in ("subset_train", "subset_test"):
        if getattr(args, flag) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return argv


def budget_summary(args: argparse.Namespace, steps: int) -> Optional[Dict[str, Any]]:
    path = os.path.join(args.out, args.name, budget_name(args, steps) + ".json")
    return json.load(open(path)) if os.path.isfile(path) else None


def row_of(summary: Dict[str, Any], strategy: str, pfr: Optional[float]) -> Optional[Dict[str, Any]]:
    return summary["rows"].get(f"{strategy}@{pfr}")


def curve(args: argparse.Namespace) -> Dict[str, Any]:
    """Per budget: each row's mean +- std, its drop against the unpruned network, the paper's msf
    against the default, and the default against its best greedy rival at equal MACs."""
    budgets = []
    for steps in args.budgets:
        s = budget_summary(args, steps)
        if s is None:
            continue
        base = row_of(s, "baseline", None)
        rows = {}
        for key, r in s["rows"].items():
            drop = base["mean"] - r["mean"] if base and r["strategy"] != "baseline" else None
            rows[key] = {k: r.get(k) for k in ("strategy", "target_pfr", "mean", "std", "n", "values", "pfr",
                                                "mac_ratio", "compression")} | {"drop_vs_unpruned": drop}
        default, paper = row_of(s, DEFAULT_MSF, args.pfr), row_of(s, PAPER_MSF, args.pfr)
        paper_vs_default = None
        if default and paper:
            diff, se = v2.diff_se(paper["values"], default["values"])
            paper_vs_default = {"diff": diff, "se": se, "n": [paper["n"], default["n"]]}
        rival = next((c for c in s.get("equal_macs", []) if c["msf"] == f"{DEFAULT_MSF}@{args.pfr}"), None)
        budgets.append({"steps": steps, "cells_done": s["cells_done"], "cells_wall_s": s["cells_wall_s"],
                        "cell_commands": s["cell_commands"], "rows": rows, "paper_vs_default": paper_vs_default,
                        "default_vs_rival": rival, "warm_start": s["warm_start"]})
    goal = None
    if budgets and budgets[-1]["steps"] == max(args.budgets):
        last = budgets[-1]
        default = last["rows"].get(f"{DEFAULT_MSF}@{args.pfr}")
        rival = last["default_vs_rival"]
        drop = default and default["drop_vs_unpruned"]
        rivals_run = any(r["strategy"] in RIVALS and r["target_pfr"] in args.rival_pfrs for r in last["rows"].values())
        goal = {"steps": last["steps"], "drop": drop, "drop_met": drop is not None and drop <= GOAL_DROP,
                "lead": rival and rival["diff"], "lead_se": rival and rival["se"], "rivals_run": rivals_run,
                "lead_met": bool(rival) and rival["diff"] >= GOAL_LEAD and rival["diff"] > 2 * rival["se"]}
    return {"command": " ".join(shlex.quote(a) for a in ["python", os.path.relpath(__file__, ROOT), *args.argv]),
            "commit": git_commit(), "written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(), "pfr": args.pfr, "planned_budgets": args.budgets,
            "rival_pfrs": args.rival_pfrs, "teacher": args.teacher, "budgets": budgets, "goal": goal}


def markdown(c: Dict[str, Any]) -> str:
    num = v2.num
    strategies = sorted({(r["strategy"], r["target_pfr"]) for b in c["budgets"] for r in b["rows"].values()},
                        key=lambda sp: (sp[1] is not None, -(sp[1] or 0), sp[0]))
    start = c["budgets"][0]["warm_start"] if c["budgets"] else {}
    lines = ["# CIFAR-10 pruning benchmark, protocol v3: a budget curve from the full-precision start", "",
             f"Written by `{c['command']}` at `{c['commit']}`, {c['cpus']} CPUs, {c['written']}  ",
             f"Start: `{start.get('path', '?')}` (binary, test top-1 "
             f"{num(start.get('test_acc'), '.4f')}); every cell distils from the full-precision network "
             f"`{os.path.relpath(c['teacher'], ROOT)}` through its fit, and the distilling strategies' retraining "
             "from it too. Each budget's grid, its cells' commands and commits: "
             f"`benchmarks/results/cifar10_cpu_v3/` (per-budget `.md`).", ""]
    if not c["budgets"]:
        return "\n".join(lines + ["No cell has finished yet."]) + "\n"
    head = " | ".join(f"R = {b['steps']} ({b['cells_done']} cells)" for b in c["budgets"])
    lines += ["Test top-1 (%), mean +- std over seeds (seeds), and the drop against the unpruned network "
              "trained the same R steps:", "",
              f"| strategy | target PFR | MAC ratio | {head} |", "|---|---|---|" + "---|" * len(c["budgets"])]
    for strategy, pfr in strategies:
        cells, macs = [], []  # msf's learned counts, hence its MAC ratio, can differ per budget
        for b in c["budgets"]:
            r = b["rows"].get(f"{strategy}@{pfr}")
            if r is None:
                cells.append("-")
                continue
            if r.get("mac_ratio") and f"{r['mac_ratio']:.2f}x" not in macs:
                macs.append(f"{r['mac_ratio']:.2f}x")
            drop = "" if r["drop_vs_unpruned"] is None else f", drop {num(r['drop_vs_unpruned'])}"
            cells.append(f"{num(r['mean'])} +- {num(r['std'])} ({r['n']}){drop}")
        lines.append(f"| {strategy} | {'-' if pfr is None else f'{pfr:.2f}'} | "
                     f"{' / '.join(macs) or '-'} | {' | '.join(cells)} |")
    lines += ["", "| R | paper's layer-by-layer msf - msf defaults (pt) | SE | msf defaults - best greedy at "
              "equal MACs (pt) | SE | rival (MAC ratio msf / rival) |", "|---|---|---|---|---|---|"]
    for b in c["budgets"]:
        p, r = b["paper_vs_default"], b["default_vs_rival"]
        rival = "-" if r is None else f"{r['greedy']} ({r['mac_ratio'][0]:.2f}x / {r['mac_ratio'][1]:.2f}x)"
        lines.append(f"| {b['steps']} | {num(p and p['diff'])} | {num(p and p['se'])} | {num(r and r['diff'])} | "
                     f"{num(r and r['se'])} | {rival} |")
    g = c["goal"]
    lines += ["", f"Goal (issue 21), at R = {max(c['planned_budgets'])}: msf's defaults lose <= "
              f"{GOAL_DROP} pt against the unpruned network at {c['pfr']:.0%} PFR, and lead the best greedy rule "
              f"at equal MACs by >= {GOAL_LEAD} pt, above two standard errors.", ""]
    if g is None:
        lines.append("Not measured yet: the longest budget has no finished cells.")
    else:
        def verdict(value: Optional[float], met: bool, why_none: str) -> str:
            return f"**{'met' if met else 'missed'}**" if value is not None else why_none

        at = f"R = {g['steps']}"
        no_lead = ("**missed** (no greedy row saves as few MACs as msf's: add one with `--rival-pfrs`)"
                   if g.get("rivals_run") else f"not measured yet (no equal-MAC rival has finished at {at})")
        lines += [f"- drop against the unpruned network: {num(g['drop'])} pt: "
                  + verdict(g["drop"], g["drop_met"], f"not measured yet (its rows at {at} are unfinished)"),
                  f"- lead at equal MACs: {num(g['lead'])} pt (SE {num(g['lead_se'])}): "
                  + verdict(g["lead"], g["lead_met"], no_lead)]
    lines += ["", f"Cells' wall time: {sum(b['cells_wall_s'] for b in c['budgets']) / 60:.0f} min in all."]
    return "\n".join(lines) + "\n"


def write_plot(path: str, c: Dict[str, Any]) -> None:
    """Test top-1 against R per row (mean, std as error bar), the unpruned network dashed; and
    each pruned row's drop against it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, drop_ax) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({k for b in c["budgets"] for k in b["rows"]})
    for key in keys:
        pts = [(b["steps"], b["rows"][key]) for b in c["budgets"] if key in b["rows"]]
        xs = [s for s, _ in pts]
        base = key.startswith("baseline")
        style = dict(ls="--" if base else "-", marker="s" if "greedy" in key else "o", capsize=3, label=key)
        acc_ax.errorbar(xs, [r["mean"] for _, r in pts],
                        yerr=[0 if math.isnan(r["std"]) else r["std"] for _, r in pts], **style)
        if not base:
            drop_ax.plot(xs, [r["drop_vs_unpruned"] for _, r in pts], marker=style["marker"], label=key)
    for ax in (acc_ax, drop_ax):
        ax.set_xscale("log")
        ax.set_xticks([b["steps"] for b in c["budgets"]], [str(b["steps"]) for b in c["budgets"]])
        ax.set_xlabel("R: steps of training per cell")
    drop_ax.axhline(GOAL_DROP, color="tab:red", lw=0.8, ls=":", label=f"goal: drop <= {GOAL_DROP} pt")
    acc_ax.set_ylabel("CIFAR-10 test top-1 (%)")
    drop_ax.set_ylabel("drop against the unpruned network (pt)")
    acc_ax.legend(fontsize=7)
    drop_ax.legend(fontsize=7)
    fig.tight_layout()
    write_png(path, fig)
    plt.close(fig)


def write_curve(args: argparse.Namespace) -> Dict[str, Any]:
    c = curve(args)
    write_json(os.path.join(args.out, args.name + ".json"), c)
    write_text(os.path.join(args.out, args.name + ".md"), markdown(c))
    write_plot(os.path.join(args.out, args.name + ".png"), c)
    return c


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    os.makedirs(os.path.join(args.out, args.name), exist_ok=True)
    ran = 0
    if not args.summary_only:
        for steps in args.budgets:
            order = [(GOAL_ROWS, args.pfr)] + [(RIVALS, p) for p in args.rival_pfrs] + [(OTHER_ROWS, args.pfr)]
            for strategies, pfr in order:
                ran += v2.main(grid_argv(args, steps, strategies, pfr))["ran"]
                write_curve(args)
    return {"ran": ran, **write_curve(args)}


if __name__ == "__main__":
    main()
