"""``w2sg prefetch``: download every hub model and data set a run or sweep needs into the Hugging Face cache, once,
on a machine with internet (the login node); its jobs then start offline (``HF_HUB_OFFLINE=1``, w2sg's default).

    w2sg prefetch [--dry-run] <overrides>            what the run of these overrides needs
    w2sg prefetch -m [--dry-run] <overrides>         what every job of that sweep needs (each once)

Lists each hub model (with its revision and the files a run loads: weights, config, tokenizer) and each hub data set
(with its subset and revision), and whether it is cached already; then downloads what is missing (retried a few
times), and ends with a summary. Exit status 1 when a download failed (each is named with its error), 2 for a bad
override. Local paths, ``pkg://`` files, GGUF files, random models built from ``arch`` and local data files need
nothing. --dry-run lists without downloading.

Models are downloaded with ``huggingface_hub.snapshot_download`` (only the files ``from_pretrained`` reads: the
safetensors weights, or the ``*.bin`` ones where a repository has no safetensors, config, generation config and
tokenizer files) into the hub cache ($HF_HOME/hub). Data sets with ``datasets.load_dataset`` (the subset, revision
and load_kwargs of the task), which prepares them in the datasets cache ($HF_HOME/datasets): what an offline
``load_dataset`` reads (the datasets library looks up the hub only when online).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple


ATTEMPTS = 3  # tries per download
RETRY_WAIT = 5.0  # seconds before the 2nd try, doubled before each further one

CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = ["tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.model",
                   "*.tiktoken", "chat_template*"]
SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
PYTORCH_BIN = ["*.bin", "*.bin.index.json"]
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "imagefolder", "audiofolder")


@dataclass
class Need:
    """One thing to download: a hub model (repo at revision; ``parts``: weights, config, tokenizer) or a hub data
    set (repo, subset, load_kwargs incl. revision). ``users``: the config names that need it (models, tasks)."""

    kind: str  # "model" | "dataset"
    repo: str
    revision: Optional[str] = None
    subset: Optional[str] = None
    load_kwargs: Dict[str, Any] = field(default_factory=dict)
    parts: Set[str] = field(default_factory=set)
    users: List[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.repo + (f" ({self.subset})" if self.subset else "")

    def describe(self) -> str:
        return f"{self.kind} {self.label} (revision {self.revision or 'main'})"


# ----------------------------------------------------------------------------------------------- what a run needs


def is_hub_id(path: str) -> bool:
    """Whether a model path names a hub repository (not pkg://, not a local folder or a GGUF file), as
    w2sg.core.paths.check_model_path tells them apart."""
    from w2sg.core.paths import PKG_SCHEME, is_gguf

    if not path or path.startswith(PKG_SCHEME) or is_gguf(path) or Path(path).expanduser().exists():
        return False
    return not (path.startswith((".", "/", "~")) or path.count("/") > 1)


def model_needs(m: Any) -> List[Tuple[str, Optional[str], Set[str]]]:
    """(hub repo, revision, parts) a model config loads, as w2sg.ml.models does: weights and config unless the model
    is random (random_init; with arch not even its config), and the tokenizer from ``tokenizer`` (no revision) or
    the model's own repository."""
    found: List[Tuple[str, Optional[str], Set[str]]] = []
    own: Set[str] = set()
    if m.random_init is None:
        own |= {"weights", "config"}
    elif m.arch is None:
        own.add("config")
    if m.tokenizer:
        if is_hub_id(m.tokenizer):
            found.append((m.tokenizer, None, {"tokenizer"}))
    else:
        own.add("tokenizer")
    if own and is_hub_id(m.path):
        found.insert(0, (m.path, m.revision or None, own))
    return found


def task_need(t: Any) -> Optional[Need]:
    """The hub data set a task loads; None for local files (task.data_files) and local builders or folders."""
    files = {k: v for k, v in vars(t.data_files).items() if v is not None} if t.data_files is not None else {}
    if files or t.dataset in LOCAL_BUILDERS or Path(str(t.dataset)).expanduser().exists():
        return None
    kwargs = dict(t.load_kwargs or {})
    return Need("dataset", t.dataset, kwargs.get("revision"), t.subset, kwargs, users=[t.name])


def _stages(cfg: Any) -> Iterator[Any]:
    """Every stage of the run's plan and, recursively, of their inputs (each once)."""
    from w2sg.core.plan import plan

    todo, seen = list(plan(cfg).values()), set()
    while todo:
        stage = todo.pop(0)
        if id(stage) in seen:
            continue
        seen.add(id(stage))
        yield stage
        todo.extend(stage.inputs.values())


def collect(jobs: Sequence[Sequence[str]]) -> List[Need]:
    """What the jobs (override lists) need from the hub, each model (repo, revision) and data set once."""
    from w2sg.app.config import compose, resolve

    needs: Dict[Tuple, Need] = {}
    for overrides in jobs:
        cfg = resolve(compose(overrides))
        for stage in _stages(cfg):
            if stage.model is None:
                continue
            for repo, revision, parts in model_needs(stage.model):
                need = needs.setdefault(("model", repo, revision), Need("model", repo, revision))
                need.parts |= parts
                if stage.model.name not in need.users:
                    need.users.append(stage.model.name)
        data = task_need(cfg.task)
        if data is not None:
            key = ("dataset", data.repo, data.subset, repr(sorted(data.load_kwargs.items())))
            if key not in needs:
                needs[key] = data
            elif cfg.task.name not in needs[key].users:
                needs[key].users.append(cfg.task.name)
    return sorted(needs.values(), key=lambda n: (n.kind != "model", n.repo, _natural(n.revision), n.subset or ""))


def _natural(text: Optional[str]) -> List[Any]:
    """A sort key that orders numbers within text by value (step8000 before step36000)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", text or "") if p]


# ------------------------------------------------------------------------------------------------- what is cached


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def datasets_cache() -> Path:
    import datasets.config

    return Path(datasets.config.HF_DATASETS_CACHE)


def snapshot_folder(repo: str, revision: Optional[str], repo_type: str = "model") -> Optional[Path]:
    """The cached snapshot of a repository at a revision (branch, tag or commit), None if there is none."""
    root = hub_cache() / f"{repo_type}s--{repo.replace('/', '--')}"
    revision = revision or "main"
    ref = root / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision if re.fullmatch(r"[0-9a-f]{40}", revision) else None
    folder = root / "snapshots" / commit if commit else None
    return folder if folder is not None and folder.is_dir() else None


def _weights_cached(folder: Path) -> bool:
    import json

    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = set(json.loads((folder / index).read_text()).get("weight_map", {}).values())
            return bool(shards) and all((folder / s).is_file() for s in shards)
    return any(p.is_file() for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern))


def model_cached(repo: str, revision: Optional[str], parts: Set[str]) -> bool:
    """Whether the hub cache holds what a run loads of this model (its ``parts``) at that revision."""
    folder = snapshot_folder(repo, revision)
    if folder is None:
        return False
    if "config" in parts and not (folder / "config.json").is_file():
        return False
    if "tokenizer" in parts and not any((folder / f).is_file() for f in
                                        ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json")):
        return False
    return "weights" not in parts or _weights_cached(folder)


def dataset_folder(repo: str) -> Path:
    """Where the datasets library prepares a hub data set (its offline loader reads any version found there)."""
    from datasets.naming import camelcase_to_snakecase

    parts = repo.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    return datasets_cache() / "___".join(parts)


def dataset_cached(repo: str, subset: Optional[str]) -> bool:
    """Whether an offline ``load_dataset(repo, subset)`` finds it prepared (a <config>/<version>/<hash> folder)."""
    root = dataset_folder(repo)
    configs = [root / subset] if subset else [p for p in root.glob("*") if p.is_dir()]
    return any(p.is_dir() for c in configs for p in c.glob("*/*"))


def is_cached(need: Need) -> bool:
    if need.kind == "model":
        return model_cached(need.repo, need.revision, need.parts)
    return dataset_cached(need.repo, need.subset)


# ---------------------------------------------------------------------------------------------------- downloading


@contextmanager
def hub_on() -> Iterator[None]:
    """The hub allowed for this process while downloading (w2sg's runs default to HF_HUB_OFFLINE=1; huggingface_hub
    and datasets read the variables when imported, so their constants are set too), as before afterwards."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env = {n: os.environ.get(n) for n in names}
    os.environ.update({n: "0" for n in names})
    from huggingface_hub import constants

    import datasets.config

    saved = [(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)]
    saved += [(datasets.config, n, getattr(datasets.config, n)) for n in names if hasattr(datasets.config, n)]
    for module, name, _ in saved:
        setattr(module, name, False)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for n, value in saved_env.items():
            if value is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = value


def repo_files(repo: str, revision: Optional[str]) -> List[str]:
    """The files of a model repository at a revision (asks the hub)."""
    from huggingface_hub import HfApi

    return HfApi().list_repo_files(repo, revision=revision)


def allow_patterns(need: Need) -> List[str]:
    """The files of a model repository that from_pretrained reads for the parts needed: the safetensors weights,
    or the pytorch ones where the repository has no safetensors (at that revision: Pythia's early checkpoints)."""
    patterns = list(CONFIG_FILES)
    if "tokenizer" in need.parts:
        patterns += TOKENIZER_FILES
    if "weights" in need.parts:
        files = repo_files(need.repo, need.revision)
        patterns += SAFETENSORS if any(f.endswith(".safetensors") for f in files) else PYTORCH_BIN
    return patterns


def _size(path: Path) -> int:
    """Bytes of the files under path (blobs, not the snapshot's links to them)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                try:
                    total += os.stat(p).st_size
                except OSError:
                    pass
    return total


def download(need: Need) -> None:
    """Fetch one thing into the caches (the hub allowed: see hub_on)."""
    if need.kind == "model":
        from huggingface_hub import snapshot_download

        snapshot_download(need.repo, revision=need.revision, allow_patterns=allow_patterns(need))
    else:
        import datasets

        datasets.load_dataset(need.repo, need.subset, **need.load_kwargs)


def fetch(need: Need, attempts: int = ATTEMPTS, wait: Optional[float] = None) -> Tuple[int, Optional[str]]:
    """Download with retries: (bytes added to the caches, None) or (bytes, the last error)."""
    wait = RETRY_WAIT if wait is None else wait
    where = [hub_cache() / f"{need.kind}s--{need.repo.replace('/', '--')}"]
    if need.kind == "dataset":
        where.append(dataset_folder(need.repo))
    before = sum(_size(p) for p in where)
    error = None
    for attempt in range(1, attempts + 1):
        try:
            download(need)
            error = None
            break
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001  (any failure of a download is retried, then reported)
            text = str(e).strip().splitlines()
            error = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
            print(f"  try {attempt}/{attempts} failed: {error}", file=sys.stderr, flush=True)
            if attempt < attempts:
                time.sleep(wait * 2 ** (attempt - 1))
    if error is None and not is_cached(need):
        error = "downloaded, but the cache still lacks files a run loads (see the listing of the repository)"
    return max(sum(_size(p) for p in where) - before, 0), error


# ---------------------------------------------------------------------------------------------------- the command


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def rows(needs: Sequence[Need], cached: Sequence[bool]) -> List[Dict[str, str]]:
    return [{"kind": n.kind, "name": n.label, "revision": n.revision or "main",
             "files": ",".join(p for p in ("weights", "config", "tokenizer") if p in n.parts) or "data",
             "state": "cached" if c else "missing", "used by": ",".join(n.users)} for n, c in zip(needs, cached)]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="w2sg prefetch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--multirun", action="store_true", help="expand the overrides as a sweep")
    parser.add_argument("--dry-run", action="store_true", help="list what is needed and cached; download nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for a run or sweep")
    args = parser.parse_args(argv)

    from w2sg.app.config import expand_sweep
    from w2sg.app.status import input_error, render

    try:
        jobs = expand_sweep(args.overrides) if args.multirun else [args.overrides]
        needs = collect(jobs)
    except Exception as e:
        return input_error(e, "w2sg prefetch")
    runs = f"{len(jobs)} runs need" if len(jobs) != 1 else "1 run needs"
    models = sum(n.kind == "model" for n in needs)
    counts = f"{_plural(models, 'model')}, {_plural(len(needs) - models, 'data set')}"
    if not needs:
        print(f"{runs} nothing from the hub (local or packaged models and data)")
        return 0
    cached = [is_cached(n) for n in needs]
    print(render(rows(needs, cached), ["kind", "name", "revision", "files", "state", "used by"]))
    missing = [n for n, c in zip(needs, cached) if not c]
    if args.dry_run or not missing:
        print(f"\n{runs} {counts}: {len(needs) - len(missing)} cached, {len(missing)} missing"
              + (" (dry run: nothing downloaded)" if args.dry_run and missing else ""))
        return 0
    total, failed = 0, []
    with hub_on():
        for i, need in enumerate(missing, 1):
            print(f"[{i}/{len(missing)}] downloading {need.describe()} ...", flush=True)
            added, error = fetch(need)
            total += added
            if error:
                failed.append((need, error))
            else:
                print(f"  done ({human(added)})", flush=True)
    print(f"\n{runs} {counts}: {len(needs) - len(missing)} were cached, {len(missing) - len(failed)} downloaded "
          f"({human(total)}), {len(failed)} failed")
    for need, error in failed:
        print(f"failed: {need.describe()}: {error}", file=sys.stderr)
    if failed:
        print("w2sg prefetch needs the hub: run it on a machine with internet (the login node); a repository that "
              "needs a login: huggingface-cli login (or HF_TOKEN)", file=sys.stderr)
    return 1 if failed else 0
