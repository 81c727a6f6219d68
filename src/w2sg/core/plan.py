"""The plan of one experiment: its named stages (a pair, weak-label methods, strong-to-strong iterations, a
bootstrap chain plus the direct run), the subset a run selects, what of it is still to compute (``pending``,
which the Slurm launcher and ``w2sg status`` use too), and the missing weak/ceiling stages a sweep's jobs share
(``shared_stage_groups``, for the launcher's ``shared_stages: dependency``). Works on the typed config; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from w2sg.core.config import Config, ModelConfig
from w2sg.core.errors import W2SGError
from w2sg.core.graph import (Kind, Role, Side, Stage, features_stage, labels_stage, member_stage, train_stage,
                             transform_stage)
from w2sg.core.methods import (budget_spec, ensemble_members, method_spec, needs_features, probe_features_model,
                                reapplies)
from w2sg.core.registry import load as load_extensions


def chain_models(cfg: Config) -> List[ModelConfig]:
    return list(cfg.chain.models.values())


def _require_typed(cfg: object) -> None:
    if not isinstance(cfg, Config):
        raise TypeError(f"plan() takes the typed config (w2sg.app.config.resolve), not {type(cfg).__name__}")


def plan(cfg: Config) -> Dict[str, Stage]:
    """Named stages of this run, in execution order. Keys make shared stages the same object in the store."""
    _require_typed(cfg)
    load_extensions(cfg.extensions)  # their code versions enter the keys (status, launchers plan too)
    weak, strong = cfg.weak, cfg.strong
    stages = {"weak": train_stage(cfg, weak, None, None, f"weak:{weak.name}", Role.WEAK, Side.WEAK)}
    stages["weak_labels"] = labels_stage(cfg, stages["weak"], f"weak_labels:{weak.name}")
    train_labels = method_stages(cfg, stages)  # labels= / budget=: the weak labels, transformed (or as they are)
    stages["ceiling"] = train_stage(cfg, strong, None, None, f"ceiling:{strong.name}", Role.CEILING, Side.STRONG)
    stages["w2s"] = train_stage(cfg, strong, train_labels, cfg.loss, f"w2s:{weak.name}->{strong.name}", Role.W2S,
                                Side.STRONG)
    s2s_stages(cfg, stages)
    if cfg.chain is not None:
        chain_stages(cfg, stages, train_labels)
    return stages


def chain_stages(cfg: Config, stages: Dict[str, Stage], first_labels: Stage) -> None:
    """A bootstrap chain M1 -> ... -> Mn: each link a student trained on its teacher's labels (the first on what
    the direct w2s stage trains on), with each intermediate student's ceiling. Adds to ``stages``."""
    models = chain_models(cfg)
    labels = first_labels
    for i, (teacher, student) in enumerate(zip(models, models[1:]), start=1):
        link = train_stage(cfg, student, labels, cfg.loss, f"link{i}:{teacher.name}->{student.name}", Role.LINK,
                           Side.STRONG)
        stages[f"link{i}"] = link
        if i < len(models) - 1:
            stages[f"ceiling{i}"] = train_stage(cfg, student, None, None, f"ceiling:{student.name}", Role.CEILING,
                                                Side.STRONG)
            labels = labels_stage(cfg, link, f"link{i}_labels:{student.name}")
            stages[f"link{i}_labels"] = labels


def method_stages(cfg: Config, stages: Dict[str, Stage]) -> Stage:
    """The labels the w2s stage trains on: ``weak_labels`` itself unless ``labels=`` or ``budget=`` changes them,
    else a ``train_labels`` transform stage (w2sg.ml.methods) after its ensemble members. Adds to ``stages``."""
    method = method_spec(cfg.labels)
    budget = budget_spec(cfg.budget, cfg.task.n_train)
    if method["name"] == "none" and budget is None:
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
    features = probe_features(cfg, method)
    stages["train_labels"] = transform_stage(cfg, labels, features, f"train_labels:{method['name']}", method,
                                             budget_spec(cfg.budget))
    return stages["train_labels"]


def probe_features(cfg: Config, method: Dict[str, Any]) -> Optional[Stage]:
    """The strong model's frozen features a method reads (its ``feature_layer``), None for one that reads none."""
    if not needs_features(method):
        return None
    return features_stage(cfg, probe_features_model(cfg.strong, method), Side.STRONG)


