"""Tasks: load rows with ``datasets.load_dataset``, format each into (text, label), split with a seed.

A task config names a data set (hub id or a builder such as ``json``/``csv``/``parquet`` with local
``data_files``), its splits, and a formatter from ``FORMATTERS``. The generic ``template`` formatter makes a
new classification task one YAML file; the formatters live in ``w2sg.task_formats``.

Every task yields three disjoint sets: the ground-truth train half (weak and ceiling models train on it),
the weak-label train half (the weak model labels it, w2s models train on those labels), and test.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List

from w2sg.errors import W2SGError
from w2sg.models import resolve_path
from w2sg.task_formats import FORMATTERS, Example


@dataclass
class TaskData:
    gt: List[Example]  # train half with ground truth: weak and ceiling models train on it
    weak: List[Example]  # train half the weak model labels; w2s models train on those labels
    test: List[Example]


def validate_task(cfg: Any) -> None:
    if cfg.kind not in FORMATTERS:
        raise W2SGError(f"task {cfg.name!r}: unknown kind {cfg.kind!r}; valid: {', '.join(sorted(FORMATTERS))}")
    if "train" not in cfg.splits:
        raise W2SGError(f"task {cfg.name!r}: task.splits needs a 'train' entry; got {dict(cfg.splits)}")
    if cfg.n_train < 2 or cfg.n_test < 1:
        raise W2SGError(f"task {cfg.name!r}: need n_train >= 2 and n_test >= 1, got {cfg.n_train}, {cfg.n_test}")


def _load_split(cfg: Any, split: str):
    import datasets

    datasets.disable_progress_bars()
    kwargs: Dict[str, Any] = dict(cfg.load_kwargs or {})
    files = {k: resolve_path(str(v)) for k, v in cfg.data_files.items() if v is not None}
    if files:
        kwargs["data_files"] = files
    where = f"{cfg.dataset!r}" + (f" (data_files={kwargs['data_files']})" if "data_files" in kwargs else "")
    try:
        return datasets.load_dataset(cfg.dataset, cfg.subset, split=split, **kwargs)
    except Exception as e:  # datasets raises many types here (offline, missing file, bad split, parse error)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise W2SGError(
            f"task {cfg.name!r}: cannot load split {split!r} of data set {where}: {first}\n"
            "Hub data sets need the network or a local cache; to use local files of the same format, override "
            "e.g. task.dataset=json 'task.data_files={train: path/train.jsonl, test: path/test.jsonl}'"
        ) from None


def _examples(ds, cfg: Any, seed: int) -> Iterator[Example]:
    """Format rows in an order fixed by the seed, skipping rows the formatter drops."""
    rng = random.Random(seed)
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    for i in order:
        ex = FORMATTERS[cfg.kind](ds[i], rng, cfg)
        if ex is not None:
            if not 0 <= ex[1] < cfg.num_classes:
                raise W2SGError(f"task {cfg.name!r}: label {ex[1]} outside 0..{cfg.num_classes - 1}")
            yield ex


def _take(examples: Iterator[Example], n: int, cfg: Any) -> List[Example]:
    if not cfg.balance:
        out = []
        for ex in examples:
            out.append(ex)
            if len(out) == n:
                break
        return out
    quota = [n // cfg.num_classes + (1 if c < n % cfg.num_classes else 0) for c in range(cfg.num_classes)]
    out = []
    for ex in examples:
        if quota[ex[1]] > 0:
            quota[ex[1]] -= 1
            out.append(ex)
            if not any(quota):
                break
    return out


def load_task(cfg: Any, seed: int) -> TaskData:
    """Load, format and split a task; the same config and seed always give the same three sets."""
    validate_task(cfg)
    carve_test = cfg.splits.get("test") is None
    train_src = _load_split(cfg, cfg.splits["train"])
    n_pool = cfg.n_train + (cfg.n_test if carve_test else 0)
    pool = _take(_examples(train_src, cfg, seed), n_pool, cfg)
    if carve_test:
        rng = random.Random(seed + 1)
        rng.shuffle(pool)
        test, train = pool[: cfg.n_test], pool[cfg.n_test :]
    else:
        train = pool
        test = _take(_examples(_load_split(cfg, cfg.splits["test"]), cfg, seed), cfg.n_test, cfg)
    random.Random(seed + 2).shuffle(train)  # mix classes after balanced sampling
    if len(train) < 2 or not test:
        raise W2SGError(f"task {cfg.name!r}: only {len(train)} train and {len(test)} test examples after formatting")
    half = len(train) // 2
    return TaskData(gt=train[:half], weak=train[half:], test=test)
