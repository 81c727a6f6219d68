"""Every task loader reads local files of its hub data set's format through datasets.load_dataset."""

import json
import random

import pytest
from helpers import FIXTURES, compose, fixture_task

from w2sg.core.errors import W2SGError
from w2sg.data.formats import FORMATTERS
from w2sg.data.tasks import DEDUPE_RULE, load_task, text_key

HUB_TASKS = ["sciq", "boolq", "cosmos_qa", "amazon_polarity", "anthropic_hh", "sst2",
             # the EleutherAI/w2s task registry
             "piqa", "hellaswag", "social_i_qa", "openbookqa", "anli", "paws", "quail", "wic", "multirc", "mc_taco",
             "ethics_deontology", "ethics_justice", "ethics_virtue", "ethics_utilitarianism"]


# The fixtures check formats: they repeat a few texts on purpose (test files reuse train rows), so the loaders are
# checked on them with duplicates kept; removing duplicates has tests of its own below.
KEEP_DUPLICATES = ["task.dedupe=false"]


def local_files(task: str):
    """Like helpers.fixture_task, with both files keyed by the task's split names (mc_taco trains on 'test'), and
    duplicate texts kept.

    task.data_files only has the fields train/validation/test, so a task reading other split names (anli:
    train_r2/test_r2) reads its local files as train/test instead.
    """
    splits, d = compose([f"task={task}"]).task.splits, FIXTURES / task
    train, test = splits["train"], splits["test"]
    extra = []
    if not {train, test} <= {"train", "validation", "test"}:
        train, test, extra = "train", "test", ["task.splits={train: train, test: test}"]
    return [f"task={task}", "task.dataset=json", *extra, *KEEP_DUPLICATES,
            f"task.data_files={{{train}: {d / 'train.jsonl'}, {test}: {d / 'test.jsonl'}}}"]


@pytest.mark.parametrize("task", HUB_TASKS)
def test_loader_reads_local_files_of_the_hub_format(task):
    cfg = compose(local_files(task) + ["task.n_train=20", "task.n_test=10"])
    data = load_task(cfg.task, seed=0)
    assert len(data.gt) == 10 and len(data.weak) == 10 and len(data.test) == 10
    for text, label in data.gt + data.weak + data.test:
        assert isinstance(text, str) and text and label in (0, 1)
    labels = {y for _, y in data.gt + data.weak}
    assert labels == {0, 1}, f"{task}: both classes should occur"


def test_formats_follow_the_paper_code():
    data = load_task(compose(fixture_task("sciq") + KEEP_DUPLICATES).task, seed=0)
    assert all(t.startswith("Q: ") and " A: " in t for t, _ in data.gt)
    data = load_task(compose(fixture_task("boolq") + KEEP_DUPLICATES).task, seed=0)
    assert all(t.startswith("Passage: ") and "\nQuestion: " in t for t, _ in data.gt)
    data = load_task(compose(fixture_task("cosmos_qa") + KEEP_DUPLICATES).task, seed=0)
    assert all(t.startswith("Context: ") and "\nAnswer: " in t for t, _ in data.gt)
    data = load_task(compose(fixture_task("anthropic_hh") + KEEP_DUPLICATES).task, seed=0)
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
    # the default experiment's sizes (conf/task_size/tweet_sentiment_probe.yaml: train=probe is the default)
    assert labels.count(0) == labels.count(1) == 3500
    assert len(data.gt) == len(data.weak) == 2000 and len(data.test) == 3000
    full = load_task(compose(["train=full"]).task, 0)  # full finetuning keeps the task's own sizes
    assert (len(full.gt), len(full.weak), len(full.test)) == (300, 300, 400)


def keys_of(data):
    return [text_key(t) for part in (data.gt, data.weak, data.test) for t, _ in part]


