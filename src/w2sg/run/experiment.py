"""One experiment, linear: plan its stages, run them, assemble metrics.json, one tracking call; the end-of-run table."""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional, Tuple

from w2sg.core.config import Config
from w2sg.core.graph import Stage
from w2sg.core.methods import budget_spec, ensemble_members, method_spec
from w2sg.core.plan import chain_models, plan, select, size_warnings
from w2sg.core.store import Store
from w2sg.ml.metrics import pgr
from w2sg.results import diagnostics
from w2sg.run.runner import Outcome, Runner, task_sizes
from w2sg.run.tracking import Tracker

log = logging.getLogger("w2sg")


def _pgr_entry(weak: float, w2s: float, ceiling: float) -> Dict[str, Any]:
    value, reason = pgr(weak, w2s, ceiling)
    return {"pgr": value, "pgr_reason": reason} if reason else {"pgr": value}


def run(cfg: Config, runner: Runner, tracker: Optional[Tracker] = None) -> Dict[str, Any]:
    """One experiment, in order: plan its stages, run the selected ones through the store, assemble its metrics
    (metrics.json), and log it to ``tracker`` in one call (the stages' own runs are logged as they train)."""
    warnings = size_warnings(cfg)
    for warning in warnings:
        log.warning(warning)
    stages = plan(cfg)
    selected = select(cfg, stages)
    outcomes: Dict[str, Outcome] = {
        name: runner.run(stage, force=name in cfg.recompute) for name, stage in selected.items()}
    runner.release_weights(selected.values())  # store.keep_weights: e.g. the weak model's, once its labels are stored
    metrics = experiment_metrics(cfg, runner, stages, selected, outcomes, warnings)
    if tracker is not None and tracker.enabled and not metrics.get("subset"):
        track_experiment(cfg, tracker, metrics, computed=any(not o.reused for o in runner.outcomes.values()))
    return metrics


def experiment_metrics(cfg: Config, runner: Runner, stages: Dict[str, Stage], selected: Dict[str, Stage],
                       outcomes: Dict[str, Outcome], warnings: List[str]) -> Dict[str, Any]:
    """metrics.json of an experiment from its stages' outcomes: accuracies, PGR (with its CI over test examples),
    diagnostics, method and chain results, and the settings that tell it apart in reports."""
    subset = len(selected) < len(stages)  # stages=[...]: part of the experiment, not a result with PGR

    def ran(name: str, metric: str) -> Any:  # None for a stage that did not run
        return outcomes[name].metrics[metric] if name in outcomes else None

    acc = {k: ran(k, "acc") for k in ("weak", "ceiling", "w2s")}
    auroc = {k: ran(k, "auroc") for k in ("weak", "ceiling", "w2s")}
    metrics: Dict[str, Any] = {
        "task": cfg.task.name,
        "loss": cfg.loss["name"],
        "seed": cfg.seed,
        "weak": {"model": cfg.weak.name, "params": cfg.weak.params, "size": cfg.weak.size},
        "strong": {"model": cfg.strong.name, "params": cfg.strong.params, "size": cfg.strong.size},
        "acc": acc,
        "auroc": auroc,
        "weak_label_acc": ran("weak_labels", "acc"),
        "task_sizes": task_sizes(cfg, outcomes),  # examples used (and asked for: task.n_train / n_test)
        **({"pgr": None, "pgr_reason": f"only stages {', '.join(selected)} ran (stages=)"} if subset
           else _pgr_entry(acc["weak"], acc["w2s"], acc["ceiling"])),
        "stages": {
            name: {"key": o.key, "reused": o.reused, "seconds": round(o.seconds, 3), "label": stages[name].label}
            for name, o in outcomes.items()
        },
        # inputs too (e.g. probe features): the summary's count
        "stages_ran": _stages_ran(runner.outcomes, selected.values()),
        **({"warnings": warnings} if warnings else {}),
    }
    val = validation_metrics(outcomes)
    if val is not None:
        metrics["val"] = val
    metrics.update(method_metrics(cfg, outcomes, acc, auroc, subset))
    if subset:
        metrics["subset"] = list(selected)  # the stages that ran; reports skip such results
        return metrics
    # student vs teacher (misfit, against the labels it trained on) and PGR's CI over test examples, from the
    # stored predictions
    keys = {k: outcomes[k].key for k in ("weak", "weak_labels", "ceiling", "w2s")}
    keys["targets"] = stages["w2s"].inputs["labels"].key
    store, data = runner.store, runner.context.data
    test_y = [y for _, y in data.test]
    metrics["diagnostics"], metrics["pgr_ci"] = diagnostics.for_run(store, keys, test_y, [y for _, y in data.weak])
    if "train_labels" in stages and any(n.startswith("member") for n in stages["train_labels"].inputs):
        metrics["ensemble"] = ensemble_report(store, stages, test_y, acc)
    if cfg.chain is not None:
        metrics["chain"] = chain_report(cfg, outcomes, acc)
    from w2sg.results.collect import settings_of_stages

    metrics["settings"] = settings_of_stages(stages)  # what tells this experiment apart in reports
    metrics["settings"].update(method_settings(cfg))
    return metrics


