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
        if cfg.arch is not None and cfg.random_init is None:
            continue  # the hub catalogue (weights not downloadable here): tests/test_catalogue.py counts them
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


def test_help_is_hydras_with_every_group_and_option(tmp_path):
    """`w2sg --help`: our header and footer around Hydra's own listing of every config group and its options."""
    from conftest import run_w2sg

    out = run_w2sg(["--help"], cwd=tmp_path).stdout
    assert out.startswith("w2sg: weak-to-strong generalization experiments.")
    assert "== Configuration groups ==" in out and "== Config ==" in out and "Powered by Hydra" in out
    listed = {line.split(":")[0]: line.split(": ", 1)[1].split(", ")
              for line in out.split("== Configuration groups ==")[1].split("== Config ==")[0].splitlines()
              if ": " in line}
    for group in GROUPS + ["weak", "strong", "launcher", "logger"]:
        assert listed.get(group) == options(group), group
    assert "minilm_l6" in listed["weak"] and "minilm_l6" in listed["strong"]
    assert "logconf" in listed["loss"] and "tweet_sentiment" in listed["task"]
    assert "strong:\n  name: minilm_l6" in out  # the composed config follows


def test_hydra_repository_copies_share_the_config_store():
    """w2sg.hydra_compat: Hydra's per-group copies of its config repository no longer deep-copy the ConfigStore
    (what made `w2sg --help` take seconds), and still see configs registered after the copy."""
    import copy

    from hydra._internal.config_repository import CachingConfigRepository, ConfigRepository
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra.core.config_store import ConfigStore
    from hydra.core.object_type import ObjectType
    from hydra.core.plugins import Plugins

    import w2sg.cli  # noqa: F401  (installs the fix)

    Plugins.instance()  # registers the config source types (file://, structured://)
    search_path = ConfigSearchPathImpl()
    search_path.append("main", f"file://{CONF}")
    search_path.append("schema", "structured://")
    repo = ConfigRepository(search_path)
    copied = copy.deepcopy(repo)
    assert copied.sources is not repo.sources
    assert copied.sources[-1] is not repo.sources[-1] and copied.sources[-1].store is ConfigStore.instance()
    caching = CachingConfigRepository(repo)
    ConfigStore.instance().store(group="w2sg_test_late", name="late", node={"a": 1})
    try:
        assert caching.get_group_options("w2sg_test_late", ObjectType.CONFIG) == ["late"]
        assert caching.load_config("w2sg_test_late/late").config.a == 1
        assert "task" in caching.get_group_options("", ObjectType.GROUP)
    finally:
        del ConfigStore.instance().repo["w2sg_test_late"]
