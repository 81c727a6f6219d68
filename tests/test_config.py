"""Every shipped config option, pair, chain and sweep composes; mistakes fail at compose time, naming the valid keys."""


import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from conftest import CONF, compose
from w2sg.cli import validate
from w2sg.errors import W2SGError
from w2sg.stages import model_spec

GROUPS = ["model", "pair", "task", "loss", "train", "chain", "experiment", "sweep"]


def options(group: str):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    overrides = [f"weak={option}", f"strong={option}"] if group == "model" else [f"{group}={option}"]
    cfg = compose(overrides)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    validate(cfg)


def test_defaults_are_the_embedded_minilm_pair_on_real_text():
    cfg = compose()
    assert (cfg.weak.name, cfg.strong.name, cfg.task.name, cfg.loss.name) == (
        "minilm_l1", "minilm_l6", "tweet_sentiment", "xent")
    assert cfg.weak.random_init is None and cfg.strong.random_init is None


def test_pair_sets_both_and_explicit_choices_win():
    cfg = compose(["pair=minilm_l2_l6"])
    assert (cfg.weak.name, cfg.strong.name) == ("minilm_l2", "minilm_l6")
    cfg = compose(["pair=minilm_l2_l6", "weak=minilm_l3"])
    assert (cfg.weak.name, cfg.strong.name) == ("minilm_l3", "minilm_l6")


def test_chain_fills_its_models_in_order():
    cfg = compose(["chain=minilm_1_2_6"])
    assert [m.name for m in cfg.chain.models.values()] == ["minilm_l1", "minilm_l2", "minilm_l6"]
    assert (cfg.weak.name, cfg.strong.name) == ("minilm_l1", "minilm_l6")


def test_loss_parameters_are_overridable():
    cfg = compose(["loss=logconf", "loss.aux_coef=0.25"])
    assert cfg.loss.aux_coef == 0.25


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as e:
        compose(["task=nope"])
    assert "Could not find 'task/nope'" in str(e.value) and "tweet_sentiment" in str(e.value)


@pytest.mark.parametrize("override", ["train.epoch=3", "weak.num_layer=2", "task.n_trian=10"])
def test_misspelt_key_fails_at_compose_time(override):
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert override.split("=")[0].split(".")[-1] in str(e.value.__cause__ or e.value)


def test_misspelt_loss_parameter_is_caught_before_running():
    cfg = compose(["loss=logconf", "+loss.aux_coeff=0.3"])
    with pytest.raises(W2SGError, match="valid: aux_coef, warmup_frac"):
        validate(cfg)


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose(["train.epochs=many"])


def test_missing_model_path_is_reported():
    cfg = compose(["weak.path=/nonexistent/model"])
    with pytest.raises(W2SGError, match="model 'minilm_l1': path '/nonexistent/model' does not exist"):
        validate(cfg)


def test_model_params_labels_match_the_built_models():
    """The parameter count in each model YAML (used by grids and plots) is the real one."""
    from w2sg.models import build_model, count_params

    for name in options("model"):
        cfg = compose([f"weak={name}"]).weak
        assert count_params(build_model(cfg, 2, 0)) == cfg.params, name


def test_model_spec_leaves_out_labels_that_do_not_change_results():
    a = compose(["weak=minilm_l1"]).weak
    b = compose(["weak=minilm_l1", "weak.name=renamed", "weak.size=x"]).weak
    assert model_spec(a) == model_spec(b)


@pytest.mark.parametrize("sweep", options("sweep"))
def test_every_sweep_has_a_grid_of_valid_choices(sweep):
    from w2sg.status import compose as w2sg_compose

    cfg = w2sg_compose([f"sweep={sweep}"], with_hydra=True, conf_dir=CONF)
    grid = cfg.hydra.sweeper.params
    assert grid, f"sweeps/{sweep}.yaml defines no grid"
    combos = [[]]
    for key, values in grid.items():
        combos = [c + [f"{key}={v.strip()}"] for c in combos for v in str(values).split(",")]
    for combo in combos:
        validate(compose([f"sweep={sweep}", *combo]))
