"""Formatters: one function per data-set format turning a row into (text, class index), in a registry.

``template`` is generic (a str.format template over the row's columns, labels through ``label_map``): a new
classification task is one YAML file. The others reproduce the text formats of the paper's code
(openai/weak-to-strong ``datasets.py``) and of the EleutherAI/w2s task registry for hub data sets whose rows
need more than a template (multiple choice turned binary, pairs of texts, ...). A formatter returns None to drop
a row. Randomness (e.g. which distractor) comes from the ``rng`` it is given, so splits are seeded.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, Optional, Tuple

from w2sg.core.registry import Registry

Row = Dict[str, Any]
Example = Tuple[Any, int]  # (text, class index); pairwise tasks give a (text, text) pair instead of one text
Formatter = Callable[[Row, random.Random, Any], Optional[Example]]
FORMATTERS = Registry("task format")


def register_formatter(name: str) -> Callable[[Formatter], Formatter]:
    """Decorator: ``task.kind=<name>`` formats rows with ``fn`` (also from a module listed in ``extensions:``)."""
    return FORMATTERS.register(name)


def label_key(raw: Any) -> str:
    """A raw label as ``task.label_map`` keys it: its text, a whole float as the int it is (1.0 -> "1", as a CSV
    column with gaps reads 1)."""
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    return str(raw)


def _label(cfg: Any, raw: Any) -> Optional[int]:
    if cfg.label_map is None:
        return int(raw)
    key = label_key(raw)
    mapping = {label_key(k): v for k, v in cfg.label_map.items()}
    return int(mapping[key]) if key in mapping else None  # unmapped labels are dropped


@register_formatter("template")
def format_template(row: Row, rng: random.Random, cfg: Any) -> Optional[Example]:
    label = _label(cfg, row[cfg.label_column])
    if label is None:
        return None
    return cfg.template.format(**row), label


@register_formatter("amazon_polarity")
def format_amazon_polarity(row: Row, rng: random.Random, cfg: Any) -> Optional[Example]:
    return f"{row['title']} {row['content']}", int(row["label"])


@register_formatter("sciq")
def format_sciq(row: Row, rng: random.Random, cfg: Any) -> Optional[Example]:
    label = int(rng.random() < 0.5)
    if label:
        answer = row["correct_answer"]
    else:
        answer = rng.choice([row["distractor1"], row["distractor2"], row["distractor3"]])
    return f"Q: {row['question']} A: {answer}", label


@register_formatter("anthropic_hh")
def format_anthropic_hh(row: Row, rng: random.Random, cfg: Any) -> Optional[Example]:
    label = int(rng.random() < 0.5)
    return (row["chosen"] if label else row["rejected"]), label


@register_formatter("pairwise")
def format_pairwise(row: Row, rng: random.Random, cfg: Any) -> Optional[Example]:
    """Reward modeling: a (chosen, rejected) pair in a random order; label 1 when the first text is the chosen one.

    Any data set with ``chosen`` and ``rejected`` text columns (Anthropic/hh-rlhf and most preference data).
    Identical texts carry no preference and are dropped.
    """
    if row["chosen"] == row["rejected"]:
        return None
    label = int(rng.random() < 0.5)
    pair = (row["chosen"], row["rejected"]) if label else (row["rejected"], row["chosen"])
    return pair, label


@register_formatter("cosmos_qa")
def format_cosmos_qa(row: Row, rng: random.Random, cfg: Any) -> Optional[Example]:
    true_answer = row["answer" + str(row["label"])]
    if "None of the above choices ." in true_answer:
        label = 0
    else:
        label = int(rng.random() < 0.5)
    if label:
        answer = true_answer
    else:
        candidates = [row["answer" + str(i)] for i in range(4)]
        answer = rng.choice([a for a in candidates if a != true_answer])
    return f"Context: {row['context']}\nQuestion: {row['question']}\nAnswer: {answer}", label


@register_formatter("boolq")
def format_boolq(row: Row, rng: random.Random, cfg: Any) -> Optional[Example]:
    return f"Passage: {row['passage']}\nQuestion: {row['question']}", int(row["answer"])


# --- EleutherAI/w2s task registry (w2s/ds_registry.py): multiple choice turned binary -------------------------
# Each picks, with probability 1/2, the correct answer (label 1) or one random wrong one (label 0), as sciq does.
# Tasks whose rows only need a template (anli, paws, wic, multirc, mc_taco, ethics deontology/justice/virtue) are
# kind=template YAML files.


def _right_or_wrong(choices: list, correct: int, rng: random.Random) -> Tuple[Any, int]:
    """(the correct choice, 1) or (a random other choice, 0), each with probability 1/2."""
    label = int(rng.random() < 0.5)
    if label:
        return choices[correct], label
    return rng.choice([c for i, c in enumerate(choices) if i != correct]), label


@register_formatter("piqa")
def format_piqa(row: Row, rng: random.Random, cfg: Any) -> Optional[Example]:
    if int(row["label"]) not in (0, 1):  # the hub's test split is unlabelled (-1)
        return None
    answer, label = _right_or_wrong([row["sol1"], row["sol2"]], int(row["label"]), rng)
    return f"Q: {row['goal']} A: {answer}", label


@register_formatter("hellaswag")
def format_hellaswag(row: Row, rng: random.Random, cfg: Any) -> Optional[Example]:
    if str(row["label"]).strip() == "":  # the hub's test split is unlabelled ("")
        return None
    answer, label = _right_or_wrong(list(row["endings"]), int(row["label"]), rng)
    endings = "\n".join(row["endings"])
    text = f'Context:\n{row["ctx"]}\n\nContinuations:\n\n{endings}\n\nQ: Is "{answer}" the best continuation?'
    return text, label


@register_formatter("social_i_qa")
def format_social_i_qa(row: Row, rng: random.Random, cfg: Any) -> Optional[Example]:
    answers = [row["answerA"], row["answerB"], row["answerC"]]
    answer, label = _right_or_wrong(answers, int(row["label"]) - 1, rng)  # label is "1".."3"
    text = (f"Context:\n{row['context']}\n\nQuestion: \"{row['question']}\"\n\nChoices:\n" + "\n".join(answers)
            + f'\n\nIs the answer "{answer}"?')
    return text, label


@register_formatter("openbookqa")
def format_openbookqa(row: Row, rng: random.Random, cfg: Any) -> Optional[Example]:
    # EleutherAI/w2s answers with the letter when right but with the choice's text when wrong, which gives the
    # label away; here both are letters.
    letters = list(row["choices"]["label"])
    answer, label = _right_or_wrong(letters, letters.index(row["answerKey"].strip()), rng)
    choices = "\n".join(f"{a}) {t}" for a, t in zip(letters, row["choices"]["text"]))
    return f"Q: {row['question_stem']}\n\nChoices:\n{choices}\n\nAnswer: {answer}", label


@register_formatter("quail")
def format_quail(row: Row, rng: random.Random, cfg: Any) -> Optional[Example]:
    answer, label = _right_or_wrong(list(row["answers"]), int(row["correct_answer_id"]), rng)
    return f'Passage:\n\n{row["context"]}\n\nQ: "{row["question"]}" Is the answer "{answer}"?', label


@register_formatter("ethics_utilitarianism")
def format_ethics_utilitarianism(row: Row, rng: random.Random, cfg: Any) -> Optional[Example]:
    # rows pair a scenario (baseline) with a less pleasant variant; label 1 if the stated answer is the baseline
    label = int(rng.random() < 0.5)
    choices = [row["baseline"], row["less_pleasant"]]
    rng.shuffle(choices)
    correct = choices.index(row["baseline"])
    response = correct if label else 1 - correct
    return f"Which is more pleasant?\n1) {choices[0]}\n2) {choices[1]} A: {response + 1}", label
