"""The Hydra configs: every group option and recipe composes and builds real objects; mistakes
are one-line errors that list the choices; run folders with results are never overwritten."""
from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import timm
import torch
from hydra.utils import get_class
from hydra.errors import ConfigCompositionException, InstantiationException, OverrideParseException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

from lightning_bnnprune import Binarize, FilterPruning, ImageClassifier
from lightning_bnnprune.config import (
    OutputDirExistsError,
    RefuseExistingOutputDir,
    conf_dir,
    recipe_names,
    recipes_dir,
    register_recipes,
)
from lightning_bnnprune.binarize import binarize_model
from lightning_bnnprune.data import ImageDataModule
from lightning_bnnprune.introspect import example_batch
from lightning_bnnprune.pruning.groups import find_channel_groups
from lightning_bnnprune.errors import one_line_error
from lightning_bnnprune.train import build

GROUPS = ("data", "model", "binarize", "prune", "callbacks", "logger", "trainer")
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((conf_dir() / group).glob("*.yaml"))]
PRUNE_CLASSES = {"msf": "MainSubsidiaryPruning", "greedy_l1": "GreedyFilterPruning", "stq": "GreedyFilterPruning",
                 "random": "GreedyFilterPruning", "bdg": "ZeroFilterPruning"}
CRITERIA = {"greedy_l1": "l1", "stq": "binarization_error", "random": "random"}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "npz": 10, "imagefolder": 2, "fake": 10}


def _imagefolder(root: Path) -> Path:
    """Two classes, two 40x40 PNGs each, in train/ and val/."""
    for split in ("train", "val"):
        for label in ("ants", "bees"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 40), color=(40 * i, 100, 200)).save(folder / f"{i}.png")
    return root


def test_resource_folders_hold_the_configs():
    assert (conf_dir() / "train.yaml").is_file()
    assert {"data", "model", "binarize", "prune", "callbacks", "logger", "trainer"} <= {
        p.name for p in conf_dir().iterdir() if p.is_dir()
    }
    assert "digits_quick" in recipe_names()
    assert (recipes_dir() / "digits_quick.yaml").is_file()


def test_defaults_are_the_quickstart(compose_train):
    cfg = compose_train()
    assert cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.model.model_name == "resnet20_cifar"
    assert cfg.binarize.kernel_quantizer == "xnor" and cfg.binarize.input_quantizer == "approx_sign"
    assert list(cfg.binarize.keep_fp) == ["*.downsample.*"]  # Bi-Real Net's full-precision shortcuts
    assert cfg.seed == 0 and cfg.ckpt_path is None and cfg.test_after_fit is True