def _stages_ran(ran_by_key: Dict[str, Outcome], selected: Any) -> Dict[str, int]:
    """How many stages this experiment ran through the store (the selected ones and every input they read, which
    ``stages`` above leaves out) and how many of those were reused, from the runner's outcomes (by stage key)."""
    seen: Dict[str, Stage] = {}
    todo = list(selected)
    while todo:
        stage = todo.pop()
        if stage.key not in seen:
            seen[stage.key] = stage
            todo.extend(stage.inputs.values())
    ran = [ran_by_key[k] for k in seen if k in ran_by_key]
    return {"n": len(ran), "reused": sum(o.reused for o in ran)}


def validation_metrics(outcomes: Dict[str, Outcome]) -> Optional[Dict[str, Any]]:
    """train.val_frac > 0: each model's final accuracy on its held-out rows (what tuning objectives, val.*, read, so
    the test split is read once): weak and ceiling against ground truth (their ground-truth half's), w2s against its
    validation labels (train.val_labels: the weak labels by default, all a real user has). ``pgr_oracle``: PGR from
    these accuracies when w2s validated against ground truth (an oracle: ground truth selects the student; the
    three models are measured on held-out rows of their own training halves)."""
    vals = {k: outcomes[k].metrics.get("val") if k in outcomes else None for k in ("weak", "ceiling", "w2s")}
    if not any(vals.values()):
        return None
    out: Dict[str, Any] = {m: {k: v[m] if v else None for k, v in vals.items()} for m in ("acc", "auroc")}
    out["labels"] = {k: v["labels"] if v else None for k, v in vals.items()}
    if out["labels"]["w2s"] == "ground_truth" and None not in out["acc"].values():
        entry = _pgr_entry(out["acc"]["weak"], out["acc"]["w2s"], out["acc"]["ceiling"])
        out["pgr_oracle"] = entry["pgr"]
    return out


def method_metrics(cfg: Config, outcomes: Dict[str, Outcome], acc: Dict[str, Any], auroc: Dict[str, Any],
                   subset: bool) -> Dict[str, Any]:
    """labels= / budget=: the training set's size and label accuracy (``train_labels``); s2s=N: ``acc.s2s<i>``
    (added to ``acc`` and ``auroc``) and ``s2s`` with the last iteration's PGR."""
    out: Dict[str, Any] = {}
    if "train_labels" in outcomes:
        out["train_labels"] = outcomes["train_labels"].metrics
    n = cfg.s2s
    if n:
        for i in range(1, n + 1):
            o = outcomes.get(f"s2s{i}")
            acc[f"s2s{i}"], auroc[f"s2s{i}"] = (o.metrics["acc"], o.metrics["auroc"]) if o else (None, None)
        last = acc[f"s2s{n}"]
        out["s2s"] = {"iterations": n, "acc": last, **(
            {"pgr": None, "pgr_reason": "not every stage ran (stages=)"} if subset or last is None
            else _pgr_entry(acc["weak"], last, acc["ceiling"]))}
    return out


