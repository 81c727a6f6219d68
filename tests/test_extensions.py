"""``extensions:``: users' own losses, task formats and poolings from a module outside the package."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers import TINY, compose, run_w2sg

from w2sg.core import registry as extensions
from w2sg.core.errors import W2SGError

EXT_DIR = Path(__file__).resolve().parent / "ext_pkg"
EXT = "w2sg_test_methods"
USE_EXT = [f"extensions=[{EXT}]", "loss.name=ext_scaled_xent", "+loss.scale=3", "strong.pooling=ext_max"]


@pytest.fixture
def isolated(monkeypatch):
    """Registries and loaded extensions as they were before the test (an extension's import is process-wide)."""
    from w2sg.data.formats import FORMATTERS
    from w2sg.ml.losses import LOSSES
    from w2sg.ml.poolings import POOLINGS

    extensions.labels_methods()  # the built-in methods, before the snapshot
    saved = [(d, dict(d)) for d in (LOSSES, POOLINGS, FORMATTERS, extensions.METHODS, extensions._REGISTRATIONS,
                                    extensions._LOADED)]
    features = set(extensions.NEEDS_FEATURES)
    modules = set(sys.modules)
    monkeypatch.syspath_prepend(str(EXT_DIR))

    def restore():
        """As before the test: the next ``load`` imports the extensions afresh (a new process, as far as they see)."""
        for d, copy in saved:
            d.clear()
            d.update(copy)
        extensions.NEEDS_FEATURES.clear()
        extensions.NEEDS_FEATURES.update(features)
        for name in set(sys.modules) - modules:  # the extensions' modules (not libraries they imported first: numpy
            if name.startswith("w2sg_test"):   # and torch cannot be imported twice in one process)
                del sys.modules[name]

    yield restore
    restore()


def keys(overrides):
    from w2sg.core.plan import plan

    return {name: s for name, s in plan(compose(overrides)).items()}


def test_an_extensions_names_validate_only_when_it_is_listed(isolated):
    from w2sg.app.config import validate

    names = ["loss.name=ext_scaled_xent", "weak.pooling=ext_max", "task.kind=ext_upper"]
    for override in names:
        with pytest.raises(W2SGError, match="unknown"):
            validate(compose(["pair=tiny", override]), [])
    validate(compose(["pair=tiny", f"extensions=[{EXT}]", *names]), [])


def test_only_stages_using_an_extensions_names_carry_its_version(isolated):
    plain = keys(["pair=tiny"])
    listed = keys(["pair=tiny", f"extensions=[{EXT}]"])  # listed, but nothing of it used: the same stages
    assert {k: s.key for k, s in listed.items()} == {k: s.key for k, s in plain.items()}
    used = keys(["pair=tiny", *USE_EXT])
    version = extensions._LOADED[EXT].version
    assert version.startswith("src-")  # no __version__: a hash of its source
    assert {k for k, s in used.items() if s.spec.get("extensions") == {EXT: version}} == {"ceiling", "w2s"}
    assert used["weak"].key == plain["weak"].key and used["weak_labels"].key == plain["weak_labels"].key


def test_an_extensions_labels_method_transforms_the_weak_labels_and_enters_the_key(isolated):
    import numpy as np

    from w2sg.ml.methods import build_training_set

    method = ["labels.name=ext_keep_confident", "+labels.threshold=0.7"]
    with pytest.raises(W2SGError, match="unknown labels method 'ext_keep_confident'; valid: confidence_filter"):
        keys(["pair=tiny", *method])
    stages = keys(["pair=tiny", f"extensions=[{EXT}]", *method])
    spec = stages["train_labels"].spec
    assert spec["method"] == {"name": "ext_keep_confident", "threshold": 0.7}
    assert spec["extensions"] == {EXT: extensions._LOADED[EXT].version}
    assert "extensions" not in stages["weak"].spec and stages["w2s"].inputs["labels"] is stages["train_labels"]
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8], [0.35, 0.65]], dtype=np.float32)
    ts = build_training_set(spec, probs, None, [0, 1, 1, 1])
    assert ts.rows.tolist() == [0, 2] and np.array_equal(ts.probs, probs[[0, 2]]) and ts.n_dropped == 2


def test_a_version_given_in_the_config_replaces_the_hash(isolated):
    v1 = keys(["pair=tiny", *USE_EXT[1:], f"extensions=[{{module: {EXT}, version: '1'}}]"])
    v2 = keys(["pair=tiny", *USE_EXT[1:], f"extensions=[{{module: {EXT}, version: '2'}}]"])
    assert v1["w2s"].spec["extensions"] == {EXT: "1"} and v2["w2s"].spec["extensions"] == {EXT: "2"}
    assert {k for k in v1 if v1[k].key != v2[k].key} == {"ceiling", "w2s"}