def test_msf_yaml_is_the_callbacks_defaults_and_msf_paper_the_paper(compose_train):
    """prune=msf and MainSubsidiaryPruning() share the measured configuration (issue 9); the
    paper's layer-by-layer method stays one override away."""
    from lightning_bnnprune import MainSubsidiaryPruning

    options = ("layers_per_stage", "allocation", "layer_floor", "final_retrain")
    chosen = build(compose_train()).prune
    plain = MainSubsidiaryPruning(target_pfr=0.4)
    assert [getattr(chosen, k) for k in options] == [getattr(plain, k) for k in options] == [None, "learned", 0.25, "rest"]
    assert type(chosen.gate_init_criterion).__name__ == type(plain.gate_init_criterion).__name__ == "L1Magnitude"
    paper = build(compose_train(["prune=msf_paper"])).prune
    assert [getattr(paper, k) for k in options] == [1, "uniform", 0.0, 0] and paper.gate_init_criterion is None


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_builds(compose_train, tmp_path, group, option):
    overrides = [f"{group}={option}"]
    if (group, option) == ("model", "timm"):
        overrides.append("model.model_name=test_resnet")
    if (group, option) == ("data", "imagefolder"):
        overrides += [f"data.root={_imagefolder(tmp_path / 'imgs')}", "data.image_size=32", "data.num_workers=0"]
    if (group, option) == ("logger", "tensorboard"):
        pytest.importorskip("tensorboard", reason="logger=tensorboard needs the tensorboard package")
    cfg = compose_train(overrides)
    assert OmegaConf.select(cfg, f"{group}") is not None

    if (group, option) == ("trainer", "gpu") and not torch.cuda.is_available():
        with pytest.raises(InstantiationException, match="No supported gpu backend found") as info:
            build(cfg)
        assert one_line_error(info.value).startswith("trainer: MisconfigurationException: No supported gpu backend")
        return
    run = build(cfg)
    assert isinstance(run.trainer, Trainer)
    assert isinstance(run.datamodule, ImageDataModule)
    assert isinstance(run.model, ImageClassifier)
    assert run.model.hparams.num_classes == run.datamodule.num_classes
    out = run.model(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, run.datamodule.num_classes)

    if group == "data":
        assert run.datamodule.num_classes == NUM_CLASSES[option]
        for key in ("root", "data_dir"):  # real datasets live under paths.data_dir
            if key in cfg.data and option != "imagefolder":
                assert str(cfg.data[key]).startswith(str(tmp_path / "data"))
        if option in ("digits", "fake"):
            run.datamodule.setup("fit")
            x, y = next(iter(run.datamodule.train_dataloader()))
            assert x.shape[1:] == (3, 32, 32) and y.max() < run.datamodule.num_classes
    elif group == "model":
        expected = "test_resnet" if option == "timm" else option
        assert run.model.hparams.model_name == expected
    elif group == "binarize":
        if option == "none":
            assert run.binarize is None and not any(isinstance(c, Binarize) for c in run.trainer.callbacks)
        else:
            assert run.trainer.callbacks[0] is run.binarize
            assert run.binarize.input_quantizer == {"xnor": "ste_sign", "bireal": "approx_sign", "bdg": "ste_sign"}[option]
            assert run.binarize.kernel_quantizer == ("bdg" if option == "bdg" else "xnor")
            run.binarize.setup(run.trainer, run.model, "fit")
            # resnet20_cifar: 19 3x3 convs + 2 projection shortcuts, the stem stays full precision
            # (and with bireal the two shortcuts too)
            assert run.binarize.num_swapped == (18 if option == "bireal" else 20)
    elif group == "prune":
        if option == "none":
            assert run.prune is None
        else:
            assert run.trainer.callbacks[1] is run.prune and isinstance(run.prune, FilterPruning)
            # the library's strategies by name; a new one (docs/extending.md) needs no entry here
            assert type(run.prune).__name__ == PRUNE_CLASSES.get(option, type(run.prune).__name__)
            if option == "bdg":  # the sparse {0, 2 tau} domain comes with it
                assert cfg.binarize.kernel_quantizer == "bdg" and cfg.binarize.kernel_quantizer_kwargs.zero_lower
                assert 0 < cfg.binarize.sparsity < 1
            else:  # the shared schedule node
                assert run.prune.target_pfr == cfg.schedule.target_pfr == 0.4
                if option in PRUNE_CLASSES:  # strategies with a warm-up read it from the schedule node too
                    assert run.prune.warmup == cfg.schedule.warmup and run.prune.unit == cfg.schedule.unit
            if option in CRITERIA:
                assert run.prune.criterion_name == CRITERIA[option]
    elif group == "callbacks":
        kinds = {type(c) for c in run.trainer.callbacks}
        if option == "default":
            assert {ModelCheckpoint, LearningRateMonitor, TQDMProgressBar} <= kinds
            assert run.trainer.checkpoint_callback.dirpath == str(tmp_path / "run" / "checkpoints")
            assert run.trainer.checkpoint_callback.save_last
        else:  # only Lightning's own defaults: a progress bar and a checkpoint in the logger's folder
            assert LearningRateMonitor not in kinds
            assert run.trainer.checkpoint_callback.dirpath is None
    elif group == "logger":
        if option == "none":
            assert run.loggers == [] and run.trainer.logger is None
            assert not any(isinstance(c, LearningRateMonitor) for c in run.trainer.callbacks)
        else:
            assert len(run.loggers) == 1
            assert Path(run.loggers[0].save_dir) == tmp_path / "run"
            if option == "csv":
                assert isinstance(run.trainer.logger, CSVLogger)
    elif group == "trainer":
        assert run.trainer.max_epochs == cfg.trainer.max_epochs
        if option == "ddp":
            assert isinstance(run.trainer.strategy, DDPStrategy) and run.trainer.num_devices == 2
        else:
            assert run.trainer.num_devices == 1


