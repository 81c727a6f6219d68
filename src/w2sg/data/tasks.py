"""Tasks: load rows with ``datasets.load_dataset``, format each into (text, label), split with a seed.

A task config names a data set (hub id or a builder such as ``json``/``csv``/``parquet`` with local
``data_files``), its splits, and a formatter from ``FORMATTERS``. The generic ``template`` formatter makes a
new classification task one YAML file; the formatters live in ``w2sg.data.formats``.

Every task yields three disjoint sets: the ground-truth train half (weak and ceiling models train on it),
the weak-label train half (the weak model labels it, w2s models train on those labels), and test. With
``task.dedupe`` (the default) they are disjoint in their texts too: the pool holds each text once (``text_key``).
"""

from __future__ import annotations

import logging
import random
import re
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from w2sg.core.errors import W2SGError
from w2sg.core.paths import resolve_path
from w2sg.data.formats import FORMATTERS, Example, label_key

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    gt: List[Example]  # train half with ground truth: weak and ceiling models train on it
    weak: List[Example]  # train half the weak model labels; w2s models train on those labels
    test: List[Example]
    # rows left out because a copy of their text was in the pool already (None: task.dedupe=false, not looked for)
    duplicates_removed: Optional[int] = None


# The rule that finds duplicate texts (task.dedupe). Its number enters every stage key of a deduplicated task
# (w2sg.core.graph.task_spec): a changed rule must come with a new number there and here.
DEDUPE_RULE = 1


def text_key(text: Any) -> Any:
    """What copies of one text share: its Unicode NFKC form, casefolded, every run of whitespace (line breaks
    included) one space, none at the ends. Punctuation stays: it carries meaning (":(" in a tweet). A pair of texts
    (pairwise tasks) is the same pair in either order: the model scores (a, b) as (b, a) with the label flipped."""
    if isinstance(text, (tuple, list)):
        return tuple(sorted(text_key(t) for t in text))
    return " ".join(unicodedata.normalize("NFKC", str(text)).casefold().split())


class _Seen:
    """The keys of the texts in the pool so far, over the train pool and the test set, and the copies left out."""

    def __init__(self) -> None:
        self.labels: Dict[Any, int] = {}  # text key -> label of the copy in the pool
        self.removed = 0  # copies left out that would have entered the pool
        self.disagreeing = 0  # of those, copies whose label differs from the kept copy's


def _oriented(text: Any, label: int) -> int:
    """A pair's label as if its texts were in text_key's order (label 1: the first text is the preferred one)."""
    if isinstance(text, (tuple, list)) and len(text) == 2 and text_key(text[0]) > text_key(text[1]):
        return 1 - label
    return label


def validate_task(cfg: Any) -> None:
    if cfg.kind not in FORMATTERS:
        raise W2SGError(f"task {cfg.name!r}: unknown kind {cfg.kind!r}; valid: {', '.join(sorted(FORMATTERS))}")
    if "train" not in cfg.splits:
        raise W2SGError(f"task {cfg.name!r}: task.splits needs a 'train' entry; got {dict(cfg.splits)}")
    if cfg.n_train < 2 or cfg.n_test < 1:
        raise W2SGError(f"task {cfg.name!r}: need n_train >= 2 and n_test >= 1, got {cfg.n_train}, {cfg.n_test}")


def _local_files(cfg: Any) -> Dict[str, str]:
    return {k: resolve_path(str(v)) for k, v in vars(cfg.data_files).items() if v is not None}


def _load_split(cfg: Any, split: str):
    """One split of the task's data set: from its local file when task.data_files has one, else from the hub."""
    import datasets

    datasets.disable_progress_bars()
    files = _local_files(cfg)
    if not files:
        return _load_hub(cfg, split)
    if split not in files:
        raise W2SGError(f"task {cfg.name!r}: split {split!r} has no local file; task.data_files has "
                        f"{', '.join(sorted(files))}. Set task.data_files.{split}=<file>, or point task.splits "
                        f"(now {dict(cfg.splits)}) at the splits you have")
    return _load_local(cfg, split, files[split])


