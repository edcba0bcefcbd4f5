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
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, NamedTuple, Optional, Sequence

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from lightning_bnnprune.config import RECIPE_GROUP, ConfigError, conf_dir, register_recipes

# torch, timm and Lightning load only when a run starts (in `build`): printing a config
# (`--cfg job`) or reporting a configuration mistake answers in about a second.
if TYPE_CHECKING:
    from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
    from lightning.pytorch.loggers import Logger

__all__ = ["BuildError", "Run", "build", "config_mistake", "train", "main", "one_line_error"]

CONFIG_NAME = "train"
GROUPS = ("data", "model", "binarize", "prune", "callbacks", "logger", "trainer", "recipe")


# ---------------------------------------------------------------------------------------- build
class BuildError(InstantiationException):
    """An object of the config could not be built; ``key`` names it in the config (``prune``,
    ``callbacks.model_checkpoint``), the cause is the error its constructor raised."""

    def __init__(self, key: str, cause: BaseException) -> None:
        super().__init__(f"{key}: {type(cause).__name__}: {cause}")
        self.key = key


@contextmanager
def _building(key: str) -> Iterator[None]:
    """Name the config key of whatever fails to build inside (missing values name themselves)."""
    try:
        yield
    except (OmegaConfBaseException, ConfigError):
        raise
    except Exception as err:  # noqa: BLE001  (a constructor's own error, or Hydra's wrapper of it)
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ is not None else err
        raise BuildError(key, cause) from cause


def _instantiate_dict(group: str, cfg: Optional[DictConfig]) -> List[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-configs group (callbacks, logger)."""
    built = []
    for name, node in (cfg or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            with _building(f"{group}.{name}"):
                built.append(instantiate(node, _convert_="all"))
    return built


def _instantiate_one(group: str, cfg: Optional[DictConfig]) -> Optional[Any]:
    """Instantiate a one-object group (binarize, prune); an empty option (``none``) gives None."""
    if not cfg or "_target_" not in cfg:
        return None
    with _building(group):
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

    with _building("data"):
        datamodule: LightningDataModule = instantiate(cfg.data, _convert_="all")
    num_classes = cfg.model.get("num_classes") or datamodule.num_classes
    with _building("model"):
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
    with _building("trainer"):
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
        exposes them, the run folder and the wall time. Rank zero also prints it and writes it
        to ``<paths.output_dir>/summary.json``.
    """
    if cfg.get("export") not in EXPORTS:
        raise ConfigError(f"`export` must be one of: null, {', '.join(e for e in EXPORTS if e)}; "
                          f"got {cfg.get('export')!r}")
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
        summary["exported_model"] = exported
    _report(summary, Path(str(cfg.paths.output_dir)))
    return summary


def _interrupted(cfg: DictConfig, run: Run, stop: SystemExit) -> None:
    """Say where the interrupted run can resume from; exit 130 (SIGINT) or 143 (SIGTERM)."""
    sigterm = type(stop).__name__ == "SIGTERMException"
    output_dir = Path(str(cfg.paths.output_dir))
    last = output_dir / "checkpoints" / "last.ckpt"
    kept = [o for o in _cli_overrides() if not re.match(r"^(hydra\.run\.dir|ckpt_path)=", o)]
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


EXPORTS = (None, "lce")


def _export(cfg: DictConfig, run: Run) -> Optional[str]:
    """``export=lce``: the final (pruned) network as ``model.tflite`` for Larq Compute Engine,
    beside ``pruned.pt`` (else in the run folder), never overwriting (``-v1``... suffixes)."""
    if cfg.get("export") != "lce" or not run.trainer.is_global_zero:
        return None
    from .introspect import find_networks
    from .callbacks.base import FilterPruning
    from .pruning.export_lce import export_lce

    prune = run.prune if isinstance(run.prune, FilterPruning) else None
    net = prune.network_of(run.model) if prune is not None else run.model.get_submodule(find_networks(run.model)[0])
    pruned_path = getattr(prune, "pruned_path", None)
    folder = os.path.dirname(pruned_path) if pruned_path else str(cfg.paths.output_dir)
    os.makedirs(folder, exist_ok=True)
    path = FilterPruning._free_stems(folder, {"model": [".tflite"]})["model"] + ".tflite"
    run.datamodule.setup("test")
    images = next(iter(run.datamodule.test_dataloader()))[0]
    export_lce(net, path, input_size=tuple(images.shape[1:]))
    return path


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
    lines.append(f"  parameters       {summary['parameters']:,}")
    if summary.get("pruned_model"):
        lines.append(f"  pruned model     {summary['pruned_model']}")
    if summary.get("exported_model"):
        lines.append(f"  LCE model        {summary['exported_model']}")
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
        message = None if _FULL_ERROR else one_line_error(err, _cli_overrides())
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
    line = message or _squash(f"{type(err).__name__}: {err}").split("; ")[0]
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


def _options(group: str) -> List[str]:
    """Choices of a config group: the files of ``conf/<group>/`` and what the ConfigStore holds
    under ``group`` (the recipes)."""
    folder = conf_dir() / group
    files = {p.stem for p in folder.glob("*.yaml")} if folder.is_dir() else set()
    try:
        stored = {Path(name).stem for name in ConfigStore.instance().list(group)}
    except (OSError, KeyError, ValueError):  # no such group in the store
        stored = set()
    return sorted(files | stored)


def _cli_overrides() -> List[str]:
    """The ``key=value`` arguments of the command line (Hydra's flags left out)."""
    takes_value = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
                   "--package", "-p", "--info", "-i", "--experimental-rerun"}
    out, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in takes_value:
            skip = arg not in ("--info", "-i")
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def _compose(overrides: Sequence[str]) -> Optional[DictConfig]:
    """``conf/train.yaml`` composed with ``overrides``, or None if that fails too."""
    from hydra import compose, initialize_config_dir

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(CONFIG_NAME, overrides=list(overrides))
    except Exception:  # noqa: BLE001  (the caller falls back to fewer overrides)
        return None
    finally:
        GlobalHydra.instance().clear()