SINGLE_TARGET = [(g, o) for g, o in OPTIONS if g in ("data", "model", "binarize", "prune")]


@pytest.mark.parametrize("group,option", SINGLE_TARGET, ids=[f"{g}={o}" for g, o in SINGLE_TARGET])
def test_every_argument_is_in_the_yaml(compose_train, group, option):
    """One YAML per choice (with the option it inherits from) lists every argument of its target
    (none left to a hidden default)."""
    node = OmegaConf.load(conf_dir() / group / f"{option}.yaml")
    if "defaults" in node:  # the option as composed, with what its defaults list brings
        node = compose_train([f"{group}={option}"])[group]
    if "_target_" not in node:
        assert not node, f"{group}/{option}.yaml has values but no _target_"
        return
    target = get_class(node._target_)
    params = [n for n, p in inspect.signature(target.__init__).parameters.items()
              if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    keys = [k for k in node if k not in ("_target_", "defaults")]
    assert sorted(keys) == sorted(params)


SCHEDULE = "schedule"  # filled from conf/train.yaml's `schedule` node: one budget for every strategy of a sweep
DATA_DIR = "under paths.data_dir, the app's data folder"
CHOSEN_BY_APP = "the app sets it (num_classes from the datamodule)"
MSF_FROM_SCHEDULE = dict.fromkeys(["target_pfr", "target_speedup", "unit", "warmup", "selector", "retrain",
                                   "layers_per_stage", "retrain_lr", "retrain_lr_factor", "distill", "distill_teacher",
                                   "round_to"], SCHEDULE)
GREEDY_FROM_SCHEDULE = dict.fromkeys(["target_pfr", "target_speedup", "unit", "warmup", "distill", "distill_teacher",
                                      "round_to"], SCHEDULE)
SCALED = "the app fits every strategy's schedule into the trainer it builds"
#: Where an option's YAML deliberately differs from its target's default, and why: what makes the
#: option that option, what the app fills in. Every other value must equal the default.
DIFFERS = {
    ("data", "cifar10"): {"root": DATA_DIR, "val_split": "the papers' 5000-image validation split"},
    ("data", "cifar100"): {"root": DATA_DIR, "val_split": "the papers' 5000-image validation split"},
    ("data", "npz"): {"data_dir": DATA_DIR, "val_split": "CIFAR-10's 5000-image validation split"},
    ("data", "imagefolder"): {"root": DATA_DIR, "num_workers": "decoding JPEGs wants workers"},
    ("model", "nin_cifar"): {"model_name": "the option", "num_classes": CHOSEN_BY_APP},
    ("model", "resnet18_cifar"): {"model_name": "the option", "num_classes": CHOSEN_BY_APP},
    ("model", "resnet20_cifar"): {"num_classes": CHOSEN_BY_APP, "lr": "the quickstart's tuned rate"},
    ("model", "vgg11_cifar"): {"model_name": "the option", "num_classes": CHOSEN_BY_APP},
    ("model", "timm"): {"model_name": "mandatory (???): the user names the timm model", "num_classes": CHOSEN_BY_APP},
    ("binarize", "bdg"): {"kernel_quantizer": "the option", "kernel_quantizer_kwargs": "the sparse {0, 2 tau} domain",
                          "sparsity": "BDG's sparsity constraint"},
    ("binarize", "bireal"): {"input_quantizer": "the option", "keep_fp": "Bi-Real Net's full-precision shortcuts"},
    ("prune", "msf"): {**MSF_FROM_SCHEDULE, "scale_to_fit": SCALED},
    ("prune", "msf_paper"): {**MSF_FROM_SCHEDULE, "scale_to_fit": SCALED, "allocation": "the paper's method",
                             "layers_per_stage": "the paper's method", "final_retrain": "the paper's method",
                             "gate_init_criterion": "the paper's method"},
    ("prune", "greedy_l1"): {**GREEDY_FROM_SCHEDULE, "scale_to_fit": SCALED},
    ("prune", "stq"): {**GREEDY_FROM_SCHEDULE, "scale_to_fit": SCALED, "criterion": "the option"},
    ("prune", "bdg"): {"round_to": SCHEDULE},
    ("prune", "random"): {**GREEDY_FROM_SCHEDULE, "scale_to_fit": SCALED, "criterion": "the option"},
}


def _same(value, default) -> bool:
    """A YAML value equals a Python default; empty containers and None are one "nothing"."""
    empty = (None, (), [], {})
    if value in empty and default in empty:
        return True
    return value == (list(default) if isinstance(default, tuple) else default)


@pytest.mark.parametrize("group,option", SINGLE_TARGET, ids=[f"{g}={o}" for g, o in SINGLE_TARGET])
def test_every_yaml_value_is_the_default_or_a_named_exception(compose_train, group, option):
    """A YAML that restates its target's arguments says the same as the Python defaults, except
    where :data:`DIFFERS` names why not (a value the app fills from ``schedule.*`` must be that
    interpolation), so a default changed in one place and not the other fails here."""
    node = OmegaConf.load(conf_dir() / group / f"{option}.yaml")
    if "defaults" in node:
        node = compose_train([f"{group}={option}"])[group]
    if "_target_" not in node:
        return
    raw = OmegaConf.to_container(node, resolve=False)
    params = inspect.signature(get_class(node._target_).__init__).parameters
    exceptions = DIFFERS.get((group, option), {})
    for key, value in raw.items():
        if key in ("_target_", "defaults"):
            continue
        if exceptions.get(key) == SCHEDULE:
            assert value == f"${{schedule.{key}}}", f"{group}/{option}.yaml: {key} should come from schedule.{key}"
        elif key not in exceptions:
            default = params[key].default
            assert default is not inspect.Parameter.empty, f"{group}/{option}.yaml: {key} has no default to compare"
            assert _same(value, default), f"{group}/{option}.yaml: {key}={value!r}, the default is {default!r}"
    assert set(exceptions) <= set(raw), f"DIFFERS names keys {group}/{option}.yaml does not have"


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_composes_and_builds(compose_train, tmp_path, name):
    overrides = [f"recipe={name}"]
    if name == "finetune_timm":  # names the model and its weights file on the command line
        weights = tmp_path / "weights.pt"
        torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), weights)
        overrides += ["model.model_name=test_resnet", f"model.pretrained_file={weights}"]
    cfg = compose_train(overrides)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        # A GPU recipe is built here with a one-CPU trainer; everything else as written.
        cfg = compose_train(overrides + ["trainer=cpu"])
    run = build(cfg)
    assert isinstance(run.trainer, Trainer) and isinstance(run.model, ImageClassifier)
    assert run.model.hparams.num_classes == run.datamodule.num_classes
    if name.startswith("cifar10_"):
        assert run.model.hparams.model_name == cfg.model.model_name and run.datamodule.num_classes == 10
        expected = {"msf": "MainSubsidiaryPruning", "stq": "binarization_error", "greedy": "l1"}
        strategy = name.split("_")[2] if name.count("_") == 2 else "msf"  # the base recipes default to msf
        assert expected[strategy] in (type(run.prune).__name__, getattr(run.prune, "criterion_name", None))