def _load_hub(cfg: Any, split: str):
    import datasets

    try:
        return datasets.load_dataset(cfg.dataset, cfg.subset, split=split, **dict(cfg.load_kwargs or {}))
    except Exception as e:  # datasets raises many types here (offline, missing file, bad split, parse error)
        offline = _offline_error(cfg, split)
        if offline is not None:
            raise offline from None
        raise W2SGError(
            f"task {cfg.name!r}: cannot load split {split!r} of data set {cfg.dataset!r}: {_root_cause(e)}\n"
            "Hub data sets need the network or a local cache; to use local files of the same format, override "
            "e.g. task.dataset=json 'task.data_files={train: path/train.jsonl, test: path/test.jsonl}'"
        ) from None


def _offline_error(cfg: Any, split: str) -> Optional[W2SGError]:
    """For a hub data set while the hub is off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE=1, w2sg's default) that the
    datasets cache lacks: what to fetch and how (w2sg prefetch on a machine with internet); else None."""
    import datasets.config
    from datasets.naming import camelcase_to_snakecase

    from huggingface_hub import constants

    # datasets >= 2.21 has its own HF_HUB_OFFLINE (set from HF_DATASETS_OFFLINE too); earlier ones read the hub's
    # and HF_DATASETS_OFFLINE.
    offline = getattr(datasets.config, "HF_HUB_OFFLINE", None)
    if offline is None:
        offline = constants.HF_HUB_OFFLINE or getattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    if not offline or Path(cfg.dataset).expanduser().exists():
        return None
    parts = cfg.dataset.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(parts)
    if any(p.is_dir() for p in root.glob(f"{cfg.subset or '*'}/*/*")):
        return None  # cached: another cause (a bad split), for the general message
    subset = f", subset {cfg.subset}" if cfg.subset else ""
    revision = dict(cfg.load_kwargs or {}).get("revision") or "main"
    return W2SGError(
        f"task {cfg.name!r}: cannot load split {split!r} of data set {cfg.dataset!r}{subset} (revision {revision}): "
        f"it is not in the datasets cache "
        f"({datasets.config.HF_DATASETS_CACHE}), and the hub is off (HF_HUB_OFFLINE=1, w2sg's default: jobs never "
        "download). Download it once on a machine with internet (the login node): w2sg prefetch <the same "
        "overrides> (-m <overrides> for a whole sweep); or allow downloads: HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0; "
        "or use local files of the same format: task.dataset=json "
        "'task.data_files={train: path/train.jsonl, test: path/test.jsonl}'")


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost cause (datasets wraps parse errors in 'An error occurred while ...')."""
    while (e.__cause__ or e.__context__) is not None and not isinstance(e, W2SGError):
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _load_local(cfg: Any, split: str, path: str):
    """Load one local file (only that one: other splits' files cannot break it) with the task's builder.

    CSV files are decoded here, with ``load_kwargs`` ``encoding`` (default utf-8) and ``encoding_errors``
    (default strict; ``replace`` turns bytes that do not decode into U+FFFD), then parsed by pandas, so the
    result does not depend on how a datasets/pandas version passes those options on."""
    import datasets

    where = f"task {cfg.name!r}: cannot load split {split!r} from {path}"
    p = Path(path).expanduser()
    if "://" not in path and not any(c in path for c in "*?[") and not p.exists():
        raise W2SGError(f"{where}: the file does not exist (task.data_files.{split})")
    if p.is_file() and p.stat().st_size == 0:
        raise W2SGError(f"{where}: the file is empty; point task.data_files.{split} at a file with rows")
    kwargs: Dict[str, Any] = dict(cfg.load_kwargs or {})
    try:
        if cfg.dataset == "csv" and p.is_file():
            ds = _read_csv(p, kwargs)
        else:
            ds = datasets.load_dataset(cfg.dataset, cfg.subset, data_files={split: path}, split=split, **kwargs)
    except UnicodeDecodeError as e:
        raise W2SGError(f"{where}: {e}; if the file holds some bytes that are not valid text, set "
                        "'task.load_kwargs={encoding_errors: replace}' (or the file's task.load_kwargs.encoding)"
                        ) from None
    except Exception as e:  # parse errors of every builder (pyarrow, pandas, json)
        raise W2SGError(f"{where} with the {cfg.dataset!r} builder: {_root_cause(e)}; check that the file is "
                        f"{cfg.dataset} and that every row has the same columns, of the same types") from None
    if len(ds) == 0:
        raise W2SGError(f"{where}: the file has no rows (columns: {', '.join(ds.column_names) or 'none'})")
    return ds


def _read_csv(path: Path, kwargs: Dict[str, Any]):
    import io

    import datasets
    import pandas as pd

    encoding = kwargs.pop("encoding", None) or "utf-8"
    errors = kwargs.pop("encoding_errors", None) or "strict"
    text = path.read_bytes().decode(encoding, errors=errors)
    if not text.strip():
        raise ValueError("the file holds no text")
    return datasets.Dataset.from_pandas(pd.read_csv(io.StringIO(text), **kwargs), preserve_index=False)


def _template_columns(template: str) -> List[str]:
    """Column names a str.format template reads ({a}, {a[0]}, {a.b} read column a)."""
    names = [field for _, field, _, _ in string.Formatter().parse(template) if field]
    return [re.split(r"[.\[]", n, maxsplit=1)[0] for n in names]


def check_columns(ds: Any, cfg: Any, source: str) -> None:
    """A template task's label column and template fields must be columns of the data."""
    if cfg.kind != "template":
        return
    wanted = {cfg.label_column: "task.label_column"}
    wanted.update({c: "task.template" for c in _template_columns(cfg.template) if c not in wanted})
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        raise W2SGError(
            f"task {cfg.name!r}: {source} has no column {', '.join(map(repr, missing))} (read by "
            f"{', '.join(sorted({wanted[c] for c in missing}))}); its columns are: {', '.join(ds.column_names)}. "
            "Set task.label_column / task.template to columns the file has")


def _examples(ds, cfg: Any, seed: int, source: str = "the data") -> Iterator[Example]:
    """Format rows in an order fixed by the seed, skipping rows the formatter drops."""
    check_columns(ds, cfg, source)
    rng = random.Random(seed)
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    for i in order:
        row = ds[i]
        try:
            ex = FORMATTERS[cfg.kind](row, rng, cfg)
        except KeyError as e:
            raise W2SGError(
                f"task {cfg.name!r}: the {cfg.kind!r} format reads column {e.args[0]!r}, which {source} does not "
                f"have; its columns are: {', '.join(ds.column_names)}. Use a file of that format, or "
                "task.kind=template with task.template and task.label_column naming your columns") from None
        except (ValueError, TypeError) as e:
            raise _label_error(ds, cfg, source, i, e) from None
        if ex is not None:
            if not 0 <= ex[1] < cfg.num_classes:
                raise W2SGError(f"task {cfg.name!r}: label {ex[1]} (row {i} of {source}) outside "
                                f"0..{cfg.num_classes - 1}; set task.num_classes or task.label_map")
            yield ex


def _label_error(ds: Any, cfg: Any, source: str, i: int, e: Exception) -> W2SGError:
    column = cfg.label_column if cfg.kind == "template" else "label"
    if column in ds.column_names:
        values = sorted({str(v) for v in ds[column][:1000]})
        seen = ", ".join(values[:10]) + (", ..." if len(values) > 10 else "")
        example = ", ".join(f"{_quote(v)}: {c}" for c, v in enumerate(values[: cfg.num_classes]))
        return W2SGError(
            f"task {cfg.name!r}: row {i} of {source}: label {ds[i].get(column)!r} of column {column!r} is not a class "
            f"index 0..{cfg.num_classes - 1} ({type(e).__name__}: {e}); values seen: {seen}. Map them to classes "
            f"with task.label_map='{{{example}}}' on the command line, or 'label_map: {{{example}}}' in the task's "
            "YAML file (unmapped values are dropped)")
    return W2SGError(f"task {cfg.name!r}: row {i} of {source} cannot be formatted as {cfg.kind!r}: "
                     f"{type(e).__name__}: {e}; its columns are: {', '.join(ds.column_names)}")


def _take(examples: Iterator[Example], n: int, cfg: Any, seen: Optional[_Seen] = None) -> List[Example]:
    """The first ``n`` examples (balanced: as many of each class as ``n`` allows). With ``seen``, an example whose
    text (``text_key``) is in the pool already is left out, whatever its label: the copy drawn first stays."""
    quota = None
    if cfg.balance:
        quota = [n // cfg.num_classes + (1 if c < n % cfg.num_classes else 0) for c in range(cfg.num_classes)]
    out: List[Example] = []
    if n <= 0:
        return out
    for ex in examples:
        if quota is not None and quota[ex[1]] == 0:
            continue  # its class is full: not taken, and not in the pool
        if seen is not None:
            key = text_key(ex[0])
            kept = seen.labels.get(key)
            if kept is not None:
                seen.removed += 1
                seen.disagreeing += kept != _oriented(ex[0], ex[1])
                continue
            seen.labels[key] = _oriented(ex[0], ex[1])
        out.append(ex)
        if quota is not None:
            quota[ex[1]] -= 1
            if not any(quota):
                break
        elif len(out) == n:
            break
    return out


def _source(cfg: Any, split: str) -> str:
    files = _local_files(cfg)
    return files[split] if split in files else f"split {split!r} of {cfg.dataset!r}"


def load_task(cfg: Any, seed: int) -> TaskData:
    """Load, format and split a task; the same config and seed always give the same three sets.

    When the data holds fewer usable rows than task.n_train / task.n_test ask for, the sets are smaller and a
    warning says so; the sizes used are in every train stage's metrics.json (``task_sizes``) and the run's, with
    the rows left out as copies of a text already in the pool (``duplicates_removed``, task.dedupe).

    Duplicates (``text_key``) are left out while the pool is drawn, before any split: the copy drawn first stays,
    with its label, whatever the labels of the later copies; with a test split of its own, the test set is drawn
    after the train pool and leaves out the copies of its texts too. The pool still reaches its size when the data
    holds enough distinct texts.

    The sets are checked before use: a class without examples in the pool or in any set is an error naming the raw
    labels (``check_classes``); empty texts are warned about per set, and stop the run when most texts are empty
    (``check_texts``)."""
    validate_task(cfg)
    carve_test = cfg.splits.get("test") is None
    train_split = cfg.splits["train"]
    train_src = _load_split(cfg, train_split)
    n_pool = cfg.n_train + (cfg.n_test if carve_test else 0)
    # the pool's rows and their formatting: drawn with task.pool_seed when set (one pool for every seed, which the
    # seed only splits), else with the run's seed
    draw = seed if getattr(cfg, "pool_seed", None) is None else int(cfg.pool_seed)
    # duplicates leave before the split, so no text is in two of the three sets (and none twice in one)
    seen = _Seen() if getattr(cfg, "dedupe", True) else None
    pool = _take(_examples(train_src, cfg, draw, _source(cfg, train_split)), n_pool, cfg, seen)
    if carve_test:
        rng = random.Random(seed + 1)
        rng.shuffle(pool)
        test, train = pool[: cfg.n_test], pool[cfg.n_test :]
    else:
        train = pool
        test_split = cfg.splits["test"]
        test = _take(_examples(_load_split(cfg, test_split), cfg, draw, _source(cfg, test_split)), cfg.n_test, cfg,
                     seen)
    random.Random(seed + 2).shuffle(train)  # mix classes after balanced sampling
    copies = ""
    if seen is not None and seen.removed:
        copies = (f"; {seen.removed} rows were left out as copies of a text already in the pool (task.dedupe; "
                  "task.dedupe=false keeps them)")
    if len(train) < 2 or not test:
        raise W2SGError(f"task {cfg.name!r}: only {len(train)} train and {len(test)} test examples after formatting"
                        f"{copies}")
    if len(train) < cfg.n_train or len(test) < cfg.n_test:
        log.warning("task %r: task.n_train=%d and task.n_test=%d asked for, but the data gave only %d and %d "
                    "usable examples%s; the smaller sets are used (recorded as task_sizes in metrics.json)%s",
                    cfg.name, cfg.n_train, cfg.n_test, len(train), len(test),
                    " (balanced: as many of each class as the rarest allows)" if cfg.balance else "", copies)
    elif copies:
        log.info("task %r: %d rows left out as copies of a text already in the pool (%d of them with another "
                 "label: the copy drawn first keeps its own); task.dedupe=false keeps them", cfg.name, seen.removed,
                 seen.disagreeing)
    half = len(train) // 2
    parts = {"ground-truth train half": train[:half], "weak-label train half": train[half:], "test set": test}
    check_texts(cfg, parts)
    check_classes(cfg, train + test, parts, train_src)
    return TaskData(gt=train[:half], weak=train[half:], test=test,
                    duplicates_removed=None if seen is None else seen.removed)


def _is_empty(text: Any) -> bool:
    """A text with nothing but whitespace; a pair (pairwise tasks) when either of its texts is."""
    if isinstance(text, (tuple, list)):
        return any(_is_empty(t) for t in text)
    return not str(text).strip()


def check_texts(cfg: Any, parts: Dict[str, List[Example]]) -> None:
    """Empty (or whitespace-only) texts: a warning naming their count and share in each part; an error when more
    than half of all the task's texts are (the template or format reads columns that are mostly empty)."""
    where = (f"check that task.template ({cfg.template!r}) and task.label_column read the columns holding the text"
             if cfg.kind == "template" else f"check the columns the {cfg.kind!r} format reads")
    pair = " (either text of a pair)" if cfg.kind == "pairwise" else ""
    said = []
    for part, examples in parts.items():
        empty = sum(_is_empty(text) for text, _ in examples)
        if empty:
            said.append((empty, len(examples), f"{empty} of the {len(examples)} texts of the {part} "
                                               f"({empty / len(examples):.0%}) are empty or whitespace only{pair}"))
    empty, total = sum(e for e, _, _ in said), sum(len(x) for x in parts.values())
    if total and empty / total > 0.5:
        raise W2SGError(f"task {cfg.name!r}: {empty} of its {total} texts ({empty / total:.0%}) are empty or "
                        f"whitespace only{pair} ({'; '.join(s for _, _, s in said)}); more than half: {where}")
    for _, _, s in said:
        log.warning("task %r: %s; they are used as they are (%s)", cfg.name, s, where)


def _quote(value: str) -> str:
    """A label_map key as Hydra's command-line grammar reads it back."""
    plain = re.fullmatch(r"[A-Za-z0-9_.-]+", value) and value.lower() not in ("true", "false", "null", "nan", "inf")
    return value if plain or value in ("True", "False") else '"' + value.replace('"', '\\"') + '"'


def _raw_labels(cfg: Any, ds: Any) -> Optional[Dict[str, int]]:
    """The raw values of the label column and how many rows hold each (None: the format computes its labels)."""
    column = cfg.label_column if cfg.kind == "template" else "label"
    if ds is None or column not in getattr(ds, "column_names", ()):
        return None
    counts: Dict[str, int] = {}
    for v in ds[column]:
        counts[label_key(v)] = counts.get(label_key(v), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (not kv[0].lstrip("-").isdigit(),
                                                        int(kv[0]) if kv[0].lstrip("-").isdigit() else 0, kv[0])))


def check_classes(cfg: Any, pool: List[Example], parts: Dict[str, List[Example]], ds: Any = None) -> None:
    """Every class 0..num_classes-1 must have examples in the pool and in each of the three sets: a class without
    any makes a degenerate task (no AUROC, a head output never trained), which the error names with the raw labels
    seen and the override that maps them."""
    named = {"pool (train + test)": pool, **parts}
    for part, examples in named.items():
        counts = [0] * cfg.num_classes
        for _, y in examples:
            counts[y] += 1
        empty = [c for c, n in enumerate(counts) if n == 0]
        if not empty:
            continue
        msg = (f"task {cfg.name!r}: class{'es' if len(empty) > 1 else ''} {', '.join(map(str, empty))} of "
               f"task.num_classes={cfg.num_classes} {'have' if len(empty) > 1 else 'has'} no example in the {part} "
               f"(class counts: {', '.join(f'{c}: {n}' for c, n in enumerate(counts))})")
        raw = _raw_labels(cfg, ds)
        if raw is not None:
            column = cfg.label_column if cfg.kind == "template" else "label"
            shown = list(raw.items())
            msg += (f"; raw labels of column {column!r} (value: rows): "
                    + ", ".join(f"{v}: {n}" for v, n in shown[:20]) + (", ..." if len(shown) > 20 else ""))
        if part == "pool (train + test)" and raw is not None and cfg.kind == "template" and 2 <= len(raw) <= 20:
            mapping = ", ".join(f"{_quote(v)}: {c}" for c, v in enumerate(raw))
            fix = f"task.label_map='{{{mapping}}}'"
            if len(raw) != cfg.num_classes:
                fix += f" task.num_classes={len(raw)}"
            msg += (f". Map the raw labels to the classes 0..{len(raw) - 1}: {fix} (or keep the labels you want: "
                    "unmapped values are dropped)")
        elif part == "pool (train + test)":
            msg += ". Set task.num_classes to the classes the data has, or map its labels with task.label_map"
        else:
            msg += (". The set is too small or too unbalanced to hold every class: raise task.n_train / task.n_test, "
                    "or set task.balance=true")
        raise W2SGError(msg)
