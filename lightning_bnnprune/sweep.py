"""The summary of a ``bnnprune -m`` sweep: one row per job, and accuracy against cost.

A Hydra callback (``hydra.callbacks.sweep_summary`` in ``conf/train.yaml``): at the end of a
multirun it reads every job's ``summary.json`` and ``.hydra/overrides.yaml`` and writes, in the
sweep folder (``multirun/<date>/<time>/``):

- ``sweep_summary.csv`` and ``sweep_summary.md``: per job its overrides, status (``ok`` /
  ``failed``, with the one-line error), test accuracy, PFR, MAC reduction, compression,
  parameters and wall time;
- ``sweep_summary.png``: test accuracy against the MAC reduction and against the compression,
  the best trade-offs (the jobs no other job beats on both accuracy and reduction) marked.

Example::

    bnnprune -m prune=none,msf,greedy_l1 trainer.max_epochs=2
    # ... multirun/2026-11-30/08-00-00/sweep_summary.md
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

__all__ = ["SweepSummary", "SweepResult", "summarize", "pareto_front", "LAST", "COLUMNS"]

COLUMNS = ("job", "overrides", "status", "test_acc", "pfr", "mac_ratio", "compression", "parameters",
           "wall_time_s", "error")


@dataclass
class SweepResult:
    """What :func:`summarize` wrote: the rows, the files, the failed-job count."""

    rows: List[Dict[str, Any]]
    paths: Dict[str, str] = field(default_factory=dict)

    @property
    def jobs(self) -> int:
        return len(self.rows)

    @property
    def failed(self) -> int:
        return sum(row["status"] != "ok" for row in self.rows)


#: The last summary this process wrote (the app's exit status reads its failed-job count).
LAST: Optional[SweepResult] = None
#: The folder of the sweep this process started last (removed again if a config error ends it
#: before any job ran).
STARTED: Optional[Path] = None


def _job_row(job_dir: Path) -> Dict[str, Any]:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
    row: Dict[str, Any] = {k: None for k in COLUMNS}
    row.update(job=int(job_dir.name) if job_dir.name.isdigit() else job_dir.name, overrides=" ".join(overrides))
    summary_file = job_dir / "summary.json"
    if not summary_file.is_file():
        row.update(status="failed", error="no summary.json (the job did not finish)")
        return row
    summary = json.loads(summary_file.read_text())
    pruning = summary.get("pruning") or {}
    row.update(
        status=summary.get("status", "ok"),
        error=summary.get("error"),
        test_acc=summary.get("test_acc"),
        pfr=pruning.get("pfr", 0.0 if summary.get("status", "ok") == "ok" else None),
        mac_ratio=pruning.get("mac_ratio", 1.0 if summary.get("status", "ok") == "ok" else None),
        compression=pruning.get("compression"),
        parameters=summary.get("parameters"),
        wall_time_s=summary.get("wall_time_s"),
    )
    return row


def pareto_front(rows: Sequence[Dict[str, Any]], cost: str = "mac_ratio") -> List[Any]:
    """Jobs of the best trade-offs: no other job has both a higher ``test_acc`` and a higher
    ``cost`` reduction (and is strictly better in one)."""
    done = [r for r in rows if r["status"] == "ok" and r["test_acc"] is not None and r[cost] is not None]
    return [
        r["job"] for r in done
        if not any(o["test_acc"] >= r["test_acc"] and o[cost] >= r[cost]
                   and (o["test_acc"] > r["test_acc"] or o[cost] > r[cost]) for o in done)
    ]


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if kind == "pct":
        return f"{100 * value:.2f}"
    if kind == "x":
        return f"{value:.2f}"
    if kind == "int":
        return f"{value:,}"
    return str(value)


def _markdown(rows: Sequence[Dict[str, Any]], best: Sequence[Any], sweep_dir: Path, common: Sequence[str]) -> str:
    lines = [f"# Sweep summary: {sweep_dir}", "",
             f"{len(rows)} jobs, {sum(r['status'] == 'ok' for r in rows)} ok. "
             "Best trade-offs of test accuracy and MAC reduction: *.",
             f"Every job: {' '.join(common) if common else '(no shared overrides)'}", "",
             "| job | overrides | status | test acc % | PFR % | MAC reduction | compression | parameters | wall s |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error']}"
        mark = " *" if r["job"] in best else ""
        lines.append(
            f"| {r['job']}{mark} | {r['overrides'] or '(defaults)'} | {status.replace('|', '/')} | "
            f"{_fmt(r['test_acc'], 'pct')} | {_fmt(r['pfr'], 'pct')} | {_fmt(r['mac_ratio'], 'x')} | "
            f"{_fmt(r['compression'], 'x')} | {_fmt(r['parameters'], 'int')} | {_fmt(r['wall_time_s'], '')} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: Sequence[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, cost, label in zip(axes[0], ("mac_ratio", "compression"), ("MAC reduction (x)", "compression (x)")):
        done = [r for r in rows if r["status"] == "ok" and r["test_acc"] is not None and r[cost] is not None]
        best = set(pareto_front(rows, cost))
        for r in done:
            on_front = r["job"] in best
            ax.scatter(r[cost], 100 * r["test_acc"], marker="*" if on_front else "o", s=140 if on_front else 40,
                       color="tab:red" if on_front else "tab:blue", zorder=3)
            ax.annotate(r["overrides"] or "(defaults)", (r[cost], 100 * r["test_acc"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
        front = sorted((r for r in done if r["job"] in best), key=lambda r: r[cost])
        if len(front) > 1:
            ax.plot([r[cost] for r in front], [100 * r["test_acc"] for r in front], color="tab:red", lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    failed = sum(r["status"] != "ok" for r in rows)
    fig.suptitle(f"{len(rows)} jobs" + (f" ({failed} failed, not shown)" if failed else "")
                 + "; red stars: best trade-offs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(sweep_dir: Path) -> SweepResult:
    """Write ``sweep_summary.{csv,md,png}`` in ``sweep_dir`` from its job folders."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and (d / ".hydra").is_dir()),
                  key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
    rows = [_job_row(d) for d in jobs]
    # a row shows what its job changed; what every job shares goes once into the markdown header
    split = [r["overrides"].split(" ") if r["overrides"] else [] for r in rows]
    common = [o for o in split[0] if all(o in other for other in split[1:])] if len(rows) > 1 else []
    for r, overrides in zip(rows, split):
        r["overrides"] = " ".join(o for o in overrides if o not in common)
    best = pareto_front(rows)
    paths = {ext: str(sweep_dir / f"sweep_summary.{ext}") for ext in ("csv", "md", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*COLUMNS, "best_tradeoff"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "best_tradeoff": r["job"] in best})
    Path(paths["md"]).write_text(_markdown(rows, best, sweep_dir, common))
    _plot(rows, Path(paths["png"]))
    return SweepResult(rows, paths)


class SweepSummary(HydraCallback):
    """Hydra callback: :func:`summarize` the sweep folder when a multirun ends; prints where."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global STARTED, LAST
        STARTED, LAST = Path(str(config.hydra.sweep.dir)), None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global LAST
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        LAST = summarize(sweep_dir)
        print(f"bnnprune sweep: {LAST.jobs} jobs, {LAST.failed} failed; summary in {LAST.paths['md']}", flush=True)
