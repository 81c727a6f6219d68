"""w2sg.app.hydra_compat: every use of Hydra's private API, one test per piece (through w2sg's own function), so a
Hydra release that changes one fails a test named after it; the version check; and that nothing else in src/ reaches
into Hydra's internals."""

import ast
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from w2sg.app import hydra_compat
from w2sg.app.hydra_compat import HydraVersionError

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
COMPAT = SRC / "w2sg" / "app" / "hydra_compat.py"


# --- the version check ----------------------------------------------------------------------------------------------

def test_the_installed_hydra_is_the_supported_one():
    assert hydra_compat.supported(), hydra_compat.hydra_version()


@pytest.mark.parametrize("version, ok", [("1.3.2", True), ("1.3.8", True), ("1.3.10.dev0", True), ("1.4.0", False),
                                         ("1.4.0.dev1", False), ("1.2.0", False), ("2.0.0", False), ("1.10.0", False)])
def test_supported_range(version, ok):
    assert hydra_compat.supported(version) is ok


def test_pyproject_pins_the_supported_range():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"{hydra_compat.PIN}"' in text


def test_an_unsupported_hydra_fails_at_first_use_naming_its_version_and_the_pin(monkeypatch):
    monkeypatch.setattr(hydra_compat, "hydra_version", lambda: "1.4.0")
    monkeypatch.delenv(hydra_compat.UNCHECKED_ENV, raising=False)
    for use in (lambda: hydra_compat.split_sweep(["a=1,2"]), hydra_compat.args_parser, hydra_compat.singleton_state,
                lambda: hydra_compat.apply_overrides([], OmegaConf.create()),
                lambda: hydra_compat.filter_overrides(["a=1"]), lambda: hydra_compat.BasicSweeper):
        with pytest.raises(HydraVersionError) as e:
            use()
        msg = str(e.value)
        assert "hydra-core 1.4.0 is installed" in msg and hydra_compat.PIN in msg and hydra_compat.UNCHECKED_ENV in msg
    monkeypatch.setenv(hydra_compat.UNCHECKED_ENV, "1")  # the way to try a new Hydra anyway
    assert hydra_compat.split_sweep(["a=1,2"]) == [["a=1"], ["a=2"]]


def test_an_unsupported_hydra_skips_the_help_patches_with_one_warning(monkeypatch):
    from hydra._internal.hydra import Hydra

    monkeypatch.setattr(hydra_compat, "hydra_version", lambda: "1.4.0")
    monkeypatch.delenv(hydra_compat.UNCHECKED_ENV, raising=False)
    monkeypatch.setattr(hydra_compat, "_warned", set())

    def before(self, predicate, compact=True):  # Hydra's, unpatched
        return ""

    monkeypatch.setattr(Hydra, "format_config_groups", before)
    with pytest.warns(UserWarning, match=r"hydra-core 1\.4\.0 .*skipped"):
        hydra_compat.hide_config_groups(["schema"])
        hydra_compat.install()
    assert Hydra.format_config_groups is before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hydra_compat.hide_config_groups(["schema"])  # once per piece