PAPER_MODELS = sorted({n.split("_")[1] for n in recipe_names() if n.startswith("cifar10_")})


@pytest.mark.parametrize("profile", ["", "_cpu_budget"], ids=["gpu", "cpu_budget"])
@pytest.mark.parametrize("model", PAPER_MODELS)
def test_paper_recipes_give_every_strategy_the_same_budget(compose_train, model, profile):
    """A sweep over strategies compares them fairly: one trainer length, one warm-up, one target;
    and msf's layer-by-layer schedule fits the trainer as written (no silent scaling)."""
    overrides = [f"recipe=cifar10_{model}{profile}", "trainer.accelerator=cpu"]  # builds without a GPU
    runs = {p: build(compose_train(overrides + [f"prune={p}"])) for p in ("msf", "greedy_l1", "stq", "random")}
    lengths = {p: (r.trainer.max_epochs, r.trainer.max_steps) for p, r in runs.items()}
    assert len(set(lengths.values())) == 1, lengths
    assert len({(r.prune.warmup, r.prune.unit, r.prune.target_pfr) for r in runs.values()}) == 1
    msf = runs["msf"].prune
    net = runs["msf"].model.net
    binarize_model(net)
    groups = len(find_channel_groups(net, example_batch(net)).groups)
    needed = msf.warmup + math.ceil(groups / msf.layers_per_stage) * (msf.selector + msf.retrain)
    max_epochs, max_steps = lengths["msf"]
    available = max_steps if msf.unit == "steps" else max_epochs
    assert needed <= available <= needed + 10, (needed, available)