def s2s_stages(cfg: Config, stages: Dict[str, Stage]) -> None:
    """``s2s=N``: N strong-to-strong iterations after w2s, each a fresh strong model trained (with the run's loss)
    on the previous student's soft labels of the whole weak-label half (student labels cost no budget); a method
    with ``reapply_s2s`` (the probe methods' default, as EleutherAI/w2s) transforms those labels first
    (``<name>_train_labels``, no budget)."""
    if cfg.s2s < 0:
        raise W2SGError(f"s2s={cfg.s2s}: the number of strong-to-strong iterations must be >= 0")
    method = method_spec(cfg.labels)
    reapply = reapplies(cfg.labels)
    teacher, name = stages["w2s"], "w2s"
    for i in range(1, cfg.s2s + 1):
        labels = labels_stage(cfg, teacher, f"{name}_labels:{cfg.strong.name}")
        stages[f"{name}_labels"] = labels
        if reapply:
            labels = transform_stage(cfg, {"labels": labels}, probe_features(cfg, method),
                                     f"{name}_train_labels:{method['name']}", method, None)
            stages[f"{name}_train_labels"] = labels
        name = f"s2s{i}"
        teacher = stages[name] = train_stage(cfg, cfg.strong, labels, cfg.loss, f"s2s{i}:{cfg.strong.name}",
                                             Role.S2S, Side.STRONG)


def size_warnings(cfg: Config) -> List[str]:
    """A teacher larger than its student (by ``params``): legitimate as a reverse pair, but worth saying."""
    pairs = [("weak", cfg.weak, "strong", cfg.strong)]
    if cfg.chain is not None:
        models = chain_models(cfg)
        pairs += [(f"chain link {i}: teacher", t, "student", s) for i, (t, s) in enumerate(zip(models, models[1:]), 1)]
    return [f"{a} model {t.name} ({t.params / 1e6:.1f}M params) is larger than the {b} model {s.name} "
            f"({s.params / 1e6:.1f}M): a strong-to-weak run; check weak=/strong= if not meant"
            for a, t, b, s in pairs if t.params > s.params]


def select(cfg: Config, stages: Dict[str, Stage]) -> Dict[str, Stage]:
    """The stages this run executes: ``cfg.stages`` (names of the plan) and the stages they need; null: all."""
    only = cfg.stages
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


def pending(cfg: Config, store: object, stages: Dict[str, Stage] = None) -> Dict[str, Stage]:
    """The selected stages of this run that it would compute: not stored yet, or named in ``recompute``.
    ``store``: a w2sg.core.store.Store (or None: no store yet, everything is pending)."""
    selected = select(cfg, plan(cfg) if stages is None else stages)
    if store is None:
        return dict(selected)
    return {name: s for name, s in selected.items()
            if name in cfg.recompute or store.status(s.key) != "done"}  # type: ignore[attr-defined]


@dataclass
class SharedGroup:
    """Missing shared stages computed by one Slurm job: a ground-truth training (weak or ceiling model), plus
    the weak labels when a job needs them. ``source`` is the position of the job whose config runs them, under
    the stage names ``names`` of that job's plan; ``jobs``: positions of the jobs that need them."""

    key: str  # the ground-truth training's stage key
    keys: set
    labels: List[str]
    source: int = 0
    names: List[str] = field(default_factory=list)
    jobs: List[int] = field(default_factory=list)


def shared_stage_groups(cfgs: Sequence[Config]) -> List[SharedGroup]:
    """The missing shared stages of these jobs' plans (typed configs), one group per ground-truth training (by
    stage key, so a model that is the weak model of one pair and the strong model of another trains once)."""
    from w2sg.core.store import Store

    stores: Dict[str, Any] = {}
    plans = [select(cfg, plan(cfg)) for cfg in cfgs]
    groups: Dict[str, SharedGroup] = {}  # key of the ground-truth training -> its group
    for pos, (cfg, stages) in enumerate(zip(cfgs, plans)):
        store = stores.setdefault(str(cfg.store_dir), Store(cfg.store_dir))
        for stage in stages.values():
            if not stage.shared() or store.status(stage.key) == "done":
                continue
            root = stage if stage.kind is Kind.TRAIN else stage.inputs["model"]
            group = groups.setdefault(root.key, SharedGroup(root.key, set(), []))
            if stage.key not in group.keys:
                group.keys.add(stage.key)
                group.labels.append(stage.label)
            if pos not in group.jobs:
                group.jobs.append(pos)
    for group in groups.values():  # a job whose plan holds all of the group's stages runs them (one always does)
        group.source = next(pos for pos in group.jobs if group.keys <= {s.key for s in plans[pos].values()})
        group.names = [name for name, s in plans[group.source].items() if s.key in group.keys]
    return list(groups.values())