def test_importing_hydra_compat_or_the_launcher_plugin_is_cheap_and_acyclic():
    code = ("import sys\nimport w2sg.app.hydra_compat\nprint('hydra' in sys.modules, 'omegaconf' in sys.modules)\n"
            "from hydra_plugins.w2sg_launcher import w2sg_launcher, sweep_configs as m\n"
            "print(m.W2sgBasicSweeper.__mro__[1].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "BasicSweeper"]


# --- no private Hydra outside hydra_compat --------------------------------------------------------------------------

PRIVATE_MODULES = ("hydra._internal", "hydra.core.singleton")
# attributes of Hydra's private API (or semi-private names) that only hydra_compat may touch
PRIVATE_NAMES = {"_return_value", "_apply_overrides_to_config", "split_arguments", "format_config_groups",
                 "get_state", "set_state", "get_args_parser", "get_overrides_dirname", "repository", "list_groups"}


def _private_uses(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        modules = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for m in modules:
            if any(m == p or m.startswith(p + ".") for p in PRIVATE_MODULES):
                yield f"{path.relative_to(SRC)}:{node.lineno}: imports {m}"
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_NAMES:
            yield f"{path.relative_to(SRC)}:{node.lineno}: uses .{node.attr}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.match(r"hydra\._internal\b",
                                                                                       node.value):
            yield f"{path.relative_to(SRC)}:{node.lineno}: names {node.value}"  # importlib / monkeypatch targets


def test_no_module_outside_hydra_compat_uses_hydras_private_api():
    files = [p for p in SRC.rglob("*.py") if p != COMPAT]
    assert len(files) > 20
    assert [use for p in files for use in _private_uses(p)] == []
    assert list(_private_uses(COMPAT))  # the walk does find them where they are


# --- one test per private piece -------------------------------------------------------------------------------------

def test_split_sweep_expands_like_hydras_basic_sweeper():  # BasicSweeper.split_arguments
    assert hydra_compat.split_sweep(["a=1,2", "b=x,y", "c=3", "+d=[1,2]"]) == [
        ["a=1", "b=x", "c=3", "+d=[1,2]"], ["a=1", "b=y", "c=3", "+d=[1,2]"],
        ["a=2", "b=x", "c=3", "+d=[1,2]"], ["a=2", "b=y", "c=3", "+d=[1,2]"]]
    assert hydra_compat.split_sweep(["seed=range(0,3)"]) == [["seed=0"], ["seed=1"], ["seed=2"]]


def test_status_expands_a_sweep_with_its_sweep_file_grid():  # the same, through w2sg status -m
    from w2sg.app import config

    jobs = config.expand_sweep(["seed=0,1", "loss=xent,logconf"])
    assert jobs == [["seed=0", "loss=xent"], ["seed=0", "loss=logconf"], ["seed=1", "loss=xent"],
                    ["seed=1", "loss=logconf"]]


def test_args_parser_reads_hydras_flags():  # hydra._internal.utils.get_args_parser
    args = hydra_compat.args_parser().parse_args(["-m", "--cfg", "job", "-p", "train", "--resolve", "seed=1,2"])
    assert (args.multirun, args.cfg, args.package, args.resolve, args.overrides) == (True, "job", "train", True,
                                                                                      ["seed=1,2"])


def test_multirun_cfg_other_than_job_is_refused(capsys):  # the same, through w2sg -m --cfg
    from w2sg.app import cli

    assert cli.print_multirun_configs(["-m", "--cfg", "hydra", "seed=1,2"]) == 2
    assert "only --cfg job prints the config of each job" in capsys.readouterr().err


def test_apply_overrides_sets_adds_and_deletes():  # ConfigLoaderImpl._apply_overrides_to_config
    cfg = OmegaConf.create({"a": 1, "c": {"d": 2}, "e": 5})
    hydra_compat.apply_overrides(hydra_compat.parse_overrides(["a=2", "+b=3", "c.d=4", "~e"]), cfg)
    assert OmegaConf.to_container(cfg) == {"a": 2, "c": {"d": 4}, "b": 3}


def test_wrap_override_application_is_installed_once_and_names_valid_keys():  # the wrap of the same
    from hydra.errors import ConfigCompositionException

    from w2sg.app import config

    config.register()
    config.register()
    impl = sys.modules["hydra._internal.config_loader_impl"].ConfigLoaderImpl
    wrapped = impl._apply_overrides_to_config
    assert wrapped._w2sg and not getattr(wrapped.__wrapped__, "_w2sg", False)  # one wrapper, around Hydra's own
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'train.epoch'.*valid keys: .*epochs"):
        config.compose(["train.epoch=1"])
    with pytest.raises(ConfigCompositionException, match=r"Could not add 'train.new_key'"):
        config.compose(["+train.new_key=1"])


def test_overrides_dirname_as_hydra_names_a_job_folder():  # get_overrides_dirname
    overrides = hydra_compat.parse_overrides(["seed=1", "loss=xent", "store_dir=/x"])
    assert hydra_compat.overrides_dirname(overrides, kv_sep="=", item_sep=",", exclude_keys=["store_dir"]) == \
        "loss=xent,seed=1"
    assert hydra_compat.overrides_dirname(overrides, kv_sep=":", item_sep="/", exclude_keys=[]) == \
        "loss:xent/seed:1/store_dir:/x"


@pytest.fixture
def composing():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from w2sg.app.config import CONF_DIR, register

    register()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def test_group_exists_and_config_groups_read_the_apps_groups(composing):  # .repository, list_groups
    assert hydra_compat.group_exists(composing, "task") and hydra_compat.group_exists(composing, "hydra/launcher")
    assert not hydra_compat.group_exists(composing, "seed") and not hydra_compat.group_exists(composing, "no_such")
    groups = hydra_compat.config_groups("")
    assert {"task", "loss", "hydra", "schema"} <= set(groups)


def test_config_groups_outside_a_composition_is_empty():
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    assert hydra_compat.config_groups("") == []


def test_hide_config_groups_filters_hydras_help_listing():  # Hydra.format_config_groups
    from hydra._internal.hydra import Hydra

    import w2sg.app.cli  # noqa: F401  (installs it)

    class App:  # what format_config_groups reads of Hydra's app object
        def list_all_config_groups(self):
            return ["task", "schema", "schema/model", "model", "loss", "hydra/launcher"]

        class config_loader:  # noqa: N801
            @staticmethod
            def get_group_options(group):
                return [f"{group.replace('/', '_')}_b", f"{group.replace('/', '_')}_a"]

    listed = Hydra.format_config_groups(App(), lambda g: not g.startswith("hydra"))
    assert listed == "loss: loss_a, loss_b\ntask: task_a, task_b\n"
    assert Hydra.format_config_groups(App(), lambda g: True, compact=False).startswith("hydra/launcher:\n  hydra_")


def test_install_makes_repository_copies_share_the_config_store():  # ConfigRepository deep copy (backport)
    import copy

    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    from w2sg.app.config import CONF_DIR

    hydra_compat.install()
    hydra_compat.install()
    assert vars(ConfigRepository)["__deepcopy__"] is hydra_compat._deepcopy_sharing_the_store
    Plugins.instance()
    search_path = ConfigSearchPathImpl()
    search_path.append("main", f"file://{CONF_DIR}")
    search_path.append("schema", "structured://")
    repo = ConfigRepository(search_path)
    copied = copy.deepcopy(repo)
    structured = [s for s in copied.sources if type(s).__name__ == "StructuredConfigSource"]
    assert structured and structured[0].store is ConfigStore.instance()  # Hydra 1.3 keeps the store on the source
    assert copied.sources[0] is not repo.sources[0] and copied.group_exists("task")


def test_singleton_state_pickles_hydras_global_state_for_a_slurm_job():  # Singleton.get_state / set_state
    cloudpickle = pytest.importorskip("cloudpickle")  # submitit's pickler
    from hydra.core.config_store import ConfigStore
    from hydra.core.singleton import Singleton

    from w2sg.app.config import register

    register()
    state = hydra_compat.singleton_state()
    assert set(state) == {"instances", "omegaconf_resolvers"} and ConfigStore in state["instances"]
    assert "w2sg.run_id" in state["omegaconf_resolvers"] or "now" in state["omegaconf_resolvers"]
    shipped = pickle.loads(cloudpickle.dumps(state))  # what submitit does with the launcher's argument
    before = Singleton.get_state()
    try:
        Singleton.set_state(shipped)  # what Hydra's submitit launcher does in the job
        assert "w2sg_schema.yaml" in ConfigStore.instance().repo and "schema" in ConfigStore.instance().repo
    finally:
        Singleton.set_state(before)


class _Callbacks:  # what run_job calls on the hydra context's callbacks
    def on_job_start(self, **kwargs):
        pass

    def on_job_end(self, **kwargs):
        pass


def _run(tmp_path, overrides, task):
    """A job of a sweep over a one-key app, run in this process as the launcher runs an all-stored job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import HydraContext
    from omegaconf import read_write

    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    (conf / "config.yaml").write_text("x: 1\n")
    with initialize_config_dir(str(conf), version_base="1.3"):
        cfg = compose("config", overrides=overrides + ["hydra/job_logging=none", "hydra/hydra_logging=none",
                                                       f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweep.subdir=0"],
                      return_hydra_config=True)
        with read_write(cfg):
            cfg.hydra.job.id, cfg.hydra.job.num = "job_0", 0
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=_Callbacks())
        before = HydraConfig.instance().cfg
        try:
            return hydra_compat.run_job(hydra_context=context, task_function=task, config=cfg,
                                        job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        finally:
            HydraConfig.instance().cfg = before  # run_job sets the job's: later tests in this process run none


def test_run_job_runs_a_job_in_its_folder_and_job_error_reads_its_failure(tmp_path):  # run_job, _return_value
    from hydra.core.utils import JobStatus

    ret = _run(tmp_path, ["x=2"], lambda cfg: cfg.x * 10)
    assert ret.status == JobStatus.COMPLETED and ret.return_value == 20 and hydra_compat.job_error(ret) is None
    assert (tmp_path / "sweep" / "0" / ".hydra" / "config.yaml").is_file()
    assert list(ret.overrides) == ["x=2"]

    def fails(cfg):
        raise ValueError("boom")

    ret = _run(tmp_path, ["x=3"], fails)
    assert ret.status == JobStatus.FAILED
    error = hydra_compat.job_error(ret)
    assert isinstance(error, ValueError) and str(error) == "boom"


def test_completed_job_is_a_finished_job_return():
    from hydra.core.utils import JobStatus

    ret = hydra_compat.completed_job(None)
    assert ret.status == JobStatus.COMPLETED and ret.return_value is None and hydra_compat.job_error(ret) is None


def test_filter_overrides_drops_hydras_own():  # hydra.core.utils.filter_overrides
    assert list(hydra_compat.filter_overrides(["seed=1", "hydra.job.name=x", "loss=xent"])) == ["seed=1", "loss=xent"]


def test_w2sg_basic_sweeper_subclasses_hydras_and_its_check_is_called():  # BasicSweeper (subclassed)
    import inspect

    from hydra_plugins.w2sg_launcher.sweep_configs import W2sgBasicSweeper

    assert W2sgBasicSweeper.__mro__[1] is hydra_compat.BasicSweeper
    assert hydra_compat.BasicSweeper.__module__ == "hydra._internal.core_plugins.basic_sweeper"
    # Hydra's sweep checks each batch with the method W2sgBasicSweeper overrides (composing with SweepConfigs)
    assert "self.validate_batch_is_legal(batch)" in inspect.getsource(hydra_compat.BasicSweeper.sweep)
    sweeper = W2sgBasicSweeper(max_batch_size=None, params=None)
    assert sweeper.max_batch_size is None


def test_is_basic_sweeper_knows_hydras_and_w2sgs_target(composing):  # BasicSweeper's _target_ name
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeperConf

    assert hydra_compat.is_basic_sweeper(BasicSweeperConf._target_)
    from hydra import compose

    assert hydra_compat.is_basic_sweeper(compose("config", return_hydra_config=True).hydra.sweeper._target_)
    assert not hydra_compat.is_basic_sweeper("hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper")