def ensemble_report(store: Store, stages: Dict[str, Stage], test_labels: List[int],
                    acc: Dict[str, Any]) -> Dict[str, Any]:
    """labels=ensemble: the ensemble's own test accuracy (its members' test probabilities averaged, as their labels
    are for the student) and PGR against it: (w2s - ensemble) / (ceiling - ensemble). The student's supervisor is
    the ensemble, so this PGR says what it recovered beyond its supervisor; ``pgr`` stays against the run's weak
    model (``acc.weak``), as for every other run."""
    from w2sg.ml.methods import average
    from w2sg.ml.metrics import accuracy

    members = [dep.inputs["model"] for name, dep in sorted(stages["train_labels"].inputs.items())
               if name.startswith("member")]
    probs = average([store.get(m.key).read_array("test_probs") for m in members])
    ens = accuracy(probs, test_labels)
    value, reason = pgr(ens, acc["w2s"], acc["ceiling"])
    out = {"members": len(members), "acc": ens, "pgr": value}
    if reason:
        out["pgr_reason"] = (f"ceiling ({acc['ceiling']:.4f}) does not exceed the ensemble ({ens:.4f}): "
                             "no gap to recover")
    return out


def method_settings(cfg: Config) -> Dict[str, Any]:
    """labels=, budget= and s2s= as report settings, only where they differ from the plain run (so the settings of
    plain runs are as before)."""
    out: Dict[str, Any] = {}
    method = method_spec(cfg.labels)
    if method["name"] != "none":
        out.update({f"labels.{k}": v for k, v in method.items()})
    if method["name"] == "ensemble":
        out["labels.members"] = json.dumps([f"{m.name}@seed{s}" for m, s in ensemble_members(cfg)])
    budget = budget_spec(cfg.budget)
    if budget is not None:
        out.update({f"budget.{k}": v for k, v in budget.items()})
    if cfg.s2s:
        out["s2s.iterations"] = cfg.s2s
    return out


def track_experiment(cfg: Config, tracker: Tracker, metrics: Dict[str, Any], computed: bool) -> None:
    """The experiment's own W&B run (grouped with its stages' runs): accuracies, PGR and settings."""
    from w2sg.run.tracking import experiment_run_id

    acc, auroc = metrics["acc"], metrics["auroc"]
    summary = {"acc_weak": acc["weak"], "acc_ceiling": acc["ceiling"], "acc_w2s": acc["w2s"], "pgr": metrics["pgr"],
               "auroc_weak": auroc["weak"], "auroc_ceiling": auroc["ceiling"], "auroc_w2s": auroc["w2s"],
               "weak_label_acc": metrics["weak_label_acc"]}
    from w2sg.results import stats

    summary.update({k: v for k, v in stats.ci_columns(metrics).items() if v is not None})  # PGR's CI, noise warning
    summary.update({f"diag_{k}": v for k, v in diagnostics.row(metrics).items() if v is not None})
    if "ensemble" in metrics:
        summary.update(acc_ensemble=metrics["ensemble"]["acc"], pgr_vs_ensemble=metrics["ensemble"]["pgr"])
    if "chain" in metrics:
        ch = metrics["chain"]
        summary.update(acc_chain=ch["end_to_end"]["acc"], pgr_chain=ch["end_to_end"]["pgr"],
                       chain_minus_direct=ch["bootstrap_minus_direct"])
    config = {"task": metrics["task"], "loss": metrics["loss"], "seed": metrics["seed"],
              "weak_model": metrics["weak"]["model"], "weak_params": metrics["weak"]["params"],
              "strong_model": metrics["strong"]["model"], "strong_params": metrics["strong"]["params"],
              "chain": cfg.chain.name if cfg.chain is not None else None, "settings": metrics["settings"],
              "stage_keys": {name: s["key"] for name, s in metrics["stages"].items()}}
    name = (f"{metrics['weak']['model']}->{metrics['strong']['model']} {metrics['loss']} seed {metrics['seed']}"
            + (f" chain {cfg.chain.name}" if cfg.chain is not None else ""))
    tracker.experiment_run(experiment_run_id(s["key"] for s in metrics["stages"].values()), name, config, summary,
                           computed)


