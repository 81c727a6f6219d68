"""A backport of one Hydra fix that makes ``w2sg --help`` (and every compose) cheap; see ``install``.

Cause: in Hydra 1.3, every ``ConfigLoaderImpl.get_group_options`` call builds a ``CachingConfigRepository``,
whose ``__init__`` deep-copies the config repository. The repository's ``StructuredConfigSource`` keeps a
reference to the process-wide ``ConfigStore`` singleton (``self.store``), so each call deep-copies the whole
store: every structured config in it (Hydra's own ``HydraConf``, our schemas, the submitit launcher configs)
as OmegaConf nodes, ~10-20 ms here. ``--help`` lists the config groups with ~120 such calls (twice over:
Hydra's groups and ours), which was ~2.4 s of the ~3 s ``w2sg --help`` took. The copy is useless: the copied
repository only replaces its own ``sources`` list (``initialize_sources``), it never writes to the store.

Upstream Hydra fixed it after 1.3 (facebookresearch/hydra#2928, "Use latest configstore singleton instead of
storing it"): ``StructuredConfigSource`` no longer holds the store and fetches ``ConfigStore.instance()`` on
use, so deep copies of the repository share the live store. ``install`` gives the same behaviour on Hydra
1.3: a copy of a ``StructuredConfigSource`` shares the singleton store (its other attributes are the
provider and path strings). It changes nothing Hydra prints or composes; on a Hydra that already has the fix
it is harmless (the source then has no ``store`` to share).
"""

from __future__ import annotations

import copy
from typing import Any, Dict


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
    from hydra._internal.config_repository import ConfigRepository

    if "__deepcopy__" not in vars(ConfigRepository):
        ConfigRepository.__deepcopy__ = _deepcopy_sharing_the_store  # type: ignore[attr-defined]
