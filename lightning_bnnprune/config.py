"""Where the ``bnnprune`` app finds its Hydra configs and recipes, installed or from a checkout.

A built wheel carries ``conf/`` and ``recipes/`` inside the package (``lightning_bnnprune/conf``,
``lightning_bnnprune/recipes``; see ``pyproject.toml``); an editable install or a source checkout
has them at the top of the repository. Recipes are whole experiments (``# @package _global_``
files that ``override`` config groups); they are registered in Hydra's ``ConfigStore`` as the
``recipe`` group, so ``recipe=NAME`` works the same in both layouts without a search-path plugin.

Example::

    from hydra import compose, initialize_config_dir
    from lightning_bnnprune.config import conf_dir, register_recipes

    register_recipes()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=["recipe=digits_quick"])
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Union

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "ConfigError",
    "OutputDirExistsError",
    "RefuseExistingOutputDir",
    "conf_dir",
    "recipe_names",
    "recipes_dir",
    "register_recipes",
]

_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_NAME = "train"  # conf/train.yaml, the app's primary config
#: The app's config groups (``recipe`` lives in the ConfigStore, see :func:`register_recipes`).
GROUPS = ("data", "model", "binarize", "prune", "callbacks", "logger", "trainer", "recipe")
RECIPE_GROUP = "recipe"


def _resource_dir(name: str) -> Path:
    """``<package>/<name>`` in a wheel install, else ``<repository>/<name>`` (editable / source)."""
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no {name}/ folder in {_PACKAGE_DIR} or {_PACKAGE_DIR.parent}; the installation is incomplete"
    )


def conf_dir() -> Path:
    """The folder holding ``train.yaml`` and the config groups."""
    return _resource_dir("conf")


def recipes_dir() -> Path:
    """The folder holding the recipes (``*.yaml``)."""
    return _resource_dir("recipes")


def recipe_names() -> List[str]:
    """The recipe names (file stems in :func:`recipes_dir`), sorted."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def register_recipes(folder: Optional[Union[str, Path]] = None) -> List[str]:
    """Store every recipe file in Hydra's ``ConfigStore`` as ``recipe/<stem>``, package ``_global_``.

    Hydra names config groups after folders of its search path, and the recipes live in
    ``recipes/`` beside (not inside) ``conf/``; the store makes them the ``recipe`` group. A
    recipe's own ``defaults`` list (``- override /data: npz``) is read by Hydra from the stored
    node as from a file. Calling it again re-reads the files.

    Args:
        folder: Where the recipes are; default :func:`recipes_dir`.

    Returns:
        The registered recipe names.

    Raises:
        ValueError: If a recipe file does not declare ``# @package _global_`` (its keys would
            otherwise land under ``recipe.``, silently overriding nothing).
    """
    store = ConfigStore.instance()
    names = []
    for path in sorted(Path(folder or recipes_dir()).glob("*.yaml")):
        text = path.read_text()
        header = []  # Hydra's header: the comment lines before the first key
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                break
            header.append(line.strip().replace(" ", ""))
        if "#@package_global_" not in header:
            raise ValueError(f"{path} must start with '# @package _global_'")
        node = OmegaConf.create(text)
        store.store(group=RECIPE_GROUP, name=path.stem, node=node, package="_global_", provider="lightning_bnnprune")
        names.append(path.stem)
    return names


class ConfigError(SystemExit):
    """A configuration mistake, already reduced to one line (``message``); ends the app.

    A ``SystemExit``, not an ``Exception``: Hydra turns a Hydra callback's exceptions into
    warnings and adds its own stderr line for a job's; a ``SystemExit`` passes through both to
    ``bnnprune``'s entry point, which prints ``bnnprune: error: <message>`` and exits 2. Uncaught,
    Python prints the message and exits 1.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class OutputDirExistsError(ConfigError):
    """A run would write into a folder that already holds results."""


def _keep_sitting_configs(run_dir: Path) -> None:
    """A resumed run continues in its folder, and Hydra writes ``.hydra/`` anew: the earlier
    sitting's configs move to ``.hydra-sitting<k>`` first (the first free ``k``), so they stay."""
    configs = run_dir / ".hydra"
    if not configs.is_dir():
        return
    k = 1
    while (run_dir / f".hydra-sitting{k}").exists():
        k += 1
    configs.rename(run_dir / f".hydra-sitting{k}")


def _is_fresh(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


class RefuseExistingOutputDir(HydraCallback):
    """Hydra callback: never write a run into a folder that already holds results.

    Hydra's default run folders are timestamped, but ``hydra.run.dir=...`` (or two runs started
    in the same second) can point at an existing folder, whose ``.hydra/`` configs, logs and
    checkpoints the new run would overwrite. Resuming is the exception: a run whose ``ckpt_path``
    lies inside the folder continues it there, the earlier sitting's ``.hydra/`` kept as
    ``.hydra-sitting<k>``.

    Processes that Lightning's DDP launcher starts for ranks > 0 re-enter the app with the rank
    zero folder as ``hydra.run.dir``; they are let through.

    Raises:
        OutputDirExistsError: In ``on_run_start`` / ``on_multirun_start``, for a non-empty folder.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
            return
        run_dir = Path(str(config.hydra.run.dir)).resolve()
        if _is_fresh(run_dir):
            return
        ckpt_path = config.get("ckpt_path")
        if ckpt_path in ("last", "hpc") or (ckpt_path and run_dir in Path(str(ckpt_path)).resolve().parents):
            _keep_sitting_configs(run_dir)  # Lightning finds "last"/"hpc" in this run's own checkpoints
            return
        raise OutputDirExistsError(
            f"hydra.run.dir={run_dir} already holds results; choose a new folder, "
            f"or resume from it with ckpt_path=<a checkpoint in it>"
        )

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        if not _is_fresh(sweep_dir):
            raise OutputDirExistsError(
                f"hydra.sweep.dir={sweep_dir} already holds results; choose a new folder"
            )