def test_a_run_imports_its_extensions_once_and_each_list_gets_its_own_versions(isolated, monkeypatch):
    """Validation, planning and the run's metrics all ask for the config's extensions: one import (and hash) of
    each; asking for another version of the same module, and back, gives each list its own versions."""
    from w2sg.app.config import validate
    from w2sg.core.plan import plan

    imported, real = [], extensions._import
    monkeypatch.setattr(extensions, "_import", lambda module: imported.append(module) or real(module))
    cfg = compose(["pair=tiny", *USE_EXT])
    validate(cfg, [])
    planned = plan(cfg)
    versions = {EXT: extensions._LOADED[EXT].computed}
    assert extensions.load(cfg.extensions) == planned["w2s"].spec["extensions"] == versions
    assert imported == [EXT]
    given = [{"module": EXT, "version": "1"}]
    assert extensions.load(given) == {EXT: "1"} and extensions.load(cfg.extensions)[EXT].startswith("src-")
    assert extensions.load(given) == {EXT: "1"} and plan(cfg)["w2s"].spec["extensions"][EXT].startswith("src-")
    assert imported == [EXT]


def test_an_extension_that_registers_nothing_enters_every_key(isolated, tmp_path, monkeypatch):
    """Its ``__version__`` is not its version: an edit that leaves it as it was still changes the keys."""
    patch = tmp_path / "w2sg_test_patch.py"
    patch.write_text("__version__ = '0.3'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    stages = keys(["pair=tiny", "extensions=[w2sg_test_patch]"])
    version = extensions._LOADED["w2sg_test_patch"].version
    assert version.startswith("src-") and all(s.spec["extensions"] == {"w2sg_test_patch": version}
                                              for s in stages.values())
    isolated()
    patch.write_text("__version__ = '0.3'\nPATCHED = True\n")
    edited = keys(["pair=tiny", "extensions=[w2sg_test_patch]"])
    assert all(edited[k].key != stages[k].key for k in stages)


PKG_USE = ["pair=tiny", "extensions=[w2sg_test_pkg.methods]", "labels.name=ext_pkg_keep_confident",
           "+labels.threshold=0.7"]


def test_editing_a_helper_module_of_an_extensions_package_changes_its_version(isolated, tmp_path, monkeypatch):
    """The version covers every source file of the listed module's top-level package, by its path inside the
    package: the same package elsewhere keeps its keys (its stages are reused), an edited helper changes them."""
    for where in ("a", "b"):
        shutil.copytree(EXT_DIR / "w2sg_test_pkg", tmp_path / where / "w2sg_test_pkg")
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    first = keys(PKG_USE)
    version = extensions._LOADED["w2sg_test_pkg.methods"].version
    assert first["train_labels"].spec["extensions"] == {"w2sg_test_pkg.methods": version}
    assert version.startswith("src-")
    isolated()
    monkeypatch.syspath_prepend(str(tmp_path / "b"))  # found first now: the same files at another path
    moved = keys(PKG_USE)
    assert sys.modules["w2sg_test_pkg"].__file__.startswith(str(tmp_path / "b"))
    assert {k: s.key for k, s in moved.items()} == {k: s.key for k, s in first.items()}, "unchanged: reused"
    isolated()
    helper = tmp_path / "b" / "w2sg_test_pkg" / "helpers.py"
    helper.write_text(helper.read_text().replace(">= threshold", "> threshold"))
    edited = keys(PKG_USE)
    assert extensions._LOADED["w2sg_test_pkg.methods"].version != version
    assert {k for k in first if first[k].key != edited[k].key} == {"train_labels", "w2s"}  # w2s trains on its labels
    isolated()
    given = keys([*PKG_USE[:1], "extensions=[{module: w2sg_test_pkg.methods, version: '7'}]", *PKG_USE[2:]])
    assert given["train_labels"].spec["extensions"] == {"w2sg_test_pkg.methods": "7"}, "a version given wins"


def test_a_single_module_extension_counts_the_modules_next_to_it_that_it_imports(isolated, tmp_path, monkeypatch):
    (tmp_path / "w2sg_test_flat.py").write_text(
        "from w2sg.extensions import register_method\nimport w2sg_test_flat_helpers as h\n\n\n"
        "@register_method('ext_flat')\ndef flat(probs, features):\n    return h.same(probs)\n")
    helper = tmp_path / "w2sg_test_flat_helpers.py"
    helper.write_text("import numpy as np\n\n\ndef same(probs):\n    return probs, np.arange(len(probs))\n")
    (tmp_path / "w2sg_test_other.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    use = ["pair=tiny", "extensions=[w2sg_test_flat]", "labels.name=ext_flat"]
    first = keys(use)["train_labels"].key
    isolated()
    (tmp_path / "w2sg_test_other.py").write_text("X = 2\n")  # next to it, but not imported by it
    assert keys(use)["train_labels"].key == first
    isolated()
    helper.write_text(helper.read_text() + "# edited\n")
    assert keys(use)["train_labels"].key != first


def test_planning_reads_no_source_file_after_the_import(isolated, tmp_path, monkeypatch):
    """Versions are hashed once, at import (a function registered by a module not listed: when registered), so
    the keys of thousands of stages cost no file reads."""
    import importlib

    (tmp_path / "w2sg_test_unlisted.py").write_text(
        "from w2sg.extensions import register_method\n\n\n"
        "@register_method('ext_unlisted')\ndef unlisted(probs, features):\n    return probs, list(range(len(probs)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("w2sg_test_unlisted")
    use = ["pair=tiny", *USE_EXT, "labels.name=ext_unlisted"]
    before = keys(use)

    class NoReads(type(Path())):
        def read_bytes(self):
            raise AssertionError(f"read {self} while planning")

    monkeypatch.setattr(extensions, "Path", NoReads)
    planned = keys(use)
    assert planned["w2s"].spec["extensions"] == {EXT: extensions._LOADED[EXT].version}
    assert planned["train_labels"].spec["extensions"]["w2sg_test_unlisted"].startswith("src-")
    assert {k: s.key for k, s in planned.items()} == {k: s.key for k, s in before.items()}


def test_bad_extensions_name_the_module_and_what_went_wrong(isolated, tmp_path, monkeypatch):
    with pytest.raises(W2SGError, match=r"no module named 'no_such_w2sg_ext' \(looked in sys.path: .*PYTHONPATH"):
        extensions.load(["no_such_w2sg_ext"])
    (tmp_path / "w2sg_test_broken.py").write_text("import os\n\nundefined_name + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(W2SGError, match=r"importing 'w2sg_test_broken' failed: NameError.*w2sg_test_broken.py, line 3"):
        extensions.load(["w2sg_test_broken"])
    with pytest.raises(W2SGError, match="bad entry"):
        extensions.load([{"mod": EXT}])


def test_a_taken_name_is_refused(isolated):
    from w2sg.ml.losses import register_loss

    with pytest.raises(W2SGError, match="loss 'xent' is already registered by w2sg.ml.losses.xent"):
        register_loss("xent")(lambda logits, labels, step_frac: logits.sum())


@pytest.mark.slow  # keeps the default suite under 5 minutes; CI runs -m slow too
def test_an_extensions_loss_trains_w2s_through_the_real_entrypoint(tmp_path, store, capsys):
    """The module lives outside the package (on PYTHONPATH); its loss trains w2s, its version is in the keys and
    editing it recomputes exactly the stages using it; `w2sg report` lists the run."""
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    shutil.copy(EXT_DIR / f"{EXT}.py", ext_dir)
    calls = tmp_path / "calls.txt"
    env = {"PYTHONPATH": str(ext_dir), "W2SG_TEST_EXT_CALLS": str(calls)}
    args = TINY + ["logger=none", "hydra.run.dir=outputs/run1", *USE_EXT]
    run_w2sg(args, tmp_path, env, subprocess=True)  # PYTHONPATH, and a fresh import after the module's edit
    m = json.loads((tmp_path / "outputs/run1/metrics.json").read_text())
    assert m["loss"] == "ext_scaled_xent" and list(m["extensions"]) == [EXT]
    lines = calls.read_text().splitlines()
    assert lines and set(lines) == {"scale=3 batch=32"}  # w2s only: ground-truth stages train with xent

    def spec(name):
        return json.loads((store / "stages" / m["stages"][name]["key"] / "meta.json").read_text())["spec"]

    assert spec("w2s")["loss"] == {"name": "ext_scaled_xent", "scale": 3}
    assert spec("w2s")["extensions"] == spec("ceiling")["extensions"] == m["extensions"]
    assert "extensions" not in spec("weak")

    (ext_dir / f"{EXT}.py").write_text((ext_dir / f"{EXT}.py").read_text() + "\n# a new version\n")
    run_w2sg([a.replace("run1", "run2") for a in args], tmp_path, env, subprocess=True)
    m2 = json.loads((tmp_path / "outputs/run2/metrics.json").read_text())
    assert m2["extensions"][EXT] != m["extensions"][EXT]
    assert {k for k, s in m2["stages"].items() if not s["reused"]} == {"ceiling", "w2s"}
    assert {k for k in m["stages"] if m["stages"][k]["key"] != m2["stages"][k]["key"]} == {"ceiling", "w2s"}

    from w2sg.results.report import main as report

    assert report([str(tmp_path / "outputs")]) == 0
    assert "tiny_random -> tiny_random_l2 ext_scaled_xent" in capsys.readouterr().out