def _values(override: Any) -> List[Optional[str]]:
    """The value(s) an override sets: one, or each of a sweep's."""
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    return [None if override.value() is None else override.get_value_element_as_str()]


def config_mistake(overrides: Sequence[str]) -> Optional[str]:
    """The first command-line override that the config cannot take, as a one-line message (None
    when every one fits, or when they do not parse: Hydra's own parse error says it then).

    Found from the structure, not from Hydra's wording: a group override (``model=nope``, also
    in a sweep ``binarize=xnor,nope``) against the group's choices (:func:`_options`), a key
    override (``trainer.max_epoch=3``) against the config the valid overrides compose.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    except Exception:  # noqa: BLE001
        return None
    groups = {o.key_or_group for o in parsed if _options(o.key_or_group)}
    for o in parsed:
        if o.key_or_group not in groups or o.is_delete():
            continue
        choices = _options(o.key_or_group)
        for value in _values(o):
            if value is not None and value not in choices:
                kind = "recipe" if o.key_or_group == RECIPE_GROUP else f"{o.key_or_group} option"
                return f"unknown {kind} '{value}'; choose one of: {', '.join(choices)}"
    keys = [o for o in parsed if o.key_or_group not in groups and not (o.is_add() or o.is_force_add())
            and o.key_or_group.split(".")[0].split("/")[0] != "hydra"]  # Hydra's own config is not composed here
    if not keys:
        return None
    grouped = [o.input_line for o in parsed if o.key_or_group in groups or o.is_add() or o.is_force_add()]
    cfg = _compose(grouped) or _compose([])
    for o in keys:
        if cfg is None or OmegaConf.select(cfg, o.key_or_group, default=_MISSING) is not _MISSING:
            continue
        parent, _, _ = o.key_or_group.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        names = sorted(str(k) for k in node.keys() if not str(k).startswith("_")) if isinstance(node, DictConfig) else []
        where = f"keys of {parent}" if parent else "top-level keys"
        listed = f"{where}: {', '.join(names)}" if names else f"{parent or 'the config'} has no keys here"
        config_groups = [g for g in GROUPS if g not in names] if not parent else []
        listed += f"; config groups: {', '.join(config_groups)}" if config_groups else ""
        hint = f"; to add a new key use +{o.input_line}" if not o.is_delete() else ""
        return f"unknown key '{o.key_or_group}'; {listed}{hint}"
    return None


_MISSING = object()

#: How the app spells the lengths and trainer arguments that a strategy's schedule message names.
_APP_KEYS = {"max_steps": "trainer.max_steps", "max_epochs": "trainer.max_epochs", "warmup": "schedule.warmup",
             "selector": "schedule.selector", "retrain": "schedule.retrain"}


def one_line_error(err: BaseException, overrides: Optional[Sequence[str]] = None) -> Optional[str]:
    """The one-line message for a configuration mistake, or None for anything else.

    ``overrides`` (the command line's ``key=value`` arguments) are checked against the config
    groups and the composed config (:func:`config_mistake`) when Hydra could not compose them;
    an unknown key's message lists the keys of the config the other overrides compose.

    Covers unknown config-group options and recipes (listing the choices), unknown keys (listing
    the keys that exist there), override syntax, missing mandatory values, errors raised while
    building the configured objects (``build`` names the config key), a run folder that already
    holds results, a strategy's schedule that the trainer cannot hold (in the app's keys), and
    Lightning's ``MisconfigurationException`` / a missing file raised by a callback or datamodule.
    """
    if isinstance(err, BuildError):
        cause = err.__cause__
        if isinstance(cause, OmegaConfBaseException):
            return one_line_error(cause, overrides)
        return _squash(f"{err.key}: {type(cause).__name__}: {cause}") + " (HYDRA_FULL_ERROR=1 for the traceback)"
    if isinstance(err, CompactHydraException):
        mistake = config_mistake(overrides or ())
        return mistake if mistake is not None else _squash(_first_paragraph(str(err)))
    if isinstance(err, OmegaConfBaseException):
        if isinstance(err, MissingMandatoryValue) and err.full_key:
            return f"Missing mandatory value: {err.full_key}; set it on the command line: {err.full_key}=..."
        return _squash(_first_paragraph(str(err)) or type(err).__name__)
    schedule = getattr(err, "schedule", None)
    if _is_misconfiguration(err) and callable(getattr(schedule, "message", None)):
        return _squash(schedule.message(lambda key: _APP_KEYS.get(key, key)))
    if _is_misconfiguration(err) or isinstance(err, FileNotFoundError):
        return _squash(f"{type(err).__name__}: {err}") + " (HYDRA_FULL_ERROR=1 for the traceback)"
    return None


def _first_paragraph(text: str) -> str:
    """A message up to its first blank line (the rest of Hydra's reports is the search path)."""
    return text.strip().split("\n\n")[0]


def _is_misconfiguration(err: BaseException) -> bool:
    """Lightning's ``MisconfigurationException`` (by name: Lightning may not be imported yet)."""
    return any(c.__name__ == "MisconfigurationException" for c in type(err).__mro__)


def _squash(text: str) -> str:
    """Join the lines of a message into one."""
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


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
        message = None if _FULL_ERROR else one_line_error(err, _cli_overrides())
        if message is None:
            raise
        _remove_unused_sweep_dir()
        sys.stderr.write(f"bnnprune: error: {message}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