def test_recipe_overrides_groups_and_command_line_wins(compose_train):
    cfg = compose_train(["recipe=digits_quick", "trainer.max_epochs=2", "model=vgg11_cifar"])
    assert cfg.data._target_.endswith("DigitsDataModule")  # from the recipe's defaults
    assert cfg.trainer.max_epochs == 2  # the command line beats the recipe's value
    assert cfg.model.model_name == "vgg11_cifar"  # and its group choice


def test_recipe_without_global_package_is_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text("defaults:\n  - override /data: fake\n")
    with pytest.raises(ValueError, match=r"bad\.yaml must start with '# @package _global_'"):
        register_recipes(tmp_path)


@pytest.mark.parametrize(
    "override,exception,message",
    [
        ("recipe=nope", ConfigCompositionException, r"^unknown recipe 'nope'; choose one of: .*digits_quick"),
        ("model=nope", ConfigCompositionException,
         r"^unknown model option 'nope'; choose one of: nin_cifar, resnet18_cifar, resnet20_cifar, timm, vgg11_cifar$"),
        ("data=nope", ConfigCompositionException, r"^unknown data option 'nope'; choose one of: cifar10, cifar100, digits"),
        ("foo=1", ConfigCompositionException,
         r"^unknown key 'foo'; top-level keys: .*ckpt_path.*seed.*trainer.*; to add a new key use \+foo=1$"),
        ("trainer.max_epoch=3", ConfigCompositionException,
         r"^unknown key 'trainer.max_epoch'; keys of trainer: .*max_epochs.*; to add a new key use"),
        ("seed", OverrideParseException, r"^Error parsing override 'seed'"),
    ],
)
def test_mistakes_become_one_line_errors_with_choices(compose_train, override, exception, message):
    with pytest.raises(exception) as info:
        compose_train([override])
    line = one_line_error(info.value, [override])
    assert line is not None and "\n" not in line
    assert re.search(message, line), line