def chain_report(cfg: Config, outcomes: Dict[str, Outcome], acc: Dict[str, float]) -> Dict[str, Any]:
    """Per link: teacher, student, accuracies and PGR of the link; end to end vs the direct M1 -> Mn run."""
    models = chain_models(cfg)
    links = []
    teacher_acc = acc["weak"]
    for i, (teacher, student) in enumerate(zip(models, models[1:]), start=1):
        student_acc = outcomes[f"link{i}"].metrics["acc"]
        ceiling = outcomes[f"ceiling{i}"].metrics["acc"] if i < len(models) - 1 else acc["ceiling"]
        links.append({"teacher": teacher.name, "student": student.name, "teacher_acc": teacher_acc,
                      "acc": student_acc, "ceiling": ceiling, **_pgr_entry(teacher_acc, student_acc, ceiling)})
        teacher_acc = student_acc
    final = links[-1]["acc"]
    end_to_end = _pgr_entry(acc["weak"], final, acc["ceiling"])
    return {
        "name": cfg.chain.name,
        "models": [m.name for m in models],
        "links": links,
        "end_to_end": {"acc": final, **end_to_end},
        "direct": {"acc": acc["w2s"], **_pgr_entry(acc["weak"], acc["w2s"], acc["ceiling"])},
        "bootstrap_minus_direct": final - acc["w2s"],
    }


def table(metrics: Dict[str, Any]) -> str:
    """A short plain-text summary printed at the end of a run."""
    rows: List[Tuple[str, str]] = [
        ("task / loss / seed", f"{metrics['task']} / {metrics['loss']} / {metrics['seed']}"),
        ("weak", f"{metrics['weak']['model']} ({metrics['weak']['params'] / 1e6:.1f}M)"),
        ("strong", f"{metrics['strong']['model']} ({metrics['strong']['params'] / 1e6:.1f}M)"),
    ]
    for k in ("weak", "ceiling", "w2s"):
        au = metrics["auroc"][k]
        if metrics["acc"][k] is None:
            rows.append((f"acc {k}", "not run (stages=)"))
            continue
        rows.append((f"acc {k}", f"{metrics['acc'][k]:.4f}" + (f"   auroc {au:.4f}" if au is not None else "")))
    rows.append(("PGR", f"{metrics['pgr']:.3f}" if metrics["pgr"] is not None else f"n/a: {metrics['pgr_reason']}"))
    if "ensemble" in metrics:  # labels=ensemble: the supervisor's own accuracy, and PGR against it
        e = metrics["ensemble"]
        rows.append((f"acc ensemble ({e['members']})", f"{e['acc']:.4f}"))
        rows.append(("PGR vs ensemble", f"{e['pgr']:.3f}" if e["pgr"] is not None else f"n/a: {e['pgr_reason']}"))
    rows.extend(_ci_rows(metrics))
    if "chain" in metrics:
        ch = metrics["chain"]
        for link in ch["links"]:
            p = link["pgr"]
            rows.append((f"  {link['teacher']} -> {link['student']}",
                         f"acc {link['acc']:.4f}  PGR {p:.3f}" if p is not None else f"acc {link['acc']:.4f}  PGR n/a"))
        e, d = ch["end_to_end"], ch["direct"]
        fmt = lambda v: f"{v:.3f}" if v is not None else "n/a"  # noqa: E731
        rows.append(("chain end-to-end", f"acc {e['acc']:.4f}  PGR {fmt(e['pgr'])}"))
        rows.append(("direct", f"acc {d['acc']:.4f}  PGR {fmt(d['pgr'])}"))
    if "train_labels" in metrics:
        t = metrics["train_labels"]
        rows.append((f"labels ({t['method']})", f"{t['n']} rows ({t['n_weak']} weak, {t['n_gt']} ground truth, "
                                                 f"{t['n_dropped']} dropped), label acc {t['acc']:.4f}"))
    if "s2s" in metrics:
        for i in range(1, metrics["s2s"]["iterations"] + 1):
            a = metrics["acc"][f"s2s{i}"]
            rows.append((f"acc s2s{i}", f"{a:.4f}" if a is not None else "not run (stages=)"))
        p = metrics["s2s"]["pgr"]
        rows.append(("PGR s2s", f"{p:.3f}" if p is not None else f"n/a: {metrics['s2s']['pgr_reason']}"))
    ran = metrics["stages_ran"]  # every stage run, inputs included (metrics["stages"] names the plan's top level)
    rows.append(("stages", f"{ran['n']} ({ran['reused']} reused from the store)"))
    rows += [("warning", w) for w in metrics.get("warnings", [])]  # repeated at the end, where it is read
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _transformed(d: Dict[str, Any]) -> bool:
    """Whether the student trained on other labels than the weak model's raw ones (labels= / budget=)."""
    return d.get("targets") == "train_labels"


