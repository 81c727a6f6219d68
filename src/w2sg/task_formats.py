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

Row = Dict[str, Any]
Example = Tuple[str, int]  # (text, class index)
Formatter = Callable[[Row, random.Random, Any], Optional[Example]]
FORMATTERS: Dict[str, Formatter] = {}


def register_formatter(name: str) -> Callable[[Formatter], Formatter]:
    def deco(fn: Formatter) -> Formatter:
        FORMATTERS[name] = fn
        return fn

    return deco


def _label(cfg: Any, raw: Any) -> Optional[int]:
    if cfg.label_map is None:
        return int(raw)
    key = str(raw)
    return int(cfg.label_map[key]) if key in cfg.label_map else None  # unmapped labels are dropped


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
