"""Executes stages against the store: each stage's inputs first, then its kind's body (w2sg.run.bodies: train,
labels, features, lm, transform) with the run's StageContext (w2sg.run.context); the outcomes of the stages run,
and the weights freed after a run (store.keep_weights)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional

from w2sg.core.config import Config
from w2sg.core.graph import Kind, Stage
from w2sg.core.store import StageDir, Store
from w2sg.run.context import StageContext, runtime_line
# restoring freed weights lives in the context now; tests import its check from here
from w2sg.run.context import same_predictions  # noqa: F401
from w2sg.run.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    key: str
    reused: bool
    seconds: float
    metrics: Dict[str, Any]


class Runner:
    """Runs stages through the store, in order of their inputs, with one StageContext (w2sg.run.context) that
    each stage's body receives; keeps their outcomes and frees weights after a run (store.keep_weights)."""

    def __init__(self, cfg: Config, store: Store, tracker: Optional[Tracker] = None):
        from w2sg.core.config import check_ranges

        check_ranges(cfg)  # before anything is loaded or trained
        store.check_writable()
        self.cfg = cfg
        self.store = store
        self.context = StageContext(cfg, store, tracker)  # what each stage's body receives
        self.outcomes: Dict[str, Outcome] = {}  # stage key -> outcome

    # the context's readers, for callers that hold the runner (benchmarks/gpu_check.py, tests); bodies receive the
    # context itself
    @property
    def policy(self):
        return self.context.policy

    @property
    def data(self):
        return self.context.data

    def eval_batch_size(self, model: Any) -> int:
        return self.context.eval_batch_size(model)

    def tokenizer(self, model: Any):
        return self.context.tokenizer(model)

    def encode(self, model: Any, part: str):
        return self.context.encode(model, part)

    def inputs_of(self, stage: Stage, part: str):
        return self.context.inputs_of(stage, part)

    def features(self, stage: Stage) -> Dict[str, Any]:
        return self.context.features(stage)

    def load_trained(self, stage: Stage):
        return self.context.load_trained(stage)

    def run(self, stage: Stage, force: bool = False) -> Outcome:
        """Run a stage (its inputs first) through the store; ``force`` recomputes it even if it is stored."""
        if stage.key in self.outcomes:
            return self.outcomes[stage.key]
        for dep in stage.inputs.values():
            self.run(dep)
        start = time.time()
        from w2sg.run.bodies import BODIES

        body = BODIES[stage.kind]
        meta = {**stage.describe(), "task_name": self.cfg.task.name}
        sd, reused = self.store.compute(
            stage.key, meta, lambda out: self._run_body(body, stage, out), force=force,
            on_invalid=lambda why: log.warning("stage %s (%s) in the store is %s; recomputing", stage.key, stage.label, why),
        )
        outcome = Outcome(stage.key, reused, time.time() - start, sd.read_json("metrics.json"))
        where = "" if reused or stage.kind is Kind.TRANSFORM else \
            f" on {runtime_line(outcome.metrics.get('runtime') or self.context.runtime())}"
        log.info("%-28s %s  %s", stage.label, stage.key[:12],
                 "reused" if reused else f"done in {outcome.seconds:.1f}s{where}")
        self.outcomes[stage.key] = outcome
        return outcome

    def _run_body(self, body: Any, stage: Stage, out: StageDir) -> None:
        """A stage's body, with the GPU's peak memory counted from its start."""
        if stage.kind is not Kind.TRANSFORM and self.policy.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        body(self.context, stage, out)

    def release_weights(self, stages: Iterable[Stage]) -> int:
        """store.keep_weights after a run: ``needed`` frees the weights of each train stage whose labels stage is
        stored (every stage of the plan that reads them has run); ``none`` frees every train stage's weights;
        ``all`` keeps them. Returns the bytes freed."""
        from w2sg.core.store import human_bytes

        policy = self.cfg.store.keep_weights
        if policy == "all":
            return 0
        stages = list(stages)
        readers: Dict[str, list] = {}
        for s in stages:
            if s.kind is Kind.LABELS:
                readers.setdefault(s.inputs["model"].key, []).append(s)
        freed = 0
        for s in stages:
            if s.kind is not Kind.TRAIN or (policy == "needed" and s.key not in readers):
                continue
            if any(self.store.status(r.key) != "done" for r in readers.get(s.key, [])):
                continue
            size = self.store.free_weights(s.key, f"store.keep_weights={policy}")
            if size:
                log.info("%-28s %s  weights freed (%s; store.keep_weights=%s)", s.label, s.key[:12],
                         human_bytes(size), policy)
                self.context.forget(s.key)
            freed += size
        return freed


def task_sizes(cfg: Config, outcomes: Dict[str, Outcome]) -> Optional[Dict[str, Any]]:
    """The task sizes used (from any train stage's metrics), next to those asked for; a warning when smaller."""
    used = next((o.metrics["task_sizes"] for o in outcomes.values() if "task_sizes" in o.metrics), None)
    if used is None:
        return None
    asked = {"n_train": cfg.task.n_train, "n_test": cfg.task.n_test}
    all_reused = all(o.reused for o in outcomes.values())  # else load_task has warned already, with details
    if all_reused and (used["n_train"] < asked["n_train"] or used["n_test"] < asked["n_test"]):
        log.warning("task %r: used %d train and %d test examples, fewer than task.n_train=%d / task.n_test=%d "
                    "asked for: the data has no more usable rows", cfg.task.name, used["n_train"], used["n_test"],
                    asked["n_train"], asked["n_test"])
    return {**used, "requested": asked}
