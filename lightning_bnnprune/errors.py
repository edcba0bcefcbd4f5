"""The ``bnnprune`` app's configuration mistakes, each reduced to one line.

Found from the structure, never by reading Hydra's wording: the command line's overrides are
parsed with Hydra's override parser and checked against the config groups (the files of
``conf/<group>/`` and what the ConfigStore holds, the recipes) and against the config that the
valid overrides compose (:func:`config_mistake`); an object that fails to build is named by the
config key :func:`building` wrapped it in (:class:`BuildError`); a strategy's schedule that the
trainer cannot hold keeps its figures and is restated in the app's keys. Like
:mod:`~lightning_bnnprune.config`, this module loads neither torch nor Lightning, so a mistake
is reported in about a second.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import CompactHydraException, InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from lightning_bnnprune.config import CONFIG_NAME, GROUPS, RECIPE_GROUP, ConfigError, conf_dir
from lightning_bnnprune.torch_files import UnreadableFileError

__all__ = ["BuildError", "building", "cli_overrides", "config_mistake", "one_line_error", "squash"]


class BuildError(InstantiationException):
    """An object of the config could not be built; ``key`` names it in the config (``prune``,
    ``callbacks.model_checkpoint``), the cause is the error its constructor raised."""

    def __init__(self, key: str, cause: BaseException) -> None:
        super().__init__(f"{key}: {type(cause).__name__}: {cause}")
        self.key = key


@contextmanager
def building(key: str) -> Iterator[None]:
    """Name the config key of whatever fails to build inside (missing values name themselves)."""
    try:
        yield
    except (OmegaConfBaseException, ConfigError):
        raise
    except Exception as err:  # noqa: BLE001  (a constructor's own error, or Hydra's wrapper of it)
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ is not None else err
        raise BuildError(key, cause) from cause


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


def cli_overrides() -> List[str]:
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
    building the configured objects (``build`` names the config key), a ``ckpt_path`` that is
    truncated or not a checkpoint, a run folder that already holds results, a strategy's schedule
    that the trainer cannot hold (in the app's keys), and Lightning's
    ``MisconfigurationException`` / a missing file raised by a callback or datamodule.
    """
    if isinstance(err, BuildError):
        cause = err.__cause__
        if isinstance(cause, OmegaConfBaseException):
            return one_line_error(cause, overrides)
        if isinstance(cause, UnreadableFileError):  # says all there is: no traceback to offer
            return squash(f"{err.key}: {cause}")
        return squash(f"{err.key}: {type(cause).__name__}: {cause}") + " (HYDRA_FULL_ERROR=1 for the traceback)"
    if isinstance(err, CompactHydraException):
        mistake = config_mistake(overrides or ())
        return mistake if mistake is not None else squash(_first_paragraph(str(err)))
    if isinstance(err, OmegaConfBaseException):
        if isinstance(err, MissingMandatoryValue) and err.full_key:
            return f"Missing mandatory value: {err.full_key}; set it on the command line: {err.full_key}=..."
        return squash(_first_paragraph(str(err)) or type(err).__name__)
    schedule = getattr(err, "schedule", None)
    if _is_misconfiguration(err) and callable(getattr(schedule, "message", None)):
        return squash(schedule.message(lambda key: _APP_KEYS.get(key, key)))
    if _is_misconfiguration(err) or isinstance(err, FileNotFoundError):
        return squash(f"{type(err).__name__}: {err}") + " (HYDRA_FULL_ERROR=1 for the traceback)"
    return None


def _first_paragraph(text: str) -> str:
    """A message up to its first blank line (the rest of Hydra's reports is the search path)."""
    return text.strip().split("\n\n")[0]


def _is_misconfiguration(err: BaseException) -> bool:
    """Lightning's ``MisconfigurationException`` (by name: Lightning may not be imported yet)."""
    return any(c.__name__ == "MisconfigurationException" for c in type(err).__mro__)


def squash(text: str) -> str:
    """Join the lines of a message into one."""
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())