def _ci_rows(metrics: Dict[str, Any]) -> List[Tuple[str, str]]:
    """PGR's CI over test examples, its noise warning, and the student-vs-teacher diagnostics."""
    rows: List[Tuple[str, str]] = []
    ci = metrics.get("pgr_ci")
    if ci:
        span = (f"{ci['low']:+.3f} .. {ci['high']:+.3f}" if ci["low"] is not None
                else f"unbounded ({ci.get('pgr_ci_reason', '')})")
        rows.append((f"PGR {ci['level']:.0%} CI", f"{span}  (bootstrap over {ci['n_test']} test examples)"))
        if ci.get("warning"):
            rows.append(("  warning", ci["warning"]))
    d = metrics.get("diagnostics")
    if d:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        rows.append(("misfit (transfer)", f"sq {fmt(d['misfit_sq'])}  kl {fmt(d['misfit_kl'])}  "
                                          f"disagreement {fmt(d['misfit_disagreement'])}"
                                          + ("  (vs its training targets)" if _transformed(d) else "")))
        if _transformed(d):
            rows.append(("misfit (raw weak)", f"sq {fmt(d['misfit_sq_raw_weak'])}  kl {fmt(d['misfit_kl_raw_weak'])}  "
                                              f"disagreement {fmt(d['misfit_disagreement_raw_weak'])}"))
        if d.get("misfit_sq_test") is not None:
            rows.append(("misfit (test)", f"sq {fmt(d['misfit_sq_test'])}  kl {fmt(d['misfit_kl_test'])}  "
                                          f"disagreement {fmt(1 - d['teacher_agreement_test'])}"))
        rows.append(("gain (test)", f"brier {fmt(d['gain_sq'])}  xent {fmt(d['gain_xent'])}  acc {fmt(d['gain_acc'])}"))
        rows.append(("  note", diagnostics.REALISABILITY))
        rows.append(("student vs teacher", f"agreement on test {fmt(d['teacher_agreement_test'])}  "
                                           f"weak-label fit {fmt(d['weak_label_fit'])}  "
                                           f"weak-label acc {fmt(d['weak_label_acc'])}"))
    return rows
