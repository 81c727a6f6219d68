"""Users' own methods without forking: modules listed in ``extensions:`` are imported at the start of a run.

An extension registers losses (``w2sg.ml.losses.register_loss``), task formats (``w2sg.data.formats.register_formatter``)
and model poolings (``w2sg.ml.models.register_pooling``) under new names; those names then work in the config like the
built-in ones. Every registration goes through ``record``, which refuses to replace another function's name and
remembers which extension's import made it.

Stage keys: a stage that uses a registered name (its loss, its task's ``kind``, its model's ``pooling``) carries the
version of the code behind it in its spec (``versions_used``), so editing an extension recomputes exactly the stages
that use it. The version is the module's ``__version__`` when it defines one, else a hash of its source (the module's
file, every ``.py`` file of a package, and the files of the functions it registered), unless the config gives one
(``extensions: [{module: x, version: "2"}]``). An extension that registers nothing (it changes something else)
enters the key of every stage.

Light on purpose (no torch): the CLI, ``w2sg status`` and the Slurm launcher call ``load`` before planning.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from w2sg.core.errors import W2SGError

# The registries an extension may add to: kind -> where the name is used in a stage's spec.
KINDS = ("loss", "task format", "pooling", "labels method")
# Weak-label methods (w2sg.ml.methods registers the built-in ones; extensions add theirs with
# w2sg.extensions.register_method). The plan reads a method's parameters from its signature, so the registry lives
# here, below the plan; ``labels_methods`` imports the built-in ones by name, as ``load`` imports an extension.
METHODS: Dict[str, Callable[..., Any]] = {}
NEEDS_FEATURES: set = set()  # methods that read the strong model's frozen features
BUILTIN_METHODS = "w2sg.ml.methods"


def labels_methods() -> Dict[str, Callable[..., Any]]:
    """The registry of weak-label methods, with the built-in ones (numpy only) imported."""
    importlib.import_module(BUILTIN_METHODS)
    return METHODS


@dataclass
class Registration:
    fn: Callable[..., Any]
    extension: Optional[str]  # the listed extension whose import registered it (None: w2sg itself or other code)


@dataclass
class Extension:
    module: str
    computed: str  # __version__ or source hash, at import
    version: str  # what enters stage keys: the config's version when it gives one, else ``computed``
    names: List[Tuple[str, str]] = field(default_factory=list)  # (kind, name) registered by its import


_REGISTRATIONS: Dict[Tuple[str, str], Registration] = {}
_LOADED: Dict[str, Extension] = {}
_importing: List[str] = []  # the extension being imported (a stack: an extension may list another)


def _ident(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def record(registry: Dict[str, Any], kind: str, name: str, fn: Any) -> None:
    """Add ``fn`` to ``registry`` under ``name``; a name another function holds is an error, not a replacement."""
    old = registry.get(name)
    if old is not None and _ident(old) != _ident(fn):  # the same function again (a module reloaded) is fine
        raise W2SGError(f"{kind} {name!r} is already registered by {_ident(old)}; {_ident(fn)} cannot take it: "
                        f"register it under another name")
    registry[name] = fn
    # w2sg's own functions are never an extension's, even when an extension's import first imports their module
    ext = _importing[-1] if _importing and not _in_module(fn, "w2sg") else None
    _REGISTRATIONS[(kind, name)] = Registration(fn, ext)
    if ext is not None and ext in _LOADED:
        _LOADED[ext].names.append((kind, name))


def check_choice(kind: str, registry: Dict[str, Any], cfg: Any, params_of: Callable[[Any], Dict[str, Any]]
                 ) -> Dict[str, Any]:
    """A config naming one of ``registry``'s functions (``name``) with keyword arguments: an unknown name or
    parameter is an error listing the valid ones. Returns the function's parameters and their defaults."""
    name = cfg.get("name")
    if name not in registry:
        raise W2SGError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(registry))}")
    valid = params_of(registry[name])
    unknown = sorted(set(cfg) - {"name"} - set(valid))
    if unknown:
        raise W2SGError(f"{kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                        f"valid: {', '.join(valid) or '(none)'}")
    return valid


def parse(entries: Iterable[Any]) -> List[Tuple[str, Optional[str]]]:
    """``extensions:`` entries as (module, version or None): a module name, or ``{module: ..., version: ...}``."""
    out = []
    for entry in entries:
        if isinstance(entry, str) and entry:
            out.append((entry, None))
            continue
        if hasattr(entry, "keys") and entry.get("module") and set(entry.keys()) <= {"module", "version"}:
            version = entry.get("version")
            out.append((str(entry["module"]), None if version is None else str(version)))
            continue
        raise W2SGError(f"extensions: bad entry {entry!r}; each entry is a module name (my_project.methods) or "
                        f"{{module: my_project.methods, version: '2'}}")
    return out


def load(entries: Iterable[Any]) -> Dict[str, str]:
    """Import the listed modules (once per process) and return {module: version} of each."""
    versions = {}
    for module, version in parse(entries):
        if module not in _LOADED:
            _import(module)
        ext = _LOADED[module]
        ext.version = version if version is not None else ext.computed
        versions[module] = ext.version
    return versions


def _import(module: str) -> None:
    was_imported = module in sys.modules
    _LOADED[module] = ext = Extension(module, "", "")
    _importing.append(module)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        del _LOADED[module]
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise W2SGError(f"extensions: no module named {module!r} (looked in sys.path: {sys.path}); put the folder "
                            f"that holds it on PYTHONPATH, or pip install its project") from None
        raise W2SGError(f"extensions: importing {module!r} failed: {_where(e)}") from None
    except W2SGError as e:
        del _LOADED[module]
        raise W2SGError(f"extensions: importing {module!r} failed: {e}") from None
    except Exception as e:  # the module's own code raised (SyntaxError, NameError, ...): say what and where
        del _LOADED[module]
        raise W2SGError(f"extensions: importing {module!r} failed: {_where(e)}") from None
    finally:
        _importing.pop()
    if was_imported:  # imported before (by other code): its registrations are those whose function lives in it
        ext.names = [k for k, r in _REGISTRATIONS.items() if _in_module(r.fn, module)]
        for k in ext.names:
            _REGISTRATIONS[k].extension = module
    version = getattr(mod, "__version__", None)
    ext.computed = ext.version = str(version) if version is not None else _source_hash(mod, ext)


def _where(e: BaseException) -> str:
    """``SomeError: message (file.py, line n)``: the exception and the last frame it passed, without a traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return "".join(traceback.format_exception_only(type(e), e)).strip() + where


def _in_module(fn: Any, module: str) -> bool:
    name = getattr(fn, "__module__", "") or ""
    return name == module or name.startswith(module + ".")


def _source_files(mod: Any, ext: Extension) -> List[Path]:
    files = set()
    origin = getattr(mod, "__file__", None)
    if origin:
        files.add(Path(origin).resolve())
    for folder in getattr(mod, "__path__", []) or []:  # a package: all of its Python files
        files.update(p.resolve() for p in Path(folder).rglob("*.py"))
    for kind_name in ext.names:  # functions registered from helper modules elsewhere
        try:
            files.add(Path(inspect.getsourcefile(_REGISTRATIONS[kind_name].fn) or "").resolve())
        except TypeError:  # a builtin or C function has no source file
            pass
    return sorted(f for f in files if f.is_file())


def _source_hash(mod: Any, ext: Extension) -> str:
    h = hashlib.sha256()
    for f in _source_files(mod, ext):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return "src-" + h.hexdigest()[:12]


def _function_hash(fn: Any) -> str:
    """A function registered outside any listed extension (and outside w2sg): the hash of its source file."""
    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        path = None
    data = Path(path).read_bytes() if path and Path(path).is_file() else _ident(fn).encode()
    return "src-" + hashlib.sha256(data).hexdigest()[:12]


def names_used(spec: Dict[str, Any]) -> List[Tuple[str, str]]:
    """The registered names a stage's spec uses: its loss, its task's format, its model's pooling, its labels
    method."""
    used = []
    if isinstance(spec.get("loss"), dict) and spec["loss"].get("name"):
        used.append(("loss", str(spec["loss"]["name"])))
    if isinstance(spec.get("task"), dict) and spec["task"].get("kind"):
        used.append(("task format", str(spec["task"]["kind"])))
    if isinstance(spec.get("model"), dict) and spec["model"].get("pooling"):
        used.append(("pooling", str(spec["model"]["pooling"])))
    if isinstance(spec.get("method"), dict) and spec["method"].get("name"):
        used.append(("labels method", str(spec["method"]["name"])))
    return used


def versions_used(spec: Dict[str, Any]) -> Dict[str, str]:
    """{code: version} of the non-built-in code this stage uses; empty for w2sg's own losses, formats and poolings."""
    versions = {m: e.version for m, e in _LOADED.items() if not e.names and e.computed}  # changes anything
    for kind_name in names_used(spec):
        reg = _REGISTRATIONS.get(kind_name)
        if reg is None or _in_module(reg.fn, "w2sg"):
            continue  # built-in (or unknown: validation names it)
        if reg.extension is not None and reg.extension in _LOADED:
            versions[reg.extension] = _LOADED[reg.extension].version
        else:
            versions[str(getattr(reg.fn, "__module__", "?"))] = _function_hash(reg.fn)
    return dict(sorted(versions.items()))
