"""Every use of Hydra's private API, in one place, behind a check of the Hydra version it was written for.

w2sg reaches into Hydra 1.3 where its public API has no way to do what w2sg needs. Each such piece is imported here,
and only here (tests/test_hydra_compat.py checks no other module of src/ imports ``hydra._internal`` or
``hydra.core.singleton``, and has one test per piece below, so a Hydra release that changes one fails a named test):

==========================================  ==========================================  ================================
private piece                               what w2sg does with it                       here
==========================================  ==========================================  ================================
``BasicSweeper.split_arguments``            ``w2sg status -m`` / ``-m --cfg job``: the   ``split_sweep``
(hydra._internal.core_plugins)              jobs of a sweep, as Hydra's sweeper expands
``BasicSweeper`` (subclassed)               the launcher plugin's ``w2sg_basic`` sweeper ``BasicSweeper``
``get_args_parser`` (hydra._internal.utils) ``w2sg -m ... --cfg job``: Hydra's own flags ``args_parser``
``ConfigLoaderImpl._apply_overrides_to_     the launcher's per-job configs (SweepConfigs) ``apply_overrides``
config`` (hydra._internal.config_loader_    apply a job's overrides to a copy; the
impl)                                       friendly unknown-key errors wrap it          ``wrap_override_application``
``get_overrides_dirname`` (same module)     the job's ``hydra.job.override_dirname``     ``overrides_dirname``
``ConfigLoaderImpl.repository``             which overrides choose config-group options  ``group_exists``
``ConfigLoader.list_groups`` (via           config groups named in an unknown-key error  ``config_groups``
``GlobalHydra.config_loader()``)
``Hydra.format_config_groups``              ``w2sg --help`` hides internal groups        ``hide_config_groups``
(hydra._internal.hydra)
``ConfigRepository`` deep copy              the backport that makes --help fast          ``install``
(hydra._internal.config_repository)
``Singleton.get_state`` (hydra.core.        the launcher pickles Hydra's global state    ``singleton_state``
singleton)                                  into each Slurm job, as Hydra's own launchers
``run_job``, ``filter_overrides``           the launcher runs an all-stored job in       ``run_job``,
(hydra.core.utils; launcher-plugin API)     process; logs a job's overrides              ``filter_overrides``
``JobReturn._return_value``                 a failed job's exception (the public         ``job_error``,
                                            ``return_value`` re-raises it)               ``completed_job``
BasicSweeper's ``_target_`` name            whether the sweeper is a tuning one          ``is_basic_sweeper``
==========================================  ==========================================  ================================

Public Hydra API stays imported where it is used: ``hydra.main``, ``compose``, ``initialize_config_dir``,
``HydraConfig``, ``ConfigStore``, ``GlobalHydra`` (its ``clear``), ``Callback``, ``JobReturn`` / ``JobStatus``,
``RunMode``, ``hydra.errors``, and the override grammar's ``OverridesParser`` / ``Override`` (the API Hydra's own
sweeper plugins use; ``parse_overrides`` here is a shorthand).

The version check: these pieces were written for hydra-core 1.3.x (pyproject pins ``hydra-core>=1.3.2,<1.4``).
With another Hydra, a piece w2sg cannot do without raises ``HydraVersionError`` at its first use, naming the
installed version and the pin; the two that only make ``w2sg --help`` faster or tidier warn once and are skipped.
``W2SG_UNSUPPORTED_HYDRA=1`` skips the check (to try a new Hydra release: then run tests/test_hydra_compat.py).

Importing this module imports no Hydra: ``w2sg status`` and the other light subcommands may import it.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from w2sg.core.errors import W2SGError

if TYPE_CHECKING:  # pragma: no cover
    import argparse

SUPPORTED = ((1, 3), (1, 4))  # [1.3, 1.4): the Hydra versions the private pieces below were written for
PIN = "hydra-core>=1.3.2,<1.4"
UNCHECKED_ENV = "W2SG_UNSUPPORTED_HYDRA"  # =1: use the pieces below with any Hydra version


class HydraVersionError(W2SGError):
    """The installed Hydra is not one w2sg's use of Hydra's private API was written for."""


def hydra_version() -> str:
    import hydra

    return str(hydra.__version__)


def _major_minor(version: str) -> Tuple[int, int]:
    parts = (version.split(".") + ["0", "0"])[:2]
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def supported(version: Optional[str] = None) -> bool:
    """Whether ``version`` (default: the installed Hydra's) is in the range the pieces here were written for."""
    low, high = SUPPORTED
    return low <= _major_minor(hydra_version() if version is None else version) < high


def _message(what: str, version: str) -> str:
    return (f"w2sg uses Hydra's private {what}, written for hydra-core 1.3.x, and hydra-core {version} is installed; "
            f"install a supported Hydra (pip install '{PIN}', w2sg's pinned range), or set {UNCHECKED_ENV}=1 to try "
            f"this one anyway (and run tests/test_hydra_compat.py to see what changed)")


def require(what: str) -> None:
    """Raise HydraVersionError unless the installed Hydra is supported (or the check is switched off)."""
    if os.environ.get(UNCHECKED_ENV) == "1" or supported():
        return
    raise HydraVersionError(_message(what, hydra_version()))


_warned: set = set()


def optional(what: str) -> bool:
    """For a piece w2sg works without: whether to use it; warns once (per piece) when the Hydra is unsupported."""
    if os.environ.get(UNCHECKED_ENV) == "1" or supported():
        return True
    if what not in _warned:
        _warned.add(what)
        warnings.warn(_message(what, hydra_version()) + f"; going on without it ({what} is skipped)", stacklevel=3)
    return False


def _private(what: str, module: str, name: str) -> Any:
    """``module.name`` from Hydra, after the version check; a clear error if it is gone (W2SG_UNSUPPORTED_HYDRA)."""
    require(what)
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise HydraVersionError(_message(what, hydra_version()) + f" ({module}.{name} is gone: {e})") from e


# --- sweeps ---------------------------------------------------------------------------------------------------------

def parse_overrides(lines: Iterable[str]) -> List[Any]:
    """Hydra's parsed ``Override`` objects of these command-line overrides (its override grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(lines))


def split_sweep(overrides: Iterable[str]) -> List[List[str]]:
    """The override list of every job of a sweep over ``overrides``, in the order Hydra's basic sweeper runs them
    (``a=1,2 b=x,y``: the cartesian product, the last key varying fastest)."""
    split_arguments = _private("BasicSweeper.split_arguments (sweep expansion)",
                               "hydra._internal.core_plugins.basic_sweeper", "BasicSweeper").split_arguments
    batches = split_arguments(parse_overrides(overrides), None)
    return [list(job) for batch in batches for job in batch]


def is_basic_sweeper(target: str) -> bool:
    """Whether a sweeper's ``_target_`` is Hydra's basic sweeper (hydra._internal...BasicSweeper) or w2sg's
    subclass of it (W2sgBasicSweeper): sweepers that ignore the task's return value."""
    return str(target).endswith("BasicSweeper")


def args_parser() -> "argparse.ArgumentParser":
    """Hydra's command-line parser (``--cfg``, ``--package``, ``--resolve``, ``-m``, overrides)."""
    return _private("get_args_parser (command-line flags)", "hydra._internal.utils", "get_args_parser")()


def __getattr__(name: str) -> Any:
    """``BasicSweeper``: Hydra's basic sweeper class (private), for the launcher plugin to subclass."""
    if name == "BasicSweeper":
        return _private("BasicSweeper (the w2sg_basic sweeper subclasses it)",
                        "hydra._internal.core_plugins.basic_sweeper", "BasicSweeper")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- composing configs ----------------------------------------------------------------------------------------------

def _config_loader_impl() -> Any:
    return _private("ConfigLoaderImpl (override application)", "hydra._internal.config_loader_impl",
                    "ConfigLoaderImpl")


def apply_overrides(overrides: List[Any], cfg: Any) -> None:
    """Apply parsed value overrides (``key=v``, ``+key=v``, ``~key``) to a composed config in place, as Hydra does
    when it composes (with w2sg's wrapper, wrap_override_application, once installed)."""
    _config_loader_impl()._apply_overrides_to_config(overrides, cfg)


def wrap_override_application(make: Callable[[Callable[..., None]], Callable[..., None]]) -> None:
    """Replace Hydra's override step (``ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)``) by
    ``make(original)`` (idempotent: a second call keeps the first wrapper)."""
    impl = _config_loader_impl()
    original = impl._apply_overrides_to_config
    if getattr(original, "_w2sg", False):
        return
    wrapped = make(original)
    wrapped._w2sg = True  # type: ignore[attr-defined]
    impl._apply_overrides_to_config = staticmethod(wrapped)


def overrides_dirname(overrides: List[Any], kv_sep: str, item_sep: str, exclude_keys: Sequence[str]) -> str:
    """``hydra.job.override_dirname`` of a job with these parsed overrides."""
    get = _private("get_overrides_dirname", "hydra._internal.config_loader_impl", "get_overrides_dirname")
    return get(overrides=overrides, kv_sep=kv_sep, item_sep=item_sep, exclude_keys=list(exclude_keys))


def group_exists(loader: Any, group: str) -> bool:
    """Whether ``group`` is a config group of the app ``loader`` (a launcher's ``hydra_context.config_loader``)
    composes."""
    require("ConfigLoaderImpl.repository (config groups)")
    return bool(loader.repository.group_exists(group))


def config_groups(parent: str = "") -> List[str]:
    """The config groups under ``parent`` of the app Hydra is composing now; [] outside one."""
    from hydra.core.global_hydra import GlobalHydra

    gh = GlobalHydra.instance()
    if not gh.is_initialized():
        return []
    require("ConfigLoader.list_groups")
    return list(gh.config_loader().list_groups(parent))


# --- w2sg --help ----------------------------------------------------------------------------------------------------

def hide_config_groups(hidden: Sequence[str]) -> None:
    """``--help`` lists the config groups but those whose first part is in ``hidden`` (idempotent). Hydra has no
    setting for it: the private ``Hydra.format_config_groups`` gets a filter. Skipped, with a warning, on an
    unsupported Hydra (--help then lists every group)."""
    what = "Hydra.format_config_groups (hiding internal groups from --help)"
    if not optional(what):
        return
    try:
        from hydra._internal.hydra import Hydra
    except ImportError:
        return
    original = Hydra.format_config_groups
    if getattr(original, "_w2sg", False):
        return
    hidden = tuple(hidden)

    def format_config_groups(self: Any, predicate: Any, compact: bool = True) -> str:
        return original(self, lambda g: predicate(g) and g.split("/")[0] not in hidden, compact)

    format_config_groups._w2sg = True  # type: ignore[attr-defined]
    Hydra.format_config_groups = format_config_groups  # type: ignore[method-assign]


# A backport of one Hydra fix that makes ``w2sg --help`` (and every compose) cheap; see ``install``.
#
# Cause: in Hydra 1.3, every ``ConfigLoaderImpl.get_group_options`` call builds a ``CachingConfigRepository``,
# whose ``__init__`` deep-copies the config repository. The repository's ``StructuredConfigSource`` keeps a
# reference to the process-wide ``ConfigStore`` singleton (``self.store``), so each call deep-copies the whole
# store: every structured config in it (Hydra's own ``HydraConf``, our schemas, the submitit launcher configs)
# as OmegaConf nodes, ~10-20 ms here. ``--help`` lists the config groups with ~120 such calls (twice over:
# Hydra's groups and ours), which was ~2.4 s of the ~3 s ``w2sg --help`` took. The copy is useless: the copied
# repository only replaces its own ``sources`` list (``initialize_sources``), it never writes to the store.
#
# Upstream Hydra fixed it after 1.3 (facebookresearch/hydra#2928, "Use latest configstore singleton instead of
# storing it"): ``StructuredConfigSource`` no longer holds the store and fetches ``ConfigStore.instance()`` on
# use, so deep copies of the repository share the live store. ``install`` gives the same behaviour on Hydra
# 1.3: a copy of a ``StructuredConfigSource`` shares the singleton store (its other attributes are the
# provider and path strings). It changes nothing Hydra prints or composes; on a Hydra that already has the fix
# it is not needed, and is skipped (with a warning, as every piece here outside 1.3).

def _deepcopy_sharing_the_store(self: Any, memo: Dict[int, Any]) -> Any:
    """ConfigRepository.__deepcopy__: as the default, except that structured sources share the ConfigStore."""
    new = copy.copy(self)
    memo[id(self)] = new
    for k, v in vars(self).items():
        if k == "sources":
            # a shallow copy of a StructuredConfigSource is a full one but for the store: its other attributes
            # are the provider and path strings, and its store stays the singleton, as in a freshly built source
            v = [copy.copy(s) if type(s).__name__ == "StructuredConfigSource" else copy.deepcopy(s, memo) for s in v]
        else:
            v = copy.deepcopy(v, memo)
        setattr(new, k, v)
    return new


def install() -> None:
    """Make deep copies of Hydra's config repository share the ConfigStore singleton (idempotent).

    The hook goes on ``ConfigRepository`` (what ``CachingConfigRepository`` copies), not on
    ``StructuredConfigSource``: Hydra's plugin scan re-executes the modules under ``hydra._internal.core_plugins``
    when the app starts, which would define a fresh ``StructuredConfigSource`` class without it.
    """
    if not optional("ConfigRepository deep copy (the backport of facebookresearch/hydra#2928)"):
        return
    try:
        from hydra._internal.config_repository import ConfigRepository
    except ImportError:
        return
    if "__deepcopy__" not in vars(ConfigRepository):
        ConfigRepository.__deepcopy__ = _deepcopy_sharing_the_store  # type: ignore[attr-defined]


# --- launching jobs -------------------------------------------------------------------------------------------------

def singleton_state() -> Any:
    """Hydra's global state (its singletons: ConfigStore, JobRuntime, ...; OmegaConf's resolvers) to hand to a job
    that runs in another process (a launcher's ``singleton_state`` argument), as Hydra's own launchers do."""
    return _private("Singleton.get_state (global state for Slurm jobs)", "hydra.core.singleton",
                    "Singleton").get_state()


def run_job(**kwargs: Any) -> Any:
    """Hydra's ``run_job`` (a launcher plugin's way to run one job in this process: its folder, .hydra/, logging,
    callbacks, the task function); returns the JobReturn."""
    require("run_job")
    from hydra.core.utils import run_job as hydra_run_job

    return hydra_run_job(**kwargs)


def filter_overrides(overrides: Sequence[str]) -> Sequence[str]:
    """A job's overrides without Hydra's own (``hydra.*``), as Hydra's launchers log them."""
    require("filter_overrides")
    from hydra.core.utils import filter_overrides as hydra_filter_overrides

    return hydra_filter_overrides(overrides)


def job_error(ret: Any) -> Optional[BaseException]:
    """The exception a failed job raised (a FAILED JobReturn holds it; the public ``return_value`` re-raises it
    and writes to stderr), else None."""
    from hydra.core.utils import JobStatus

    if ret.status != JobStatus.FAILED:
        return None
    require("JobReturn._return_value")
    return ret._return_value


def completed_job(value: Any = None) -> Any:
    """A JobReturn for a job that completed with ``value``."""
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn()
    ret.status = JobStatus.COMPLETED
    ret.return_value = value
    return ret