def test_mistakes_are_found_from_the_config_structure_not_from_hydras_words(compose_train):
    reworded = ConfigCompositionException("a message a future Hydra words differently\n\nConfig search path: ...")
    assert one_line_error(reworded, ["model=nope"]).startswith("unknown model option 'nope'; choose one of: nin_cifar")
    assert one_line_error(reworded, ["-m", "binarize=xnor,nope"]).startswith("unknown binarize option 'nope'")
    assert one_line_error(reworded, ["seed=1", "trainer.max_epoch=3"]).startswith(
        "unknown key 'trainer.max_epoch'; keys of trainer: ")
    assert one_line_error(reworded, ["+foo=1", "hydra.run.dir=x"]) == "a message a future Hydra words differently"


def test_missing_timm_name_is_one_line(compose_train):
    cfg = compose_train(["model=timm"])
    with pytest.raises(MissingMandatoryValue) as info:
        build(cfg)
    assert one_line_error(info.value) == (
        "Missing mandatory value: model.model_name; set it on the command line: model.model_name=..."
    )


def test_bad_argument_to_a_callback_is_one_line(compose_train):
    cfg = compose_train(["binarize.kernel_quantizer=nope"])
    with pytest.raises(Exception) as info:
        build(cfg)
    line = one_line_error(info.value)
    assert line.startswith("binarize: MisconfigurationException: Unknown quantizer 'nope'; registered quantizers: ")
    assert "xnor" in line and "\n" not in line


def _run_config(run_dir: Path, ckpt_path=None):
    return OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}}, "ckpt_path": ckpt_path})


def test_refuse_existing_output_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("NODE_RANK", raising=False)
    guard = RefuseExistingOutputDir()
    guard.on_run_start(_run_config(tmp_path / "new"))  # missing: fine
    (tmp_path / "empty").mkdir()
    guard.on_run_start(_run_config(tmp_path / "empty"))  # empty: fine
    used = tmp_path / "used"
    (used / "checkpoints").mkdir(parents=True)
    (used / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(OutputDirExistsError, match=r"hydra.run.dir=.*used already holds results"):
        guard.on_run_start(_run_config(used))
    guard.on_run_start(_run_config(used, str(used / "checkpoints" / "last.ckpt")))  # resume in place
    with pytest.raises(OutputDirExistsError, match="already holds results"):
        guard.on_run_start(_run_config(used, str(tmp_path / "elsewhere.ckpt")))
    sweep = OmegaConf.create({"hydra": {"sweep": {"dir": str(used)}}})
    with pytest.raises(OutputDirExistsError, match=r"hydra.sweep.dir=.*used already holds results"):
        guard.on_multirun_start(sweep)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank Lightning started in rank zero's folder
    guard.on_run_start(_run_config(used))


def test_timm_backbone_from_a_local_weights_file(compose_train, tmp_path):
    """README way 3: model=timm with model.pretrained_file loads the file (no download)."""
    import timm

    source = timm.create_model("test_resnet", num_classes=7)
    weights = tmp_path / "test_resnet.pth"
    torch.save(source.state_dict(), weights)
    cfg = compose_train(["model=timm", "model.model_name=test_resnet", f"model.pretrained_file={weights}",
                         "data=fake"])
    run = build(cfg)
    loaded = run.model.net.state_dict()
    classifier = source.pretrained_cfg["classifier"]
    kept = {k: v for k, v in source.state_dict().items() if not k.startswith(classifier + ".")}
    assert kept and all(torch.equal(loaded[k], v) for k, v in kept.items())
    assert run.model.net.get_classifier().out_features == 10  # re-initialised for the data's classes


def test_readme_error_examples_are_what_the_app_says(compose_train):
    """Every `$ bnnprune ARGS` / `bnnprune: error: ...` pair in the README, checked in process."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    pairs = [(lines[i][len("$ bnnprune "):].split(), lines[i + 1][len("bnnprune: error: "):])
             for i in range(len(lines) - 1)
             if lines[i].startswith("$ bnnprune ") and lines[i + 1].startswith("bnnprune: error: ")]
    assert len(pairs) >= 2
    for args, expected in pairs:
        with pytest.raises(ConfigCompositionException) as info:
            compose_train(args)
        assert one_line_error(info.value, args) == expected
