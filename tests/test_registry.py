"""The registries (w2sg.core.registry.Registry): one registrar for losses, methods, poolings and task formats, and
core importing nothing above it (the built-in methods come through an entry point, not by core naming w2sg.ml)."""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from w2sg.core import registry
from w2sg.core.errors import W2SGError

CORE = Path(registry.__file__).resolve().parent


def _other_layer(name: str) -> bool:
    """A w2sg module outside core (ml, data, run, app, results, extensions...)."""
    return (name == "w2sg" or name.startswith("w2sg.")) and not (name == "w2sg.core" or name.startswith("w2sg.core."))


def _imports_above_core(path: Path):
    """(line, what) of every import of a w2sg module outside core in ``path``: import statements (relative ones
    resolved) and module names given as strings to importlib.import_module / __import__ / import_module."""
    tree = ast.parse(path.read_text(), str(path))
    package = "w2sg.core"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _other_layer(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
                names = [module] if node.module else [f"{base}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            found += [(node.lineno, n) for n in names if _other_layer(n)]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _other_layer(arg.value):
                    found.append((node.lineno, arg.value))
                elif isinstance(arg, ast.Name):  # a module name held in a constant of the module
                    for assign in ast.walk(tree):
                        if (isinstance(assign, ast.Assign) and isinstance(assign.value, ast.Constant)
                                and isinstance(assign.value.value, str) and _other_layer(assign.value.value)
                                and any(getattr(t, "id", None) == arg.id for t in assign.targets)):
                            found.append((node.lineno, assign.value.value))
    return found


def test_core_imports_nothing_above_it():
    files = sorted(CORE.glob("*.py"))
    assert registry.__file__ and len(files) > 5
    bad = {f.name: hits for f in files if (hits := _imports_above_core(f))}
    assert not bad, f"w2sg.core imports w2sg modules above it: {bad}"


def test_the_import_check_sees_each_form(tmp_path):
    """The check above catches every way core could name ml (so its passing means something)."""
    for source in ("import w2sg.ml.methods\n", "from w2sg.ml import methods\n", "from ..ml.methods import x\n",
                   "import importlib\nimportlib.import_module('w2sg.ml.methods')\n",
                   "from importlib import import_module\nimport_module('w2sg.data.formats')\n",
                   "import importlib\nWHERE = 'w2sg.ml.methods'\nimportlib.import_module(WHERE)\n"):
        path = tmp_path / "m.py"
        path.write_text(source)
        assert _imports_above_core(path), source
    path = tmp_path / "ok.py"
    path.write_text("from w2sg.core.errors import W2SGError\nfrom . import paths\n# w2sg.ml.methods in a comment\n")
    assert not _imports_above_core(path)


def test_core_loads_no_module_above_it_until_the_methods_are_read_and_then_no_torch():
    """Importing every core module imports no w2sg module above core; reading the methods registry imports the
    built-in methods through the entry point (numpy only): planning stays without torch."""
    modules = [f"w2sg.core.{p.stem}" for p in sorted(CORE.glob("*.py")) if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "above = sorted(m for m in sys.modules if m.startswith('w2sg.') and not m.startswith('w2sg.core'))\n"
        "assert not above, above\n"
        "from w2sg.core.registry import METHODS, NEEDS_FEATURES, labels_methods\n"
        "assert labels_methods() is METHODS\n"
        "assert {'none', 'confidence_filter', 'probe_relabel', 'probe_filter', 'ensemble'} <= set(METHODS), METHODS\n"
        "assert {'probe_relabel', 'probe_filter'} <= NEEDS_FEATURES\n"
        "assert METHODS.attrs('probe_filter') == {'needs_features': True}\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_built_in_methods_are_declared_as_an_entry_point():
    eps = [ep for ep in importlib.metadata.entry_points(group="w2sg.methods") if ep.name == "w2sg"]
    assert eps and eps[0].value == "w2sg.ml.methods", "reinstall w2sg (pip install -e .): its metadata predates it"


def _registries():
    from w2sg.data.formats import FORMATTERS, register_formatter
    from w2sg.ml.losses import LOSSES, register_loss
    from w2sg.ml.methods import METHODS, register_method
    from w2sg.ml.poolings import POOLINGS, register_pooling

    return {  # kind: (registry, its decorator, a built-in name, where its function lives)
        "loss": (LOSSES, register_loss, "xent", "w2sg.ml.losses.xent"),
        "labels method": (METHODS, register_method, "confidence_filter", "w2sg.ml.methods.confidence_filter"),
        "pooling": (POOLINGS, register_pooling, "mean", "w2sg.ml.poolings._mean"),
        "task format": (FORMATTERS, register_formatter, "template", "w2sg.data.formats."),
    }


@pytest.mark.parametrize("kind", ["loss", "labels method", "pooling", "task format"])
def test_each_registry_refuses_another_functions_name(kind):
    reg, register, name, where = _registries()[kind]
    assert isinstance(reg, registry.Registry) and reg.kind == kind
    before, taken = dict(reg), dict(registry._REGISTRATIONS)

    def other(*args, **kwargs):
        return None

    with pytest.raises(W2SGError, match=rf"^{kind} {name!r} is already registered by {where}.*; "
                                        rf"test_registry\..*other cannot take it: register it under another name$"):
        register(name)(other)
    assert dict(reg) == before and registry._REGISTRATIONS == taken  # nothing replaced
    assert register(name)(reg[name]) is before[name]  # the same function again (a module reloaded) is fine
    assert dict(reg) == before


def test_the_public_api_is_the_registries_own_decorators():
    import w2sg.extensions as api

    for kind, (reg, register, _, _) in _registries().items():
        public = getattr(api, register.__name__)
        assert public is register, kind


@pytest.fixture
def fresh(monkeypatch):
    """Registrations made by these tests stay out of the process-wide record."""
    monkeypatch.setattr(registry, "_REGISTRATIONS", {})
    monkeypatch.setattr(registry, "_LOADED", {})


def test_a_registry_is_a_mapping_that_records_each_registration(fresh):
    reg = registry.Registry("loss")

    @reg.register("a", flag=True)
    def a():
        return 1

    reg.register("b")(len)
    assert list(reg) == ["a", "b"] and reg["a"] is a and "b" in reg and len(reg) == 2 and dict(reg)["b"] is len
    assert reg.attrs("a") == {"flag": True} and reg.attrs("b") == {} and reg.attrs("c") == {}
    assert registry._REGISTRATIONS[("loss", "a")].fn is a
    copy = dict(reg)
    reg.clear()
    assert not reg and reg.attrs("a") == {}
    reg.update(copy)  # as a test restores a snapshot
    assert reg["a"] is a and reg.attrs("a") == {"flag": True}
    with pytest.raises(KeyError):
        reg["c"]


@pytest.mark.parametrize("name", [None, "", 3, len])
def test_a_registration_needs_a_name(name, fresh):
    reg = registry.Registry("pooling")
    with pytest.raises(W2SGError, match=r"a pooling is registered under a name, a non-empty string: got .*"
                                        r"decorate with @register_...\(\"my_name\"\)"):
        reg.register(name)


class _EntryPoint:
    def __init__(self, name, value, load):
        self.name, self.value, self.load = name, value, load


def test_declared_built_ins_load_once_before_the_first_read_or_registration(monkeypatch, fresh):
    reg = registry.Registry("labels method", declared="w2sg.test_group")
    calls = []

    def builtin(probs, features):
        return probs, list(range(len(probs)))

    def load():  # as the declared module's import: its own registrations come back to the registry
        calls.append(1)
        reg.register("builtin")(builtin)

    ep = _EntryPoint("w2sg", "some.module", load)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [ep, ep] if group == "w2sg.test_group" else [])
    assert not calls  # nothing loads at the registry's creation

    def mine(probs, features):
        return probs, []

    with pytest.raises(W2SGError, match="labels method 'builtin' is already registered by .*builtin; "):
        reg.register("builtin")(mine)  # the built-in names are there before an extension's
    reg.register("mine")(mine)
    assert list(reg) == ["builtin", "mine"] and calls == [1]  # loaded once (the same entry point twice: once)


def test_an_install_without_the_declared_entry_points_says_to_reinstall(monkeypatch, fresh):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    reg = registry.Registry("labels method", declared="w2sg.test_group")
    with pytest.raises(W2SGError, match=r"no built-in labels methods: .*'w2sg.test_group'.*pip install -e \."):
        "none" in reg

    def broken():
        raise ImportError("no module named nothing_here")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [_EntryPoint("x", "nothing_here", broken)])
    with pytest.raises(W2SGError, match=r"loading entry point x = nothing_here .*ImportError: no module named"):
        list(reg)


def test_a_source_checkout_without_an_install_reads_its_pyproject(monkeypatch, fresh):
    """PYTHONPATH=src (the GPU check on a bare machine) or a stale install record: no installed entry points, the
    checkout's pyproject.toml declares them."""
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    [ep] = registry._source_entry_points("w2sg.methods")
    assert (ep.name, ep.value, ep.group) == ("w2sg", "w2sg.ml.methods", "w2sg.methods")
    assert registry._source_entry_points("w2sg.no_such_group") == []
    reg = registry.Registry("labels method", declared="w2sg.methods")
    list(reg)  # the checkout's declared module is loaded instead of the reinstall error
    assert reg._loaded
