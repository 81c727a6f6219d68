"""Every shipped config option, pair, chain and sweep composes; mistakes fail at compose time, naming the valid keys."""


import pytest
from helpers import CONF, compose, model_package_missing
from hydra.errors import ConfigCompositionException, MissingConfigException

from w2sg.app.config import validate
from w2sg.core.errors import W2SGError
from w2sg.core.graph import model_spec

GROUPS = ["model", "pair", "task", "loss", "labels", "budget", "train", "chain", "experiment", "sweep"]
# every group a user picks an option of on the command line
USER_GROUPS = ["weak", "strong", "pair", "task", "loss", "labels", "budget", "train", "generative", "logger", "chain", "sweep",
               "experiment", "launcher"]


def options(group: str):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [
    pytest.param(g, o, marks=pytest.mark.skipif(g == "model" and bool(model_package_missing(o)),
                                                 reason=model_package_missing(o) if g == "model" else ""))
    for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    overrides = [f"weak={option}", f"strong={option}"] if group == "model" else [f"{group}={option}"]
    cfg = compose(overrides)
    validate(cfg)


def test_defaults_are_the_embedded_minilm_pair_on_real_text():
    cfg = compose()
    assert (cfg.weak.name, cfg.strong.name, cfg.task.name, cfg.loss["name"]) == (
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
    assert cfg.loss["aux_coef"] == 0.25


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as e:
        compose(["task=nope"])
    assert "Could not find 'task/nope'" in str(e.value) and "tweet_sentiment" in str(e.value)


@pytest.mark.parametrize("group", USER_GROUPS)
def test_misspelt_option_of_every_group_fails_listing_the_valid_ones(group):
    """pair/chain/sweep/experiment/launcher default to no option; a typo there must not silently run the default."""
    with pytest.raises(MissingConfigException) as e:
        compose([f"{group}=nope"])
    assert f"Could not find '{group}/nope'" in str(e.value)
    assert all(o in str(e.value) for o in options(group)), str(e.value)


@pytest.mark.parametrize("args,bad,valid", [
    (["pair=minilm_l1_l7", "--cfg", "job"], "pair/minilm_l1_l7", "minilm_l1_l6"),
    (["chain=minilm_1_2_7", "--cfg", "job"], "chain/minilm_1_2_7", "minilm_1_2_6"),
    (["experiment=smokee", "--cfg", "job"], "experiment/smokee", "smoke"),
    # -m: these fail before any job starts (stages=[nope] would fail the job fast if one started)
    (["-m", "sweep=size_gird", "experiment=smoke", "stages=[nope]"], "sweep/size_gird", "size_grid"),
    (["-m", "experiment=smoke", "launcher=slurm_gpuu", "stages=[nope]"], "launcher/slurm_gpuu", "slurm_gpu"),
    (["-m", "pair=tiny,minilm_l1_l7", "stages=[nope]"], "pair/minilm_l1_l7", "minilm_l1_l6"),
    (["-m", "sweep=size_gird", "--cfg", "job"], "sweep/size_gird", "size_grid"),
    (["status", "-m", "sweep=tiny_gird"], "sweep/tiny_gird", "tiny_grid"),
    (["status", "chain=nope"], "chain/nope", "minilm_1_3_6"),
])
def test_misspelt_option_fails_on_the_command_line(tmp_path, store, args, bad, valid):
    from helpers import run_w2sg

    proc = run_w2sg(args, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert f"Could not find '{bad}'" in proc.stderr and valid in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "job" not in proc.stdout.lower()


@pytest.mark.parametrize("override,message", [
    ("train.epoch=1", "no key 'epoch' in 'train'; valid keys: mode, epochs, batch_size"),
    ("train.epoch=1", "Did you mean train.epochs?"),
    ("train.lora.rnk=4", "no key 'rnk' in 'train.lora'; valid keys: rank, alpha, dropout, target_modules"),
    ("pari=tiny", "Did you mean pair?"),
    ("loss.alpha=2", "loss 'xent' has no parameter 'alpha'; valid: (none) (loss=product takes 'alpha')"),
])
def test_misspelt_key_names_the_valid_keys(override, message):
    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert message in str(e.value)


def test_misspelt_key_names_the_valid_keys_on_the_command_line(tmp_path):
    from helpers import run_w2sg

    proc = run_w2sg(["-m", "seed=0,1", "train.epoch=1", "stages=[nope]"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "valid keys:" in proc.stderr and "train.epochs" in proc.stderr, proc.stderr
    proc = run_w2sg(["loss=logconf", "loss.alpha=2", "--cfg", "job"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "valid: aux_coef, warmup_frac" in proc.stderr, proc.stderr
    # a + typo would otherwise run the default's stages while the user believes a setting changed
    proc = run_w2sg(["+train.epoch=3", "--cfg", "job"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "Could not add 'train.epoch'" in proc.stderr and "train.epochs" in proc.stderr


@pytest.mark.parametrize("override,hint", [("+train.epoch=3", "Did you mean train.epochs?"),
                                           ("+task.n_trian=100", "Did you mean task.n_train?"),
                                           ("+foo=1", "valid keys: weak, strong, task"),
                                           ("++train.lora.rnk=2", "Did you mean train.lora.rank?")])
def test_added_keys_are_checked_against_the_schema(override, hint):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="Could not add") as e:
        compose([override])
    assert hint in str(e.value)


def test_added_keys_go_where_a_node_takes_new_keys():
    cfg = compose(["+task.load_kwargs.sep=tab", "++train.epochs=2", "loss=logconf", "+loss.extra=1"])
    assert cfg.task.load_kwargs["sep"] == "tab" and cfg.train.epochs == 2


def test_chain_with_pair_is_an_error():
    with pytest.raises(W2SGError, match="pair= cannot be combined with chain="):
        validate(compose(["chain=minilm_1_2_6", "pair=minilm_l2_l6"]), ["chain=minilm_1_2_6", "pair=minilm_l2_l6"])
    validate(compose(["chain=minilm_1_2_6"]), ["chain=minilm_1_2_6", "pair=null"])
    validate(compose(["experiment=smoke", "chain=tiny"]), ["experiment=smoke", "chain=tiny"])  # a preset's pair


def test_chain_with_pair_is_an_error_on_the_command_line(tmp_path, store):
    from helpers import run_w2sg

    # stages=[nope]: without the check the run would stop at once on the unknown stage instead
    proc = run_w2sg(["chain=tiny", "pair=tiny", "stages=[nope]"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "pair= cannot be combined with chain=" in proc.stderr, proc.stderr


def test_weak_larger_than_strong_is_warned_and_recorded(caplog, monkeypatch):
    from w2sg.core.plan import size_warnings
    from w2sg.results import diagnostics
    from w2sg.run.experiment import run, table
    from w2sg.run.runner import Outcome

    assert size_warnings(compose()) == [] and size_warnings(compose(["chain=minilm_1_2_6"])) == []
    cfg = compose(["weak=minilm_l6", "strong=minilm_l1"])
    (warning,) = size_warnings(cfg)
    assert "weak model minilm_l6 (22.7M params) is larger than the strong model minilm_l1 (13.8M)" in warning

    from types import SimpleNamespace

    from w2sg.data.tasks import TaskData

    class FakeRunner:  # every stage "ran" with accuracy 0.5
        outcomes: dict = {}
        store = None  # no stored predictions behind the fake stages
        context = SimpleNamespace(data=TaskData(gt=[], weak=[], test=[]))

        class tracker:
            enabled = False

        def run(self, stage, force=False):
            return Outcome(stage.key, False, 0.0, {"acc": 0.5, "auroc": 0.5})

        def release_weights(self, stages):  # store.keep_weights: nothing stored to free
            return 0

    # no stored predictions behind the fake stages: no diagnostics or CI to compute
    monkeypatch.setattr(diagnostics, "for_run", lambda *args: ({}, {}))
    with caplog.at_level("WARNING", logger="w2sg"):
        metrics = run(cfg, FakeRunner())
    assert metrics["warnings"] == [warning] and warning in caplog.text
    assert table(metrics).splitlines()[-1].split() == ["warning", *warning.split()]
    assert "warnings" not in run(compose(["pair=minilm_l1_l6"]), FakeRunner())


@pytest.mark.parametrize("args", [["-m", "sweep=tiny_grid", "--cfg", "job"],
                                  ["-m", "weak=tiny_random,tiny_random_l2", "strong=tiny_random_l3", "--cfg", "job"]])
def test_multirun_cfg_job_prints_every_job(tmp_path, args):
    from helpers import run_w2sg

    out = run_w2sg(args, cwd=tmp_path).stdout
    jobs = [line for line in out.splitlines() if line.startswith("# job ")]
    assert len(jobs) == (4 if "sweep=tiny_grid" in args else 2), out
    assert "weak=tiny_random_l2 strong=tiny_random_l3" in jobs[-1 if len(jobs) == 2 else 2]
    assert out.count("\nweak:\n  name: tiny_random_l2\n") == len(jobs) // 2


def test_multirun_with_another_cfg_is_a_clear_error(tmp_path):
    from helpers import run_w2sg

    proc = run_w2sg(["-m", "sweep=tiny_grid", "--cfg", "hydra"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "only --cfg job" in proc.stderr and "Traceback" not in proc.stderr


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
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from w2sg.ml.models import build_model, count_params

    for name in options("model"):
        cfg = compose([f"weak={name}"]).weak
        if cfg.arch is not None and cfg.random_init is None:
            continue  # the hub catalogue (weights not downloadable here): tests/test_catalogue.py counts them
        if cfg.arch is not None and cfg.arch.get("model_type") not in CONFIG_MAPPING:
            continue  # an architecture newer than this transformers (qwen3 before 4.51): test_catalogue skips it
        assert count_params(build_model(cfg, 2, 0)) == cfg.params, name


def test_model_spec_leaves_out_labels_that_do_not_change_results():
    a = compose(["weak=minilm_l1"]).weak
    b = compose(["weak=minilm_l1", "weak.name=renamed", "weak.size=x"]).weak
    assert model_spec(a) == model_spec(b)


@pytest.mark.slow  # keeps the default suite under 5 minutes; CI runs -m slow too
@pytest.mark.parametrize("sweep", options("sweep"))
def test_every_sweep_has_a_grid_of_valid_choices(sweep):
    from w2sg.app.config import compose as w2sg_compose

    cfg = w2sg_compose([f"sweep={sweep}"], with_hydra=True, conf_dir=CONF)
    grid = cfg.hydra.sweeper.params
    assert grid, f"sweeps/{sweep}.yaml defines no grid"
    axes = {key: [f"{key}={v.strip()}" for v in str(values).split(",")] for key, values in grid.items()}
    combos = [[]]
    for choices in axes.values():
        combos = [c + [choice] for c in combos for choice in choices]
    if len(combos) > 32:  # a large grid (e.g. the reproduction packs): every value of every axis, the others at
        first = [choices[0] for choices in axes.values()]  # their first value, so that each value composes once
        combos = [first[:i] + [choice] + first[i + 1:] for i, choices in enumerate(axes.values()) for choice in choices]
    for combo in combos:
        validate(compose([f"sweep={sweep}", *combo]))


def test_help_is_hydras_with_every_group_and_option(tmp_path):
    """`w2sg --help`: our header and footer around Hydra's own listing of every config group and its options."""
    from helpers import run_w2sg

    out = run_w2sg(["--help"], cwd=tmp_path).stdout
    assert out.startswith("w2sg: weak-to-strong generalization experiments.")
    assert "== Configuration groups ==" in out and "== Config ==" in out and "Powered by Hydra" in out
    listed = {line.split(":")[0]: line.split(": ", 1)[1].split(", ")
              for line in out.split("== Configuration groups ==")[1].split("== Config ==")[0].splitlines()
              if ": " in line}
    assert sorted(listed) == sorted(USER_GROUPS)  # not the internal schema and model groups
    for group in USER_GROUPS:
        assert listed.get(group) == options(group), group
    assert "minilm_l6" in listed["weak"] and "minilm_l6" in listed["strong"]
    assert "logconf" in listed["loss"] and "tweet_sentiment" in listed["task"]
    assert "strong:\n  name: minilm_l6" in out  # the composed config follows


def test_hydra_repository_copies_share_the_config_store():
    """w2sg.app.hydra_compat: Hydra's per-group copies of its config repository no longer deep-copy the ConfigStore
    (what made `w2sg --help` take seconds), and still see configs registered after the copy."""
    import copy

    from hydra._internal.config_repository import (
        CachingConfigRepository,
        ConfigRepository,
    )
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra.core.config_store import ConfigStore
    from hydra.core.object_type import ObjectType
    from hydra.core.plugins import Plugins

    import w2sg.app.cli  # noqa: F401  (installs the fix)

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
