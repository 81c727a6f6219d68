"""Users' own methods without forking: modules listed in ``extensions:`` are imported at the start of a run.

An extension registers losses, weak-label methods, model poolings and task formats under new names through
``w2sg.extensions`` (``register_loss``, ``register_method``, ``register_pooling``, ``register_formatter``, which
are w2sg.ml.losses', w2sg.ml.methods', w2sg.ml.poolings' and w2sg.data.formats' own); those names then work in
the config like the built-in ones. Each registry is a ``Registry`` (defined where its functions live: ``LOSSES``,
``POOLINGS``, ``FORMATTERS``; ``METHODS`` here, below the plan, which reads a method's parameters from its
signature), and every registration goes through its ``register``: ``record`` refuses to replace another function's
name and remembers which extension's import made it.

Built-in functions a registry here cannot import (core imports nothing above it, not even by name) are declared as
configuration: the entry points of the registry's group (``METHODS``: ``w2sg.methods`` in pyproject.toml, which
names the module holding w2sg's own methods), imported the first time the registry is read or added to.

Stage keys: a stage that uses a registered name (its loss, its task's ``kind``, its model's ``pooling``) carries the
version of the code behind it in its spec (``versions_used``), so editing an extension recomputes exactly the stages
that use it. The version is a hash of the extension's source, taken when it is imported: every ``.py`` file of the
top-level package the listed module belongs to (``my_project.methods``: all of ``my_project``, its helper modules
included), by path inside the package and bytes, so the same code elsewhere has the same version; a module that is
no package counts with the modules next to it that it imports. The files of the functions it registered from
elsewhere count too. The config may give the version instead (``extensions: [{module: x, version: "2"}]``); a
module's ``__version__`` does not: an edit that leaves it unchanged is still another version. An extension that
registers nothing (it changes something else) enters the key of every stage.

Light on purpose (no torch): the CLI, ``w2sg status`` and the Slurm launcher call ``load`` before planning.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import sys
import traceback
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

from w2sg.core.errors import W2SGError

# The registries an extension may add to: kind -> where the name is used in a stage's spec.
KINDS = ("loss", "task format", "pooling", "labels method")

F = TypeVar("F", bound=Callable[..., Any])


class Registry(MutableMapping):
    """Functions by name, of one ``kind`` (one of KINDS): ``registry[name]``, ``name in registry``, iteration in
    registration order. ``register(name, **attrs)`` is the decorator every ``register_*`` of w2sg is; ``attrs``
    (e.g. a method's ``needs_features``) are kept by name (``attrs(name)``).

    ``declared``: an entry-point group whose entry points (modules, or objects in them) hold built-in
    registrations this registry's own module cannot import; they are imported the first time the registry is read
    or registered to, so the built-in names are there before an extension's (and a taken name is refused as ever).
    """

    def __init__(self, kind: str, declared: Optional[str] = None) -> None:
        self.kind = kind
        self.declared = declared
        self._fns: Dict[str, Callable[..., Any]] = {}
        self._attrs: Dict[str, Dict[str, Any]] = {}
        self._loading = False
        self._loaded = declared is None

    def register(self, name: str, **attrs: Any) -> Callable[[F], F]:
        """Decorator: the config's ``name`` selects the function (also from a module listed in ``extensions:``)."""
        if not isinstance(name, str) or not name:
            raise W2SGError(f"a {self.kind} is registered under a name, a non-empty string: got {name!r} "
                            f"(decorate with @register_...(\"my_name\"), not @register_...)")

        def deco(fn: F) -> F:
            self._load_declared()
            record(self, self.kind, name, fn)
            self._attrs[name] = dict(attrs)
            return fn

        return deco

    def attrs(self, name: str) -> Dict[str, Any]:
        """The keyword arguments ``name`` was registered with (beyond the name)."""
        self._load_declared()
        return dict(self._attrs.get(name, {})) if name in self._fns else {}

    def _load_declared(self) -> None:
        if self._loaded or self._loading:  # loading: the declared modules' own registrations come back here
            return
        from importlib.metadata import entry_points

        self._loading = True
        try:
            eps = _entry_points(entry_points, self.declared) or _source_entry_points(self.declared)
            if not eps:
                raise W2SGError(f"no built-in {self.kind}s: the installed w2sg declares no entry point in group "
                                f"{self.declared!r} (its install predates them): reinstall it (pip install -e .)")
            for ep in eps:
                try:
                    ep.load()
                except Exception as e:
                    raise W2SGError(f"{self.kind}s: loading entry point {ep.name} = {ep.value} (group "
                                    f"{self.declared!r}) failed: {_where(e)}") from None
            self._loaded = True
        finally:
            self._loading = False

    def __getitem__(self, name: str) -> Callable[..., Any]:
        self._load_declared()
        return self._fns[name]

    def __setitem__(self, name: str, fn: Callable[..., Any]) -> None:  # as a dict (``record`` checks): no checks
        self._fns[name] = fn

    def __delitem__(self, name: str) -> None:  # its attrs stay: ``attrs`` reads those of names registered now
        del self._fns[name]

    def __contains__(self, name: object) -> bool:
        self._load_declared()
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        self._load_declared()
        return iter(list(self._fns))

    def __len__(self) -> int:
        self._load_declared()
        return len(self._fns)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._fns)})"


