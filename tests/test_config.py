"""Config composition: every group option and experiment composes; bad keys, types and values fail."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose
from dpm.config import validate
from dpm.errors import UserError

GROUPS = ["model", "dataset", "trainer", "pruner", "dpm", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def experiments() -> list[str]:
    return sorted(
        str(p.relative_to(CONF_DIR / "experiment").with_suffix("")) for p in (CONF_DIR / "experiment").rglob("*.yaml")
    )


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    node = cfg[group]
    assert OmegaConf.to_container(node, resolve=True)  # resolvable, not empty
    if group in ("model", "dataset", "pruner", "logger"):
        assert node.name == option


@pytest.mark.parametrize("experiment", experiments())
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose([f"experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)
    validate(cfg)


def test_experiment_list_is_not_empty():
    assert {"quickstart", "smoke"} <= set(experiments())


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_launchers_compose(launcher):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert ("Slurm" in cfg.hydra.launcher._target_) == (launcher == "slurm")


def test_defaults_are_the_quickstart():
    cfg = compose()
    assert (cfg.model.name, cfg.dataset.name, cfg.name) == ("tiny_cnn", "digits", "quickstart")


def test_wrong_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="trainer.pretrain.epoch"):
        compose(["trainer.pretrain.epoch=3"])


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose(["trainer.pretrain.epochs=three"])
    with pytest.raises(ConfigCompositionException):
        compose(["dataset.val_size=1.5"])


def test_unknown_group_option_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="resnet57"):
        compose(["model=resnet57"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.name=resnet57", "model.name='resnet57': unknown model; valid: .*resnet56"),
        ("dataset.name=mnist", "dataset.name='mnist': unknown dataset"),
        ("dpm.N=0", "dpm.N=0: N counts decay steps"),
        ("dpm.T_rate=-1", "dpm.T_rate=-1.0: t_rate must be >= 0 \\(inf disables\\)"),
        ("dpm.c_rate_form=angular", "dpm.c_rate_form='angular': c_rate_form must be one of .*radial"),
        ("dpm.release_cooldown=0", "dpm.release_cooldown=0: release_cooldown must be an integer >= 1"),
        ("trainer.pretrain.lr=0", "trainer.pretrain.lr=0.0: must be > 0"),
        ("trainer.finetune.milestones=[80,60]", "milestones=\\[80, 60\\]: must be increasing"),
        ("dataset=cifar10 dataset.num_classes=100", "dataset.num_classes=100: cifar10 has 10 classes"),
        ("pruner.name=magic", "pruner.name='magic': unknown pruner"),
        ("model.shortcut=sideways", "model.shortcut='sideways'"),
        ("trainer.checkpoint_every_minutes=-5", "trainer.checkpoint_every_minutes=-5.0: must be >= 0"),
        ("dpm.track=-1", "dpm.track=-1: must be >= 0 .* or null for all"),
    ],
)
def test_semantic_checks_name_key_value_and_fix(override, message):
    cfg = compose(override.split())
    with pytest.raises(UserError, match=message):
        validate(cfg)


def test_legal_dpm_values_come_from_dpm_core(monkeypatch):
    """A schedule or C_rate form dpm.core learns is legal in the config at once (and one it drops
    is refused): validate asks the core instead of keeping its own lists."""
    import dpm.core.rectify as rectify
    from dpm.core import SCHEDULES

    monkeypatch.setitem(SCHEDULES, "step_down", SCHEDULES["linear"])
    monkeypatch.setattr(rectify, "C_RATE_FORMS", (*rectify.C_RATE_FORMS, "angular"))
    validate(compose(["dpm=sr", "dpm.schedule=step_down", "dpm.c_rate_form=angular"]))
    monkeypatch.delitem(SCHEDULES, "cosine")
    with pytest.raises(UserError, match="dpm.schedule='cosine': valid: linear, exp, step_down"):
        validate(compose(["dpm=sr", "dpm.schedule=cosine"]))
