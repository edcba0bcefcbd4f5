"""The ``bnnprune`` app: train, binarise and prune an image classifier from Hydra configs.

``bnnprune`` (or ``python -m lightning_bnnprune.train``) composes ``conf/train.yaml`` with the
command line, then: seeds everything, builds the datamodule, the model (sized from the
datamodule's classes), the callbacks (``binarize``, ``prune`` and the ``callbacks`` group), the
loggers and the Trainer; fits (resuming from ``ckpt_path`` if given); tests the final model; and
prints a short summary, also written as ``summary.json`` in Hydra's run folder.

Examples::

    bnnprune                                       # the quickstart (digits, binary ResNet-20)
    bnnprune model=vgg11_cifar trainer.max_epochs=2
    bnnprune recipe=digits_quick                   # a whole experiment from recipes/
    bnnprune -m binarize=xnor,bireal               # a sweep, one run folder per job
    bnnprune --cfg job                             # print the composed config

Configuration mistakes (an unknown recipe, group option or key, a missing value, a bad argument
to a callback) end with one line ``bnnprune: error: ...`` on stderr and exit status 2; set
``HYDRA_FULL_ERROR=1`` for Hydra's own report and the traceback.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, NamedTuple, Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_bnnprune import export_targets
from lightning_bnnprune.config import CONFIG_NAME, GROUPS, ConfigError, conf_dir, register_recipes
from lightning_bnnprune.errors import building, cli_overrides, one_line_error, squash

# torch, timm and Lightning load only when a run starts (in `build`): printing a config
# (`--cfg job`) or reporting a configuration mistake answers in about a second.
if TYPE_CHECKING:
    from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
    from lightning.pytorch.loggers import Logger

# How a configuration mistake becomes one line: lightning_bnnprune.errors.
__all__ = ["Run", "build", "train", "main"]



# ---------------------------------------------------------------------------------------- build
def _instantiate_dict(group: str, cfg: Optional[DictConfig]) -> List[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, logger)."""
    built = []
    for name, node in (cfg or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            with building(f"{group}.{name}"):
                built.append(instantiate(node, _convert_="all"))
    return built


def _instantiate_one(group: str, cfg: Optional[DictConfig]) -> Optional[Any]:
    """Instantiate a one-object group (binarize, prune); an empty option (``none``) gives None."""
    if not cfg or "_target_" not in cfg:
        return None
    with building(group):
        return instantiate(cfg, _convert_="all")


def _pruning_summary(callbacks: Sequence[Callback]) -> Optional[Dict[str, Any]]:
    """The ``summary`` a pruning callback exposes (``pfr``, ``mac_ratio``, ``compression``, ...)."""
    for callback in callbacks:
        summary = getattr(callback, "summary", None)
        if callable(summary):
            summary = summary()
        if isinstance(summary, dict) and summary:
            return {k: _plain(v) for k, v in summary.items()}
    return None


def _plain(value: Any) -> Any:
    """JSON-friendly copy of a metric (tensors and numpy scalars to Python numbers)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Run(NamedTuple):
    """The objects a config describes, ready for ``trainer.fit(model, datamodule)``."""

    datamodule: LightningDataModule
    model: LightningModule
    binarize: Optional[Callback]
    prune: Optional[Callback]
    callbacks: List[Callback]
    loggers: List[Logger]
    trainer: Trainer


def build(cfg: DictConfig) -> Run:
    """Instantiate the datamodule, model (sized from the datamodule), callbacks, loggers, Trainer.

    The model's ``num_classes`` is the datamodule's unless the config sets it. The Trainer gets
    the ``binarize`` and ``prune`` callbacks first (in that order), then the ``callbacks`` group,
    less what the rest of the config turns off and Lightning would refuse: ``LearningRateMonitor``
    without a logger, a progress bar with ``trainer.enable_progress_bar=false``, a checkpoint with
    ``trainer.enable_checkpointing=false``.
    """
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

    with building("data"):
        datamodule: LightningDataModule = instantiate(cfg.data, _convert_="all")
    num_classes = cfg.model.get("num_classes") or datamodule.num_classes
    with building("model"):
        model: LightningModule = instantiate(cfg.model, num_classes=num_classes, _convert_="all")
    binarize = _instantiate_one("binarize", cfg.get("binarize"))
    prune = _instantiate_one("prune", cfg.get("prune"))
    loggers: List[Logger] = _instantiate_dict("logger", cfg.get("logger"))
    callbacks: List[Callback] = [cb for cb in (binarize, prune) if cb is not None]
    for callback in _instantiate_dict("callbacks", cfg.get("callbacks")):
        # Lightning refuses these combinations; `trainer.enable_*=false` or `logger=none` win.
        if isinstance(callback, LearningRateMonitor) and not loggers:
            continue
        if isinstance(callback, ProgressBar) and not cfg.trainer.get("enable_progress_bar", True):
            continue
        if isinstance(callback, ModelCheckpoint) and not cfg.trainer.get("enable_checkpointing", True):
            continue
        callbacks.append(callback)
    with building("trainer"):
        trainer: Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
    return Run(datamodule, model, binarize, prune, callbacks, loggers, trainer)


def train(cfg: DictConfig) -> Dict[str, Any]:
    """Fit (and test) the run ``cfg`` describes; return its summary.

    Args:
        cfg: The composed ``train`` config (``data``, ``model``, ``binarize``, ``prune``,
            ``callbacks``, ``logger``, ``trainer``, ``seed``, ``ckpt_path``, ``test_after_fit``,
            ``paths.output_dir``).

    Returns:
        The summary: test metrics, layers binarised, the pruning figures if a pruning callback
        exposes them, the exported file (``export=<target>``), the run folder and the wall time.
        Rank zero also prints it and writes it to ``<paths.output_dir>/summary.json``.

    Raises:
        ConfigError: for an ``export`` that is not a registered export target.
    """
    if cfg.get("export") is not None and cfg.get("export") not in export_targets.available():
        raise ConfigError(f"`export` must be one of: null, {', '.join(export_targets.available())}; "
                          f"got {cfg.get('export')!r}")
    _check_checkpoint(cfg.get("ckpt_path"))
    from lightning.pytorch import seed_everything

    from lightning_bnnprune import ImageClassifier  # noqa: F401  (the whole library, loaded before the clock)

    start = time.perf_counter()  # from seeding on
    _silence_tips()
    seed_everything(cfg.seed, workers=True)
    run = build(cfg)
    try:
        run.trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SystemExit as stop:  # Lightning's end of a fit interrupted by Ctrl-C (exit 1) or SIGTERM
        _interrupted(cfg, run, stop)
    val_metrics = {k: float(v) for k, v in run.trainer.callback_metrics.items() if k.startswith("val/")}

    test_metrics: Dict[str, float] = {}
    if cfg.get("test_after_fit"):
        # The model as fit left it (pruned, if a strategy pruned it), not a "best" checkpoint.
        results = run.trainer.test(run.model, datamodule=run.datamodule, verbose=False)
        test_metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}

    exported = _export(cfg, run)
    summary = _summary(cfg, run, {**val_metrics, **test_metrics}, time.perf_counter() - start)
    if exported:
        summary["export"], summary["exported_model"] = cfg.export, exported
        if cfg.export == "lce":  # beside the MAC ratio: what LCE's interpreter makes of it
            summary.update(_lce_latency(exported))
    _report(summary, Path(str(cfg.paths.output_dir)))
    return summary


def _check_checkpoint(ckpt_path: Optional[str]) -> None:
    """A local ``ckpt_path`` cut short (or not a checkpoint) is a one-line mistake, found before
    the training stack loads; a missing one is Lightning's (``FileNotFoundError``), and ``last``,
    ``hpc``, ``best`` or a remote URL are Lightning's to resolve."""
    from lightning_bnnprune.torch_files import check_torch_file

    if ckpt_path and os.path.isfile(str(ckpt_path)):
        with building("ckpt_path"):
            check_torch_file(str(ckpt_path), "checkpoint")


def _interrupted(cfg: DictConfig, run: Run, stop: SystemExit) -> None:
    """Say where the interrupted run can resume from; exit 130 (SIGINT) or 143 (SIGTERM)."""
    sigterm = type(stop).__name__ == "SIGTERMException"
    output_dir = Path(str(cfg.paths.output_dir))
    last = output_dir / "checkpoints" / "last.ckpt"
    kept = [o for o in cli_overrides() if not re.match(r"^(hydra\.run\.dir|ckpt_path)=", o)]
    resume = (f"resume with: bnnprune {' '.join(kept + [f'hydra.run.dir={output_dir}', f'ckpt_path={last}'])}"
              if last.is_file() else "no checkpoint was written yet")
    sys.stderr.write(f"bnnprune: interrupted by {'SIGTERM' if sigterm else 'SIGINT'} at step "
                     f"{run.trainer.global_step}; {resume}\n")
    raise SystemExit(143 if sigterm else 130) from stop


class _NoTips(logging.Filter):
    """Drops Lightning's promotional "Tip: ... try installing ..." lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def _silence_tips() -> None:
    """Lightning's messages printed once and plainly, without its "Tip" lines."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if logger.propagate:
            # Lightning loads after Hydra configured logging here, so it would pass its messages
            # to Hydra's handlers (and its own "lightning" one): print them as an early import did.
            logger.addHandler(logging.StreamHandler())
            logger.propagate = False
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


def _summary(cfg: DictConfig, run: Run, metrics: Dict[str, float], wall_time_s: float) -> Dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = next((cb for cb in run.callbacks if isinstance(cb, ModelCheckpoint)), None)
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    summary: Dict[str, Any] = {
        "status": "ok",
        "test_acc": metrics.get("test/acc"),
        "test_acc_top5": metrics.get("test/acc_top5"),
        "test_loss": metrics.get("test/loss"),
        "val_acc": metrics.get("val/acc"),
        "binarized_layers": getattr(run.binarize, "num_swapped", 0),
        "parameters": sum(p.numel() for p in run.model.parameters()),
        "epochs": run.trainer.current_epoch,
        "steps": run.trainer.global_step,
        "pruning": _pruning_summary(run.callbacks),
        "pruned_model": getattr(run.prune, "pruned_path", None),
        "model_name": cfg.model.get("model_name"),
        "choices": {g: choices.get(g) for g in GROUPS if g in choices},
        "seed": cfg.seed,
        "output_dir": str(cfg.paths.output_dir),
        "last_checkpoint": (checkpoint.last_model_path or None) if checkpoint is not None else None,
        "wall_time_s": round(wall_time_s, 1),
    }
    return summary


def _export(cfg: DictConfig, run: Run) -> Optional[str]:
    """``export=<target>``: the final (pruned) network written by that export target
    (:mod:`~lightning_bnnprune.export_targets`) as ``model<suffix>`` beside ``pruned.pt`` (else in
    the run folder), never overwriting (``-v1``... suffixes); the file's path."""
    if cfg.get("export") is None or not run.trainer.is_global_zero:
        return None
    from .introspect import find_networks
    from .callbacks.base import FilterPruning
    from .paths import free_stems

    target = export_targets.get(cfg.export)
    prune = run.prune if isinstance(run.prune, FilterPruning) else None
    net = prune.network_of(run.model) if prune is not None else run.model.get_submodule(find_networks(run.model)[0])
    pruned_path = getattr(prune, "pruned_path", None)
    folder = os.path.dirname(pruned_path) if pruned_path else str(cfg.paths.output_dir)
    os.makedirs(folder, exist_ok=True)
    path = free_stems(folder, {"model": [target.suffix]})["model"] + target.suffix
    run.datamodule.setup("test")
    images = next(iter(run.datamodule.test_dataloader()))[0]
    return target(net, path, tuple(images.shape[1:]), record=getattr(prune, "record", None))


def _lce_latency(path: str) -> Dict[str, Any]:
    """``model.tflite``'s latency in LCE's interpreter: one thread, batch 1, LCE's fast path, a
    short measurement (5 rounds of 3 calls); where LCE cannot run it, why (the run still ends ok)."""
    from .pruning.lce_runtime import lce_latency

    try:
        measured = lce_latency(path, threads=1, rounds=5, calls=3, warmup=2)
    except (RuntimeError, ValueError, ImportError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return {"lce_latency_ms": None, "lce_latency_error": reason}
    return {"lce_latency_ms": round(measured["min_ms"], 3),
            "lce_latency_median_ms": round(measured["median_ms"], 3),
            "lce_kernels": measured["kernels"], "lce_threads": measured["threads"]}


def _report(summary: Dict[str, Any], output_dir: Path) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"bnnprune summary ({path})"]
    if summary["test_acc"] is not None:
        top5 = summary["test_acc_top5"]
        lines.append(
            f"  test accuracy    {100 * summary['test_acc']:.2f} %"
            + (f"  (top-5 {100 * top5:.2f} %)" if top5 is not None else "")
        )
    elif summary["val_acc"] is not None:
        lines.append(f"  val accuracy     {100 * summary['val_acc']:.2f} %  (test_after_fit=false)")
    lines.append(f"  binarised        {summary['binarized_layers']} conv layers ({summary['model_name']})")
    pruning = summary["pruning"]
    if pruning:
        parts = []
        if pruning.get("pfr") is not None:
            parts.append(f"PFR {100 * pruning['pfr']:.1f} %")
        if pruning.get("mac_ratio") is not None:
            parts.append(f"MAC reduction {pruning['mac_ratio']:.2f}x")
        if pruning.get("compression") is not None:
            parts.append(f"compression {pruning['compression']:.1f}x")
        lines.append("  pruned           " + (", ".join(parts) or "yes"))
        if pruning.get("macs_before") and pruning.get("input_size"):
            size = "x".join(str(v) for v in pruning["input_size"])
            lines.append(f"  MACs             {pruning['macs_before'] / 1e6:.1f}M -> {pruning['macs_after'] / 1e6:.1f}M "
                         f"per {size} input")
    if "lce_latency_ms" in summary:  # beside the MAC ratio: what LCE makes of it
        if summary["lce_latency_ms"] is not None:
            lines.append(f"  LCE latency      {summary['lce_latency_ms']:.3f} ms per image (median "
                         f"{summary['lce_latency_median_ms']:.3f} ms), {summary['lce_threads']} thread, "
                         f"{summary['lce_kernels']} kernels, this machine")
        else:
            lines.append(f"  LCE latency      not measured: {summary['lce_latency_error']}")
    lines.append(f"  parameters       {summary['parameters']:,}")
    if summary.get("pruned_model"):
        lines.append(f"  pruned model     {summary['pruned_model']}")
    if summary.get("exported_model"):
        label = export_targets.get(summary["export"]).label
        lines.append(f"  {label:<17}{summary['exported_model']}")
    lines.append(f"  epochs / steps   {summary['epochs']} / {summary['steps']} in {summary['wall_time_s']:.0f} s")
    print("\n".join(lines), flush=True)


# ------------------------------------------------------------------------------ entry point
register_recipes()  # before Hydra composes anything: the `recipe` group lives in the ConfigStore


_FULL_ERROR = False  # the user's own HYDRA_FULL_ERROR=1: show tracebacks, not one-liners


@hydra.main(config_path=str(conf_dir()), config_name=CONFIG_NAME, version_base="1.3")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    try:
        summary = train(cfg)
    except Exception as err:  # noqa: BLE001
        message = None if _FULL_ERROR else one_line_error(err, cli_overrides())
        if _in_sweep():
            # One failed job is a row of the sweep summary (lightning_bnnprune.sweep), not the end
            # of the sweep: its summary.json says why, its log keeps the traceback.
            _job_failed(cfg, err, message)
            return None
        if message is None:
            raise
        _remove_unused_run_dir(Path(str(cfg.paths.output_dir)))
        raise ConfigError(message) from err
    return summary["test_acc"]  # what a sweeper optimises


def _in_sweep() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _job_failed(cfg: DictConfig, err: BaseException, message: Optional[str]) -> None:
    """Record a failed sweep job: ``summary.json`` with ``status: failed`` and the one-line error."""
    line = message or squash(f"{type(err).__name__}: {err}").split("; ")[0]
    logging.getLogger(__name__).error("job failed: %s", line, exc_info=err)
    output_dir = Path(str(cfg.paths.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps({"status": "failed", "error": line, "seed": cfg.seed}, indent=2) + "\n")
    sys.stderr.write(f"bnnprune: error: job {HydraConfig.get().job.num}: {line}\n")


#: What a run folder holds before its run produced anything (removed again after a config error).
_SCAFFOLD = (".hydra", f"{CONFIG_NAME}.log", "multirun.yaml")


def _remove_unused_sweep_dir() -> None:
    """A sweep that a config error ended before its first job leaves only Hydra's
    ``multirun.yaml``: remove that folder (and its parents left empty) too."""
    from lightning_bnnprune import sweep

    if sweep.STARTED is not None and sweep.STARTED.is_dir():
        if {p.name for p in sweep.STARTED.iterdir()} <= {"multirun.yaml"}:
            _remove_unused_run_dir(sweep.STARTED)
        sweep.STARTED = None


def _remove_unused_run_dir(run_dir: Path) -> None:
    """Remove the folder Hydra made for a run that ended in a configuration mistake, if it holds
    nothing but Hydra's scaffold (and empty folders), then its parents that are left empty
    (``outputs/<date>/``), never above the working directory."""
    if not run_dir.is_dir():
        return
    for path in run_dir.rglob("*"):
        top = path.relative_to(run_dir).parts[0]
        if path.is_file() and top not in _SCAFFOLD:
            return
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().resolve()
    parent = run_dir.resolve().parent
    while parent != cwd and cwd in parent.parents and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def main() -> None:
    """Console entry point ``bnnprune``: Hydra's app with one-line configuration errors."""
    global _FULL_ERROR
    _FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Hydra prints its own multi-line report and exits 1 unless HYDRA_FULL_ERROR is set; with it
    # set, the exception reaches us and becomes one line (or a full traceback, if not a config error).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
        from lightning_bnnprune import sweep

        if sweep.LAST is not None and sweep.LAST.failed:  # a sweep with failed jobs: status 1
            sys.stderr.write(f"bnnprune: error: {sweep.LAST.failed} of {sweep.LAST.jobs} jobs failed; "
                             f"see {sweep.LAST.paths['md']}\n")
            sys.exit(1)
    except ConfigError as err:
        _remove_unused_sweep_dir()
        sys.stderr.write(f"bnnprune: error: {err.message}\n")
        sys.exit(2)
    except Exception as err:  # noqa: BLE001
        message = None if _FULL_ERROR else one_line_error(err, cli_overrides())
        if message is None:
            raise
        _remove_unused_sweep_dir()
        sys.stderr.write(f"bnnprune: error: {message}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