def _entry_points(entry_points: Callable[..., Any], group: Optional[str]) -> List[Any]:
    """The entry points of ``group``, each once (an install seen twice on sys.path lists them twice)."""
    seen, out = set(), []
    for ep in entry_points(group=group):
        if (ep.name, ep.value) not in seen:
            seen.add((ep.name, ep.value))
            out.append(ep)
    return out


def _source_entry_points(group: Optional[str]) -> List[Any]:
    """For w2sg run from a source checkout without an install (``PYTHONPATH=src``, e.g. the GPU check on a bare
    machine), or beside a stale install record: ``group``'s entry points as the checkout's pyproject.toml declares
    them. Empty when w2sg is not in a checkout."""
    import re
    from importlib.metadata import EntryPoint
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[3] / "pyproject.toml"
    if group is None or not pyproject.is_file():
        return []
    text = pyproject.read_text()
    table = re.search(rf'^\[project\.entry-points\."{re.escape(group)}"\]\n(.*?)(?=^\[|\Z)', text, re.M | re.S)
    pairs = re.findall(r'^\s*([\w.-]+)\s*=\s*"([^"]+)"', table.group(1), re.M) if table else []
    return [EntryPoint(name, value, group) for name, value in pairs]


# Weak-label methods (w2sg's own, numpy only, are declared in pyproject.toml's ``w2sg.methods`` entry points;
# extensions add theirs with w2sg.extensions.register_method). The plan reads a method's parameters from its
# signature, so the registry lives here, below the plan.
METHODS = Registry("labels method", declared="w2sg.methods")
NEEDS_FEATURES: set = set()  # methods that read the strong model's frozen features


def labels_methods() -> Registry:
    """The registry of weak-label methods, the built-in ones included."""
    METHODS._load_declared()
    return METHODS


@dataclass
class Registration:
    fn: Callable[..., Any]
    extension: Optional[str]  # the listed extension whose import registered it (None: w2sg itself or other code)
    source: str = ""  # hash of the function's source file when it was registered (not w2sg's own functions)


@dataclass
class Extension:
    module: str
    computed: str  # hash of its source (``_source_hash``), at import
    version: str  # what enters stage keys: the config's version when it gives one, else ``computed``
    names: List[Tuple[str, str]] = field(default_factory=list)  # (kind, name) registered by its import


_REGISTRATIONS: Dict[Tuple[str, str], Registration] = {}
_LOADED: Dict[str, Extension] = {}
_importing: List[str] = []  # the extension being imported (a stack: an extension may list another)


