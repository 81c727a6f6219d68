"""torch, imported on first use: modules whose registries the config is checked against (losses, poolings) load
without it, so ``w2sg status``, the Slurm launcher's planning and config errors do not wait for torch."""

from __future__ import annotations

import importlib
import types
from typing import Any


class LazyModule(types.ModuleType):
    """A stand-in for a module that imports it at the first attribute access (never touches sys.modules)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_module"] = None

    def __getattr__(self, attr: str) -> Any:
        module = self.__dict__["_module"]
        if module is None:
            module = self.__dict__["_module"] = importlib.import_module(self.__name__)
        return getattr(module, attr)


torch = LazyModule("torch")
F = LazyModule("torch.nn.functional")
