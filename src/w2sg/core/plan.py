"""The plan of one experiment: its named stages (a pair, weak-label methods, strong-to-strong iterations, a
bootstrap chain plus the direct run), the subset a run selects, and what is still pending. No torch here.
"""

from __future__ import annotations

from typing import Any, Dict, List

from w2sg.core.errors import W2SGError
from w2sg.core.graph import (
    Stage,
    _plain,
    features_stage,
    labels_stage,
    member_stage,
    train_stage,
    transform_stage,
)
from w2sg.core.registry import load as load_extensions


def chain_models(cfg: Any) -> List[Any]:
    return list(cfg.chain.models.values())


def plan(cfg: Any) -> Dict[str, Stage]:
    """Named stages of this run, in execution order. Keys make shared stages the same object in the store."""
    load_extensions(cfg.get("extensions") or [])  # their code versions enter the keys (status, launchers plan too)
    weak = train_stage(cfg, cfg.weak, None, None, f"weak:{cfg.weak.name}")
    weak_labels = labels_stage(cfg, weak, f"weak_labels:{cfg.weak.name}")
    stages = {"weak": weak, "weak_labels": weak_labels}
    train_labels = method_stages(cfg, stages)  # labels= / budget=: the weak labels, transformed (or as they are)
    ceiling = train_stage(cfg, cfg.strong, None, None, f"ceiling:{cfg.strong.name}")
    w2s = train_stage(cfg, cfg.strong, train_labels, cfg.loss, f"w2s:{cfg.weak.name}->{cfg.strong.name}")
    stages.update(ceiling=ceiling, w2s=w2s)
    s2s_stages(cfg, stages)
    if cfg.chain is not None:
        models = chain_models(cfg)
        labels = train_labels  # the first link trains on what the direct w2s stage trains on
        for i, (teacher, student) in enumerate(zip(models, models[1:]), start=1):
            link = train_stage(cfg, student, labels, cfg.loss, f"link{i}:{teacher.name}->{student.name}")
            stages[f"link{i}"] = link
            if i < len(models) - 1:
                stages[f"ceiling{i}"] = train_stage(cfg, student, None, None, f"ceiling:{student.name}")
                labels = labels_stage(cfg, link, f"link{i}_labels:{student.name}")
                stages[f"link{i}_labels"] = labels
    return stages


def method_stages(cfg: Any, stages: Dict[str, Stage]) -> Stage:
    """The labels the w2s stage trains on: ``weak_labels`` itself unless ``labels=`` or ``budget=`` changes them,
    else a ``train_labels`` transform stage (w2sg.ml.methods) after its ensemble members. Adds to ``stages``."""
    from w2sg.ml.methods import (
        NEEDS_FEATURES,
        budget_spec,
        ensemble_members,
        method_spec,
    )

    method = method_spec(_plain(cfg.labels))
    if method["name"] == "none" and budget_spec(cfg.budget, int(cfg.task.n_train)) is None:
        return stages["weak_labels"]
    if method["name"] == "ensemble":
        labels = {}
        for i, (model, seed) in enumerate(ensemble_members(cfg)):
            member = member_stage(cfg, model, seed)
            if member.key == stages["weak"].key:  # the run's own weak model and seed
                labels[f"member{i}"] = stages["weak_labels"]
                continue
            stages[f"member{i}"] = member
            stages[f"member{i}_labels"] = labels[f"member{i}"] = labels_stage(
                cfg, member, member.label.replace("weak:", "weak_labels:", 1))
    else:
        labels = {"labels": stages["weak_labels"]}
    features = features_stage(cfg, cfg.strong, "strong") if method["name"] in NEEDS_FEATURES else None
    stages["train_labels"] = transform_stage(cfg, labels, features, f"train_labels:{method['name']}")
    return stages["train_labels"]


def s2s_stages(cfg: Any, stages: Dict[str, Stage]) -> None:
    """``s2s=N``: N strong-to-strong iterations after w2s, each a fresh strong model trained (with the run's loss)
    on the previous student's soft labels of the whole weak-label half (student labels cost no budget)."""
    n = int(cfg.s2s)
    if n < 0:
        raise W2SGError(f"s2s={n}: the number of strong-to-strong iterations must be >= 0")
    teacher, name = stages["w2s"], "w2s"
    for i in range(1, n + 1):
        labels = labels_stage(cfg, teacher, f"{name}_labels:{cfg.strong.name}")
        stages[f"{name}_labels"] = labels
        teacher = name = f"s2s{i}"
        teacher = stages[name] = train_stage(cfg, cfg.strong, labels, cfg.loss, f"s2s{i}:{cfg.strong.name}")


def size_warnings(cfg: Any) -> List[str]:
    """A teacher larger than its student (by ``params``): legitimate as a reverse pair, but worth saying."""
    pairs = [("weak", cfg.weak, "strong", cfg.strong)]
    if cfg.chain is not None:
        models = chain_models(cfg)
        pairs += [(f"chain link {i}: teacher", t, "student", s) for i, (t, s) in enumerate(zip(models, models[1:]), 1)]
    return [f"{a} model {t.name} ({int(t.params) / 1e6:.1f}M params) is larger than the {b} model {s.name} "
            f"({int(s.params) / 1e6:.1f}M): a strong-to-weak run; check weak=/strong= if not meant"
            for a, t, b, s in pairs if int(t.params) > int(s.params)]


def select(cfg: Any, stages: Dict[str, Stage]) -> Dict[str, Stage]:
    """The stages this run executes: ``cfg.stages`` (names of the plan) and the stages they need; null: all."""
    only = cfg.get("stages")
    for option, names in (("recompute", cfg.recompute), ("stages", only or [])):
        unknown = sorted(set(names) - set(stages))
        if unknown:
            raise W2SGError(f"{option}: no stage named {', '.join(map(repr, unknown))} in this run; "
                            f"valid: {', '.join(stages)}")
    if only is None:
        return stages
    if not only:
        raise W2SGError(f"stages: empty list; name some of {', '.join(stages)}, or null for all")
    keys: set = set()

    def need(stage: Stage) -> None:
        if stage.key not in keys:
            keys.add(stage.key)
            for dep in stage.inputs.values():
                need(dep)

    for name in only:
        need(stages[name])
    return {name: stage for name, stage in stages.items() if stage.key in keys}