def _ident(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def record(registry: MutableMapping, kind: str, name: str, fn: Any) -> None:
    """Add ``fn`` to ``registry`` under ``name``; a name another function holds is an error, not a replacement.
    (``Registry.register`` calls it: register through that.)"""
    old = registry.get(name)
    if old is not None and _ident(old) != _ident(fn):  # the same function again (a module reloaded) is fine
        raise W2SGError(f"{kind} {name!r} is already registered by {_ident(old)}; {_ident(fn)} cannot take it: "
                        f"register it under another name")
    registry[name] = fn
    # w2sg's own functions are never an extension's, even when an extension's import first imports their module
    own = _in_module(fn, "w2sg")
    ext = _importing[-1] if _importing and not own else None
    _REGISTRATIONS[(kind, name)] = Registration(fn, ext, "" if own else _function_hash(fn))
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


# What ``load`` loaded last: the parsed entries, and each module's Extension with the version it was given. A run
# asks for its config's extensions three times (validation, which must see the names they register; planning, whose
# keys hold their versions, and which status and the launchers call without validating; the run's metrics): the
# first call imports and hashes them, the others return these versions.
_last: Tuple[List[Tuple[str, Optional[str]]], List[Tuple[Extension, str]]] = ([], [])


def load(entries: Iterable[Any]) -> Dict[str, str]:
    """Import the listed modules (each once per process) and return {module: version} of each. The list loaded
    last is answered from what that call set, while its extensions are still the ones loaded with those versions
    (another list, or another version of one module, sets the versions again)."""
    global _last
    parsed = parse(entries)
    listed, loaded = _last
    if parsed == listed and all(_LOADED.get(ext.module) is ext and ext.version == version for ext, version in loaded):
        return {ext.module: version for ext, version in loaded}
    for module, version in parsed:
        if module not in _LOADED:
            _import(module)
        ext = _LOADED[module]
        ext.version = version if version is not None else ext.computed
    _last = (parsed, [(_LOADED[module], _LOADED[module].version) for module, _ in parsed])
    return {ext.module: version for ext, version in _last[1]}


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
    ext.computed = ext.version = _source_hash(module, ext)


def _where(e: BaseException) -> str:
    """``SomeError: message (file.py, line n)``: the exception and the last frame it passed, without a traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return "".join(traceback.format_exception_only(type(e), e)).strip() + where


def _in_module(fn: Any, module: str) -> bool:
    name = getattr(fn, "__module__", "") or ""
    return name == module or name.startswith(module + ".")


# sha256 of a file's bytes by (path, size, mtime_ns): each file is read once per process while it is unchanged
_DIGESTS: Dict[Tuple[str, int, int], str] = {}


def _digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _DIGESTS[key]


def _package_files(folder: Path, prefix: str) -> Dict[str, Path]:
    """Every ``.py`` file under ``folder``, named by its path inside it (after ``prefix``)."""
    return {f"{prefix}/{p.relative_to(folder).as_posix()}": p for p in folder.rglob("*.py") if p.is_file()}


def _imported_siblings(path: Path) -> Dict[str, Path]:
    """A module that is no package: its file and the modules next to it that it imports (a file ``name.py`` or a
    package folder ``name/``), those modules' own such imports included. Found by reading the source, so the
    result does not depend on what was imported before."""
    folder, files, todo, done = path.parent, {path.name: path}, [path], set()
    installed = folder.name in ("site-packages", "dist-packages")  # others there are installed projects
    while todo and not installed:
        current = todo.pop()
        if current in done:
            continue
        done.add(current)
        try:
            tree = ast.parse(current.read_bytes(), str(current))
        except (SyntaxError, ValueError):  # it imported, so this cannot happen for the module itself
            continue
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.partition(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
        for name in sorted(names):
            if (folder / f"{name}.py").is_file():
                files[f"{name}.py"] = folder / f"{name}.py"
                todo.append(folder / f"{name}.py")
            elif (folder / name / "__init__.py").is_file():
                files.update(_package_files(folder / name, name))
    return files


def _source_files(module: str, ext: Extension) -> Dict[str, Path]:
    """The files behind an extension, named by where they are inside its package (not where that lies on disk)."""
    top = module.partition(".")[0]
    mod = sys.modules.get(top) or sys.modules[module]
    files: Dict[str, Path] = {}
    folders = list(getattr(mod, "__path__", None) or [])
    for i, folder in enumerate(folders):  # a package: all of its Python files (a namespace package: each part)
        files.update(_package_files(Path(folder), top if len(folders) == 1 else f"{top}[{i}]"))
    if not folders and getattr(mod, "__file__", None):
        files.update(_imported_siblings(Path(mod.__file__)))
    inside = {p.resolve() for p in files.values()}
    for kind_name in ext.names:  # functions registered from modules outside it
        fn = _REGISTRATIONS[kind_name].fn
        try:
            path = Path(inspect.getsourcefile(fn) or "")
        except TypeError:  # a builtin or C function has no source file
            continue
        if path.is_file() and path.resolve() not in inside:
            files[f"{getattr(fn, '__module__', '?')}:{path.name}"] = path
    return files


def _source_hash(module: str, ext: Extension) -> str:
    h = hashlib.sha256()
    for name, path in sorted(_source_files(module, ext).items()):
        h.update(name.encode() + b"\0" + _digest(path).encode() + b"\0")
    return "src-" + h.hexdigest()[:12]


def _function_hash(fn: Any) -> str:
    """A registered function's source file, hashed: the version of one registered outside any listed extension."""
    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        path = None
    if path and Path(path).is_file():
        return "src-" + _digest(Path(path))[:12]
    return "src-" + hashlib.sha256(_ident(fn).encode()).hexdigest()[:12]


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
            versions[str(getattr(reg.fn, "__module__", "?"))] = reg.source or _function_hash(reg.fn)
    return dict(sorted(versions.items()))
