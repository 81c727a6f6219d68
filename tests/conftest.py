import os

import pytest

pytest.register_assert_rewrite("helpers")  # failed asserts in the shared checks show their values too

# The suite does not depend on the caller's environment: every W&B, w2sg and Hugging Face variable is cleared
# (WANDB_DIR would move ./wandb, W2SG_STORE the store, HF_HOME the caches, ...), then set to what the tests assume.
for _name in [n for n in os.environ if n.startswith(("WANDB_", "W2SG_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_"))]:
    del os.environ[_name]
# No hub look-ups in tests (they hang for tens of seconds before failing without a network).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# pytest-xdist runs one worker per core (addopts: -n auto): one torch thread each, or the workers' threads contend
# (tiny tensor ops then run many times slower); the runs a test starts in a subprocess inherit it
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_addoption(parser):
    parser.addoption("--w2sg-subprocess", action="store_true",
                     help="run every w2sg call of the tests (helpers.run_w2sg) as `python -m w2sg` in a subprocess "
                          "instead of in the test's interpreter")


def pytest_collection_modifyitems(items):
    """The longest slow tests first (``@pytest.mark.slow(seconds=N)``, the seconds one takes here), the rest in their
    order: pytest-xdist hands out tests in collection order, and a long test collected last would run alone at the
    end while the other workers idle."""
    def seconds(item):
        mark = item.get_closest_marker("slow")
        return mark.kwargs.get("seconds", 0) if mark is not None else 0

    items.sort(key=lambda item: -seconds(item))


def pytest_configure(config):
    import helpers

    helpers.SUBPROCESS_ALWAYS = config.getoption("--w2sg-subprocess")


@pytest.fixture(scope="session", autouse=True)
def default_store(tmp_path_factory):
    """A test without the ``store`` fixture that still reaches a store never writes to the caller's
    (~/.cache/w2sg/store)."""
    path = tmp_path_factory.mktemp("default_store")
    os.environ["W2SG_STORE"] = str(path)
    yield path
    os.environ.pop("W2SG_STORE", None)


@pytest.fixture
def store(tmp_path, monkeypatch):
    path = tmp_path / "store"
    monkeypatch.setenv("W2SG_STORE", str(path))
    return path


@pytest.fixture(scope="session")
def _warm_tiny(tmp_path_factory):
    """One cold ``w2sg <TINY> logger=none`` per session, in a store of its own: (that store, the run's metrics)."""
    from helpers import TINY, run_w2sg

    root = tmp_path_factory.mktemp("warm_tiny")
    [m] = run_w2sg(TINY + ["logger=none"], root, env_extra={"W2SG_STORE": str(root / "store")}).metrics
    return root / "store", m


@pytest.fixture(scope="session")
def tiny_grid_local(tmp_path_factory):
    """The 2x2 ``w2sg -m sweep=tiny_grid`` run by the local launcher once per session, in a store of its own: each
    experiment's metrics by its (weak, strong) models. The reference that the Slurm launcher's runs of the same grid
    (tests/test_slurm*.py) must match."""
    from helpers import by_pair, run_w2sg

    root = tmp_path_factory.mktemp("tiny_grid_local")
    runs = run_w2sg(["-m", "sweep=tiny_grid"], root, env_extra={"W2SG_STORE": str(root / "store")}).metrics
    assert len(runs) == 4
    return by_pair(runs)


@pytest.fixture
def warm_store(store, _warm_tiny):
    """The test's own store (``store``) already holding every stage of a tiny run (``w2sg <TINY>``, computed once per
    session and copied here, untracked: no W&B run, nothing under the test's folder); returns that run's metrics."""
    import copy
    import shutil

    shutil.copytree(_warm_tiny[0], store, dirs_exist_ok=True)  # the store may exist (empty): e.g. after `status`
    return copy.deepcopy(_warm_tiny[1])