def test_the_default_task_has_each_text_once_and_one_pool_for_every_seed():
    """Issue 22: the default pool held 72 rows whose text another row of it held (81 counting case and spacing),
    so tweets of the test set were also in a train half (39 with seed 3). Duplicates leave before the split."""
    cfg = compose().task
    a, b = load_task(cfg, 3), load_task(cfg, 4)
    for data in (a, b):
        labels = [y for _, y in data.gt + data.weak + data.test]
        assert labels.count(0) == labels.count(1) == 3500, "the balanced sizes are still reached"
        assert (len(data.gt), len(data.weak), len(data.test)) == (2000, 2000, 3000)
        assert len(set(keys_of(data))) == 7000, "each text (casefolded, spacing collapsed) once in the pool"
        assert data.duplicates_removed == 84  # measured: 73 exact copies, 11 more differing in case or spacing
    assert a.gt != b.gt and sorted(keys_of(a)) == sorted(keys_of(b)), "task.pool_seed: one pool, split per seed"
    kept = load_task(compose(["task.dedupe=false"]).task, 3)
    train = {t for t, _ in kept.gt + kept.weak}
    assert sum(t in train for t, _ in kept.test) == 39 and kept.duplicates_removed is None, "the data as before"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def local_task(train, test=None, *extra):
    files = f"{{train: {train}" + (f", test: {test}}}" if test else "}")
    return compose(["task.dataset=json", f"task.data_files={files}", "task.load_kwargs={}",
                    f"task.splits={{train: train, test: {'test' if test else 'null'}}}", "task.label_column=label",
                    "task.label_map=null", "task.balance=false", *extra]).task


# 30 texts, then copies of five of them: exact, in other case and spacing, in full-width letters (NFKC), and one
# with the other label; "review 9!" differs by its punctuation, so it is another text
ROWS = [{"text": f"review {i}", "label": i % 2} for i in range(30)] + [
    {"text": "review 3", "label": 1}, {"text": "  REVIEW 5\n", "label": 1}, {"text": "\uff52eview 11", "label": 1},
    {"text": "Review\t 7", "label": 0}, {"text": "review 9!", "label": 1}]


def test_duplicate_texts_leave_the_pool_before_the_split_and_the_first_drawn_copy_stays(tmp_path):
    from w2sg.data.tasks import _examples, _load_split

    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    for pool_seed in range(4):  # 32 asked for, 31 distinct texts: every row is drawn, every copy seen
        cfg = local_task(path, None, "task.n_train=20", "task.n_test=12", f"task.pool_seed={pool_seed}")
        data = load_task(cfg, 0)
        assert sorted(keys_of(data)) == sorted({f"review {i}" for i in range(30)} | {"review 9!"})
        assert data.duplicates_removed == 4 and (len(data.gt), len(data.weak), len(data.test)) == (9, 10, 12)
        drawn = list(_examples(_load_split(cfg, "train"), cfg, pool_seed))
        first = {}
        for text, label in drawn:
            first.setdefault(text_key(text), (text, label))
        assert sorted(data.gt + data.weak + data.test) == sorted(first.values()), "the copy drawn first stays"
    labels_of_7 = set()
    for pool_seed in range(12):  # the copy of "review 7" with the other label stays when it is drawn first
        data = load_task(local_task(path, None, "task.n_train=20", "task.n_test=12", f"task.pool_seed={pool_seed}"), 0)
        labels_of_7 |= {y for t, y in data.gt + data.weak + data.test if text_key(t) == "review 7"}
    assert labels_of_7 == {0, 1}
    kept = load_task(local_task(path, None, "task.n_train=20", "task.n_test=12", "task.dedupe=false"), 0)
    assert len(set(keys_of(kept))) < 31 and kept.duplicates_removed is None, "task.dedupe=false keeps copies"


