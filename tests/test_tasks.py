"""Every task loader reads local files of its hub data set's format through datasets.load_dataset."""

import pytest

from conftest import compose, fixture_task
from w2sg.errors import W2SGError
from w2sg.tasks import load_task

HUB_TASKS = ["sciq", "boolq", "cosmos_qa", "amazon_polarity", "anthropic_hh", "sst2"]


@pytest.mark.parametrize("task", HUB_TASKS)
def test_loader_reads_local_files_of_the_hub_format(task):
    cfg = compose(fixture_task(task) + ["task.n_train=20", "task.n_test=10"])
    data = load_task(cfg.task, seed=0)
    assert len(data.gt) == 10 and len(data.weak) == 10 and len(data.test) == 10
    for text, label in data.gt + data.weak + data.test:
        assert isinstance(text, str) and text and label in (0, 1)
    labels = {y for _, y in data.gt + data.weak}
    assert labels == {0, 1}, f"{task}: both classes should occur"


def test_formats_follow_the_paper_code():
    data = load_task(compose(fixture_task("sciq")).task, seed=0)
    assert all(t.startswith("Q: ") and " A: " in t for t, _ in data.gt)
    data = load_task(compose(fixture_task("boolq")).task, seed=0)
    assert all(t.startswith("Passage: ") and "\nQuestion: " in t for t, _ in data.gt)
    data = load_task(compose(fixture_task("cosmos_qa")).task, seed=0)
    assert all(t.startswith("Context: ") and "\nAnswer: " in t for t, _ in data.gt)
    data = load_task(compose(fixture_task("anthropic_hh")).task, seed=0)
    for text, label in data.gt:
        assert ("Figure it out yourself" in text) == (label == 0)


def test_splits_are_seeded_disjoint_and_sized():
    cfg = compose(["task.n_train=200", "task.n_test=100"]).task
    a, b, c = load_task(cfg, 0), load_task(cfg, 0), load_task(cfg, 1)
    assert a == b, "same seed, same split"
    assert a.gt != c.gt, "another seed, another split"
    assert (len(a.gt), len(a.weak), len(a.test)) == (100, 100, 100)
    gt, weak, test = ({t for t, _ in s} for s in (a.gt, a.weak, a.test))
    assert not (gt & weak) and not (gt & test) and not (weak & test)


def test_default_task_is_balanced_real_text():
    data = load_task(compose().task, 0)
    labels = [y for _, y in data.gt + data.weak + data.test]
    assert labels.count(0) == labels.count(1) == 500
    assert len(data.gt) == len(data.weak) == 300 and len(data.test) == 400


def test_hub_data_set_offline_names_the_problem_and_the_way_out():
    cfg = compose(["task=sciq"]).task
    with pytest.raises(W2SGError) as e:
        load_task(cfg, 0)
    msg = str(e.value)
    assert "task 'sciq': cannot load split 'train' of data set 'allenai/sciq'" in msg
    assert "task.data_files" in msg


def test_missing_local_file_is_reported():
    cfg = compose(["task=sciq", "task.dataset=json", "task.data_files={train: /no/such.jsonl, test: /no/t.jsonl}"]).task
    with pytest.raises(W2SGError, match="cannot load split 'train'.*/no/such.jsonl"):
        load_task(cfg, 0)


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(W2SGError, match="unknown kind 'nope'; valid: amazon_polarity, anthropic_hh, boolq"):
        load_task(compose(["task.kind=nope"]).task, 0)