def test_a_test_split_holds_no_text_of_the_train_pool(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"review {i}", "label": i % 2} for i in range(20)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": f"Review {i}", "label": i % 2} for i in range(10)]
                       + [{"text": f"other {i}", "label": i % 2} for i in range(12)])
    data = load_task(local_task(train, test, "task.n_train=20", "task.n_test=12"), 0)
    assert len(data.test) == 12 and {t for t, _ in data.test} == {f"other {i}" for i in range(12)}
    assert data.duplicates_removed == 10
    # a copy in a class that is full would not have entered the pool: it is left out, but not counted
    data = load_task(local_task(train, test, "task.n_train=20", "task.n_test=2", "task.balance=true"), 0)
    assert len(set(keys_of(data))) == 22 and data.duplicates_removed < 10
    copies = write_jsonl(tmp_path / "copies.jsonl", [{"text": f"REVIEW {i}", "label": i % 2} for i in range(10)])
    with pytest.raises(W2SGError, match=r"only 20 train and 0 test examples after formatting; 10 rows were left "
                                        r"out as copies of a text already in the pool .*task.dedupe=false keeps them"):
        load_task(local_task(train, copies, "task.n_train=20", "task.n_test=5"), 0)


def test_a_pair_is_a_duplicate_in_either_order(tmp_path):
    rows = [{"chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(12)]
    rows += [dict(r) for r in rows[:6]]  # each copy is formatted in its own random order
    rows += [{"chosen": "BAD answer 7", "rejected": "good  answer 7"}]  # the other preference: a copy all the same
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    # 13 asked for, 12 distinct pairs: every row is drawn, every copy seen
    data = load_task(local_task(path, None, "task.kind=pairwise", "task.n_train=8", "task.n_test=5"), 0)
    examples = data.gt + data.weak + data.test
    assert sorted(text_key(t) for t, _ in examples) == sorted(text_key((r["chosen"], r["rejected"])) for r in rows[:12])
    assert data.duplicates_removed == 7
    chosen = {(t[0] if y else t[1]) for t, y in examples}
    assert chosen - {"good answer 7", "BAD answer 7"} == {f"good answer {i}" for i in range(12) if i != 7}


def test_dedupe_enters_the_task_spec_as_the_number_of_its_rule():
    from w2sg.core.graph import task_spec

    assert task_spec(compose().task)["dedupe"] == DEDUPE_RULE == 1
    assert "dedupe" not in task_spec(compose(["task.dedupe=false"]).task), "false: the keys before dedupe existed"


def test_the_rows_left_out_are_in_the_task_sizes(tmp_path):
    from w2sg.core.store import Store
    from w2sg.run.runner import Runner

    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    overrides = ["task.dataset=json", f"task.data_files={{train: {path}}}", "task.load_kwargs={}",
                 "task.splits={train: train, test: null}", "task.label_column=label", "task.label_map=null",
                 "task.balance=false", "task.n_train=20", "task.n_test=12"]  # all 35 rows drawn
    sizes = Runner(compose(overrides), Store(tmp_path / "store")).context.task_sizes()
    assert sizes == {"n_train": 19, "n_test": 12, "gt": 9, "weak": 10, "duplicates_removed": 4}
    kept = Runner(compose(overrides + ["task.dedupe=false"]), Store(tmp_path / "store")).context.task_sizes()
    assert kept == {"n_train": 20, "n_test": 12, "gt": 10, "weak": 10}


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


@pytest.mark.parametrize("task", ["anli", "mc_taco"])
def test_skewed_registry_tasks_are_balanced(task):
    data = load_task(compose(local_files(task) + ["task.n_train=20", "task.n_test=10"]).task, seed=0)
    labels = [y for _, y in data.gt + data.weak]
    assert labels.count(0) == labels.count(1) == 10


def formatted(kind, row, seeds=range(20)):
    """(text, label) for each seed; both labels must occur, so each branch of the formatter is checked."""
    out = [FORMATTERS[kind](row, random.Random(seed), None) for seed in seeds]
    assert {label for _, label in out} == {0, 1}, f"{kind}: both labels should occur over {len(out)} seeds"
    return out


def test_piqa_format():
    row = {"goal": "To dry wet shoes,", "sol1": "fill them with water.", "sol2": "stuff them with newspaper.",
           "label": 1}
    for text, label in formatted("piqa", row):
        assert text == "Q: To dry wet shoes, A: " + ("stuff them with newspaper." if label else "fill them with water.")
    assert FORMATTERS["piqa"](dict(row, label=-1), random.Random(0), None) is None  # unlabelled test rows


def test_hellaswag_format():
    endings = ["falls asleep.", "jumps into the pool.", "takes a bow.", "eats the ball."]
    row = {"ctx": "A diver climbs the board and", "endings": endings, "label": "1"}
    head = "Context:\nA diver climbs the board and\n\nContinuations:\n\n" + "\n".join(endings) + '\n\nQ: Is "'
    for text, label in formatted("hellaswag", row):
        assert text.startswith(head) and text.endswith('" the best continuation?')
        answer = text[len(head):-len('" the best continuation?')]
        assert answer in endings and (answer == "jumps into the pool.") == bool(label)
    assert FORMATTERS["hellaswag"](dict(row, label=""), random.Random(0), None) is None  # unlabelled test rows


def test_social_i_qa_format():
    row = {"context": "Jo lent Max a pen.", "question": "How would Max feel?", "answerA": "annoyed",
           "answerB": "sleepy", "answerC": "grateful", "label": "3"}
    for text, label in formatted("social_i_qa", row):
        answer = text.split('Is the answer "')[1][:-2]
        assert text == ('Context:\nJo lent Max a pen.\n\nQuestion: "How would Max feel?"\n\nChoices:\nannoyed\n'
                        f'sleepy\ngrateful\n\nIs the answer "{answer}"?')
        assert (answer == "grateful") == bool(label) and answer in ("annoyed", "sleepy", "grateful")


def test_openbookqa_format_answers_with_a_letter_either_way():
    row = {"question_stem": "Plants need", "answerKey": "C",
           "choices": {"text": ["rocks", "salt", "sunlight", "noise"], "label": ["A", "B", "C", "D"]}}
    for text, label in formatted("openbookqa", row):
        head, answer = text.rsplit("\n\nAnswer: ", 1)
        assert head == "Q: Plants need\n\nChoices:\nA) rocks\nB) salt\nC) sunlight\nD) noise"
        # a letter either way, so the form of the answer does not give the label away
        assert answer in ("A", "B", "D") if label == 0 else answer == "C"


def test_quail_format():
    row = {"context": "Mia fed the cat.", "question": "Who fed the cat?", "answers": ["Tom", "Mia", "Ann", "Bo"],
           "correct_answer_id": 1}
    for text, label in formatted("quail", row):
        answer = text.split('Is the answer "')[1][:-2]
        assert text == f'Passage:\n\nMia fed the cat.\n\nQ: "Who fed the cat?" Is the answer "{answer}"?'
        assert (answer == "Mia") == bool(label) and answer in row["answers"]


def test_ethics_utilitarianism_format():
    row = {"baseline": "I won a prize.", "less_pleasant": "I lost my keys."}
    orders = set()
    for text, label in formatted("ethics_utilitarianism", row):
        lines = text.split("\n")
        assert lines[0] == "Which is more pleasant?" and lines[1].startswith("1) ") and lines[2].startswith("2) ")
        first, (second, stated) = lines[1][3:], lines[2][3:].split(" A: ")
        assert {first, second} == {"I won a prize.", "I lost my keys."}
        assert ([first, second][int(stated) - 1] == "I won a prize.") == bool(label)
        orders.add(first)
    assert len(orders) == 2, "the two scenarios should come in both orders"


@pytest.mark.parametrize("task,row,text,label", [
    ("anli", {"premise": "A cat sleeps.", "hypothesis": "An animal sleeps.", "label": 0},
     "Premise: A cat sleeps.\nHypothesis: An animal sleeps.\n\nDoes the premise entail the hypothesis?", 1),
    ("anli", {"premise": "A cat sleeps.", "hypothesis": "The cat is black.", "label": 1},
     "Premise: A cat sleeps.\nHypothesis: The cat is black.\n\nDoes the premise entail the hypothesis?", 0),
    ("anli", {"premise": "A cat sleeps.", "hypothesis": "The cat runs.", "label": 2},
     "Premise: A cat sleeps.\nHypothesis: The cat runs.\n\nDoes the premise entail the hypothesis?", 0),
    ("paws", {"sentence1": "He left early.", "sentence2": "Early, he left.", "label": 1},
     "Sent 1: He left early.\nSent 2: Early, he left.\n\nQ: Are these sentences semantically equivalent?", 1),
    ("wic", {"word": "bank", "sentence1": "A river bank.", "sentence2": "A savings bank.", "label": 0},
     'Sentence 1:\nA river bank.\n\nSentence 2:\nA savings bank.\n\nQ: Does "bank" have the same meaning in '
     "the above sentences?", 0),
    ("multirc", {"paragraph": "Bo is 9.", "question": "How old is Bo?", "answer": "9", "label": 1},
     'Passage:\n\nBo is 9.\n\nQ: "How old is Bo?" Is the answer "9"?', 1),
    ("mc_taco", {"sentence": "He ate lunch.", "question": "How long did lunch take?", "answer": "a year", "label": 0},
     "He ate lunch.\n\nGiven the above, How long did lunch take? Is the answer a year?", 0),
    ("ethics_deontology", {"scenario": "Can you walk the dog?", "excuse": "No, it is raining hard.", "label": 1},
     "Q: Is the following a morally valid excuse?\n\nCan you walk the dog?\n\nNo, it is raining hard.\n\nA:", 1),
    ("ethics_justice", {"scenario": "I paid him less because he is short.", "label": 0},
     "Q: Does this statement exemplify justice?\n\nI paid him less because he is short.\n\nA:", 0),
    ("ethics_virtue", {"scenario": "She shared her lunch. [SEP] generous", "label": 1},
     "Q: Does this behavior match the adjective that follows?\n\nShe shared her lunch. [SEP] generous\n\nA:", 1),
])
def test_template_tasks_follow_the_eleutherai_formats(task, row, text, label):
    cfg = compose([f"task={task}"]).task
    assert cfg.kind == "template"
    assert FORMATTERS["template"](row, random.Random(0), cfg) == (text, label)


def labelled_one_two(tmp_path, n=60):
    """A json task file whose labels are the ints 1 and 2 (not class indices)."""
    return write_jsonl(tmp_path / "train.jsonl", [{"text": f"review {i}", "label": 1 + i % 2} for i in range(n)])


def test_label_map_is_given_on_the_command_line_with_text_or_number_keys(tmp_path):
    cfg = local_task(labelled_one_two(tmp_path), None, "task.n_train=24", "task.n_test=12",
                     "task.label_map={1: 0, 2: 1}")
    assert cfg.label_map == {"1": 0, "2": 1}, "number keys become text keys, matched with str() of the raw label"
    data = load_task(cfg, 0)
    labels = [y for _, y in data.gt + data.weak + data.test]
    assert sorted(set(labels)) == [0, 1] and len(labels) == 36
    assert compose(["task.label_map=null", "task.label_map={neg: 0, pos: 1}"]).task.label_map == {"neg": 0, "pos": 1}
    with pytest.raises(Exception, match=r"task.label_map=\{neg: x\}.*could not be converted to Integer"):
        compose(["task.label_map=null", "task.label_map={neg: x}"])


def test_an_empty_class_names_the_raw_labels_and_the_override_that_maps_them(tmp_path):
    path = labelled_one_two(tmp_path)
    with pytest.raises(W2SGError) as e:  # the old error's advice, task.num_classes=3, left class 0 empty
        load_task(local_task(path, None, "task.n_train=24", "task.n_test=12", "task.num_classes=3"), 0)
    msg = str(e.value)
    assert "class 0 of task.num_classes=3 has no example in the pool" in msg
    assert "raw labels of column 'label' (value: rows): 1: 30, 2: 30" in msg
    fix = msg.split("classes 0..1: ", 1)[1].split(" (or", 1)[0]
    assert fix == "task.label_map='{1: 0, 2: 1}' task.num_classes=2"
    overrides = [o.replace("'", "") for o in fix.split(" task.")]  # as the shell passes them on
    overrides = [overrides[0]] + ["task." + o for o in overrides[1:]]
    data = load_task(local_task(path, None, "task.n_train=24", "task.n_test=12", *overrides), 0)
    assert {y for _, y in data.test} == {0, 1}, "following the advice gives the 2-class task"


def test_a_set_without_a_class_is_an_error(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"a {i}", "label": i % 2} for i in range(40)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": f"b {i}", "label": 1} for i in range(20)])
    with pytest.raises(W2SGError, match=r"class 0 of task.num_classes=2 has no example in the test set \(class "
                                        r"counts: 0: 0, 1: 10\).*raise task.n_train / task.n_test"):
        load_task(local_task(train, test, "task.n_train=16", "task.n_test=10"), 0)


def test_empty_texts_are_warned_about_and_mostly_empty_ones_stop_the_run(tmp_path, caplog):
    import re

    # a quarter of the texts empty or whitespace only, all 40 rows used
    rows = [{"text": "" if i % 8 == 0 else " \n" if i % 8 == 5 else f"t {i}", "label": i % 2} for i in range(40)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with caplog.at_level("WARNING", logger="w2sg"):
        load_task(local_task(path, None, "task.n_train=24", "task.n_test=16", "task.dedupe=false"), 0)
    found = re.findall(r"(\d+) of the (\d+) texts of the (.+?) \((\d+)%\) are empty or whitespace only", caplog.text)
    assert [(int(n), part) for _, n, part, _ in found] == [
        (12, "ground-truth train half"), (12, "weak-label train half"), (16, "test set")]
    assert sum(int(k) for k, *_ in found) == 10, "every empty text counted, per part"
    assert all(round(100 * int(k) / int(n)) == int(p) for k, n, _, p in found)
    assert "check that task.template ('{text}')" in caplog.text
    mostly = write_jsonl(tmp_path / "mostly.jsonl", [{"text": f"t {i}" if i % 3 == 0 else "", "label": i % 2}
                                                     for i in range(60)])
    with pytest.raises(W2SGError, match=r"40 of its 60 texts \(67%\) are empty or whitespace only \(\d+ of the 20 "
                                        r"texts of the ground-truth train half .*; more than half: check that "
                                        r"task.template \('\{text\}'\)"):
        load_task(local_task(mostly, None, "task.n_train=40", "task.n_test=20", "task.dedupe=false"), 0)


def test_a_pair_with_an_empty_text_counts_as_empty(caplog):
    from w2sg.data.tasks import check_texts

    cfg = compose(["task=anthropic_hh_rm"]).task
    with caplog.at_level("WARNING", logger="w2sg"):
        check_texts(cfg, {"test set": [(("a", "  "), 1), (("", "b"), 0), (("c", "d"), 1), (("e", "f"), 0)]})
    assert "2 of the 4 texts of the test set (50%)" in caplog.text and "either text of a pair" in caplog.text
    with pytest.raises(W2SGError, match=r"3 of its 4 texts \(75%\) .*\(either text of a pair\)"):
        check_texts(cfg, {"test set": [(("a", ""), 1), (("", "b"), 0), ((" ", "d"), 1), (("e", "f"), 0)]})
