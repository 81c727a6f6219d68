"""w2sg's Slurm launcher for sweeps (Hydra's submitit launcher, plus what sweeps over a stage store need).

- Jobs whose stages are all in the store are not submitted: they run here in seconds (reading the store) and
  write their metrics.json, so rerunning a sweep submits only what is missing.
- ``wait: false`` submits and returns at once ("submit and walk away"); ``w2sg status -m ...`` follows the
  sweep, and rerunning the same command later collects what finished and resubmits what is missing.
- With ``wait: true`` every job is awaited; the jobs that failed are then reported together, each with its
  Slurm id and log file, instead of stopping at the first failure.
- Preemption and time limits: submitit's checkpoint signal reaches the training loop, which saves a checkpoint
  and lets submitit requeue the job (``max_num_timeout`` times); the requeued job resumes from it.
- ``shared_stages``: how jobs that need the same weak or ceiling stage share it. ``lock``: every job is
  submitted at once; a job that needs a stage another job is computing waits on its lock in the store.
  ``dependency``: one job per missing shared stage group (a weak model and its labels; a ceiling model) runs
  first (the same task with ``stages=[...]``), then each experiment's job with a Slurm ``afterok`` dependency
  on the jobs computing its inputs (``--kill-on-invalid-dep=yes``: a job whose input failed is cancelled).
- Each job asks for its own resources: the profile's GPUs, memory, time limit (``${strong.resources.*}``) are
  resolved in each job's config, and ``gpu_constraints`` (GPU memory in GB -> constraint) picks the smallest GPU
  that holds the job's largest stage by the memory estimate (w2sg.run.resources); one array per distinct request.
"""


import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf, open_dict

from w2sg.app import hydra_compat, run_id
from w2sg.app.hydra_compat import BasicSweeper, filter_overrides
from w2sg.core.errors import W2SGError

log = logging.getLogger("w2sg.launcher")
# Hydra imports every plugin before it composes a config (a run, a sweep, the compose API), and a Slurm job
# imports this module to unpickle its launcher: ${w2sg.run_id:} in the run and sweep folders resolves everywhere.
run_id.register()


@dataclass
class W2sgSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.w2sg_launcher.w2sg_launcher.W2sgSlurmLauncher"
    wait: bool = True  # false: submit and return at once
    skip_done: bool = True  # run jobs whose stages are all stored here instead of submitting them
    # lock: submit every job at once, jobs needing a stage another job computes wait on its lock in the store;
    # dependency: submit the missing weak/ceiling stages first, then the experiments with Slurm dependencies
    # (benchmarks/slurm_shared_stages.py: lock finished the 2x2 tiny grid on the local Slurm 1.66x sooner, with half
    # the job start-ups and no barrier between the phases, so it is the default)
    shared_stages: str = "lock"
    # GPU memory in GB -> the Slurm constraint that guarantees it, e.g. {40: a100_40g, 80: "a100_80g|h100"}: a job
    # without a constraint of its own gets the smallest GPU that holds its largest stage (w2sg.run.resources)
    gpu_constraints: Any = None


SHARED_STAGES = ("lock", "dependency")
SHARED_JOB = "shared_stages_"  # job_id prefix that marks a shared-stage job (it must fail loudly, see __call__)


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


def shared_stage_groups(cfgs: Sequence[Any]) -> List[SharedGroup]:
    """The missing shared stages of these jobs' plans, one group per ground-truth training (by stage key, so a
    model that is the weak model of one pair and the strong model of another trains once)."""
    from w2sg.app.config import resolve
    from w2sg.core.graph import Kind
    from w2sg.core.plan import plan, select
    from w2sg.core.store import Store

    stores: Dict[str, Any] = {}
    cfgs = [resolve(cfg) for cfg in cfgs]
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


def _error_line(error: str) -> str:
    """The line that says what went wrong: the exception line of a traceback (submitit's FailedJobError), else the
    first line (a Hydra job's own exception)."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    if "Traceback (most recent call last):" in lines:
        end = next((i for i, ln in enumerate(lines) if ln.startswith("You can check full logs")), len(lines))
        return next(ln for ln in reversed(lines[:end]) if ln.strip("-"))  # the trace ends above a line of dashes
    return lines[0] if lines else "failed"


def _stopped_line(e: Any) -> str:
    """What a job's Preempted says: where it stopped, where its checkpoint is, how to resume."""
    saved = f"its checkpoint is saved ({e.checkpoint})" if e.checkpoint else "its checkpoint is saved"
    return (f"cancelled or preempted ({e.signal_name}) at step {e.step} of {e.stage or 'a training stage'}; "
            f"{saved}: rerun the sweep to resume it from there")


def _summary(failed: int, stopped: int, total: int, shared_failed: int, shared_total: int) -> str:
    """The first line of a sweep's failure report."""
    parts = [f"{failed} of {total} jobs failed"] if failed or not stopped else []
    if stopped:
        parts.append(f"{stopped} of {total} jobs were cancelled or preempted")
    head = " and ".join(parts)
    if shared_failed:
        head += f" ({shared_failed} of {shared_total} shared-stage jobs failed)"
    return (f"{head}; the others finished and their stages are stored (rerun the same command to resume or retry "
            "only what is missing):")


class SweepConfigs:
    """Every job's config exactly as Hydra's ``load_sweep_config`` composes it, at a fraction of the cost: the
    config is composed once per set of config-group choices (what shapes the defaults list), and each job's other
    overrides (seed=3, train.lr=...) are applied to a copy, with Hydra's own override code, in Hydra's order.
    ``shared=True`` (reading a job's config, not keeping it) applies them to one working copy per group choices
    while consecutive jobs set the same keys with plain ``key=value`` overrides (each job then overwrites every
    value the previous one set), which spares copying the config per job. Composing each job from scratch took
    over 1 s per job; tests/test_submit.py checks the configs equal Hydra's."""

    def __init__(self, loader: Any, master: Any) -> None:
        self.loader, self.master = loader, master
        self.hydra_overrides = hydra_compat.parse_overrides(master.hydra.overrides.hydra)
        self.bases: Dict[Tuple[str, ...], Any] = {}
        self.scratch: Dict[Tuple[str, ...], Tuple[Tuple[str, ...], Any]] = {}  # group choices -> (keys set, cfg)

    def _shapes_defaults(self, override: Any) -> bool:
        """As Hydra's defaults list classifies overrides (hydra._internal.defaults_list.Overrides): a config group
        choice, unless its value is a dict; hydra.searchpath changes where groups are found."""
        key = override.key_or_group
        if key == "hydra.searchpath":
            return True
        return hydra_compat.group_exists(self.loader, key) and not isinstance(override.value(), dict)

    @staticmethod
    def _plain(override: Any) -> bool:
        """``key=value`` that replaces the value (no +, ++, ~, and no dict value, which Hydra merges)."""
        return not (override.is_add() or override.is_force_add() or override.is_delete()
                    or isinstance(override.value(), dict))

    def __call__(self, sweep_overrides: Sequence[str], shared: bool = False) -> Any:
        import copy

        parsed = hydra_compat.parse_overrides(sweep_overrides)
        groups = tuple(o.input_line for o in parsed if self._shapes_defaults(o))
        values = [o for o in parsed if not self._shapes_defaults(o)]
        if groups not in self.bases:
            self.bases[groups] = self.loader.load_sweep_config(self.master, list(groups))
        keys = tuple(o.key_or_group for o in values)
        if shared and all(self._plain(o) for o in values):
            entry = self.scratch.get(groups)
            if entry is None or entry[0] != keys:
                entry = self.scratch[groups] = (keys, copy.deepcopy(self.bases[groups]))
            cfg = entry[1]
        else:
            cfg = copy.deepcopy(self.bases[groups])
        try:
            hydra_compat.apply_overrides(values, cfg)
        except Exception:
            self.scratch.pop(groups, None)  # half applied: start the next job from a clean copy
            raise
        everything = self.hydra_overrides + parsed
        app = [o for o in everything if not o.is_hydra_override()]
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.hydra = [o.input_line for o in everything if o.is_hydra_override()]
            cfg.hydra.overrides.task = [o.input_line for o in app]
            job = cfg.hydra.job.config.override_dirname
            cfg.hydra.job.override_dirname = hydra_compat.overrides_dirname(
                app, kv_sep=job.kv_sep, item_sep=job.item_sep, exclude_keys=job.exclude_keys)
        return cfg


@dataclass
class W2sgBasicSweeperConf:
    _target_: str = "hydra_plugins.w2sg_launcher.w2sg_launcher.W2sgBasicSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


class W2sgBasicSweeper(BasicSweeper):
    """Hydra's basic sweeper, checking that every job's config composes (before any job is launched) with
    SweepConfigs instead of composing each from scratch."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        configs = SweepConfigs(self.hydra_context.config_loader, self.config)
        for overrides in batch:
            configs(overrides, shared=True)


# Hydra imports this module when it scans hydra_plugins, which registers the launcher's and sweeper's configs.
ConfigStore.instance().store(group="hydra/launcher", name="w2sg_slurm", node=W2sgSlurmConf, provider="w2sg")
ConfigStore.instance().store(group="hydra/sweeper", name="w2sg_basic", node=W2sgBasicSweeperConf, provider="w2sg")


class W2sgSlurmLauncher(SlurmLauncher):
    def __init__(self, wait: bool = True, skip_done: bool = True, shared_stages: str = "lock",
                 gpu_constraints: Any = None, **params: Any) -> None:
        if shared_stages not in SHARED_STAGES:
            raise W2SGError(f"hydra.launcher.shared_stages: unknown value {shared_stages!r}; "
                            f"valid: {', '.join(SHARED_STAGES)}")
        super().__init__(**params)
        self.requests: Dict[int, Dict[str, Any]] = {}  # job index -> its own Slurm request (w2sg.run.resources)
        self.wait = wait
        self.skip_done = skip_done
        self.shared_stages = shared_stages

    def __call__(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: Dict[type, Any]) -> JobReturn:
        """Runs in the Slurm job. Hydra catches a job's exception (the job still ends COMPLETED); a shared-stage
        job raises it instead, so that Slurm marks it FAILED and cancels the jobs waiting on it (afterok).
        A job of several tasks (``tasks_per_node`` > 1, several nodes): task 0 runs the experiment, the others
        serve as its training ranks (w2sg.ml.distributed.serve_tasks) and return None."""
        from w2sg.ml.distributed import serve_tasks

        run_job = super().__call__  # bound here: the class this method belongs to, whatever the module's name holds
        ret = serve_tasks(lambda: run_job(sweep_overrides, job_dir_key, job_num, job_id, singleton_state))
        if ret is None:  # a serving task: task 0's result is the job's
            return ret
        if job_id.startswith(SHARED_JOB) and ret.status == JobStatus.FAILED:
            raise hydra_compat.job_error(ret)
        return ret

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_configs", None)  # composed configs: the Slurm job composes its own
        state["requests"] = {}  # what the jobs asked Slurm for: the submitting side's business
        return state

    def _sweep_config(self, overrides: Sequence[str], idx: int, shared: bool = False):
        """The job's config; ``shared``: one to read now, which the next job's call changes (SweepConfigs)."""
        if getattr(self, "_configs", None) is None:
            self._configs = SweepConfigs(self.hydra_context.config_loader, self.config)
        cfg = self._configs(overrides, shared=shared)
        with open_dict(cfg):
            cfg.hydra.job.id = f"{cfg.hydra.job.name}_{idx}"
            cfg.hydra.job.num = idx
        return cfg

    @staticmethod
    def _all_done(cfg, stores: Optional[Dict[str, Any]] = None) -> bool:
        """Whether the job would only read the store: nothing of it is pending (w2sg.core.plan.pending: every stage
        it runs, ``stages=``, is stored and none is to be recomputed, ``recompute=``); such a job runs here instead
        of on Slurm. ``stores``: the Store of each store_dir met so far (one per sweep, usually); a store with no
        stage at all is not planned against."""
        from w2sg.app.config import resolve
        from w2sg.core.plan import pending
        from w2sg.core.store import Store

        stores = {} if stores is None else stores
        if str(cfg.store_dir) not in stores:
            store = Store(cfg.store_dir)
            stores[str(cfg.store_dir)] = store if store.has_stages() else None
        store = stores[str(cfg.store_dir)]
        if store is None:  # an empty store: every job has stages to compute
            return False
        return not pending(resolve(cfg), store)

    def _request(self, idx: int, overrides: Sequence[str], cfg: Any = None) -> Dict[str, Any]:
        """Job ``idx``'s own Slurm request (w2sg.run.resources.job_request: its own strong model's resources,
        resolved in its config, and a GPU constraint from its memory estimate), kept for its submission."""
        from w2sg.run.resources import job_request

        if idx not in self.requests:
            composed = cfg if cfg is not None else self._sweep_config(overrides, idx, shared=True)
            self.requests[idx] = job_request(composed, f"#{idx} ({' '.join(filter_overrides(overrides))})")
        return self.requests[idx]

    def _executor(self, after: Sequence[Any] = (), shared: bool = False, request: Optional[Dict[str, Any]] = None):
        """A Slurm executor with the profile's parameters and one job's ``request`` (its resources, _request);
        ``after``: jobs that must succeed first (afterok)."""
        import submitit

        params = {**self.params, **(request or {})}
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        if shared:
            params["name"] = f"{params.get('name') or 'w2sg'}_shared"
        if after:
            params["dependency"] = "afterok:" + ":".join(job.job_id for job in after)
            # a job whose input failed is cancelled at once, instead of pending forever (DependencyNeverSatisfied)
            params["additional_parameters"] = {**(params.get("additional_parameters") or {}),
                                               "kill_on_invalid_dep": "yes"}
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        return executor

    def _submit_shared(self, todo: List[Tuple[int, List[str], Any]]) -> Tuple[List[SharedGroup], List[Any]]:
        """One job per missing shared stage group, as one array; returns the groups and their Slurm jobs."""
        groups = shared_stage_groups([cfg for _, _, cfg in todo])
        if not groups:
            return [], []
        params, state = [], hydra_compat.singleton_state()
        batches: Dict[Tuple[Any, ...], List[int]] = {}  # one array per distinct request
        for g, group in enumerate(groups):
            idx, overrides, cfg = todo[group.source]
            slug = re.sub(r"[^A-Za-z0-9_.-]", "_", group.labels[0]) + "_" + group.key[:8]
            params.append(([o for o in overrides if not o.startswith("stages=")]
                           + [f"stages=[{','.join(group.names)}]", f"hydra.sweep.subdir=shared/{slug}"],
                           "hydra.sweep.dir", idx, f"{SHARED_JOB}{g}", state))
            batches.setdefault(tuple(sorted(self._request(idx, overrides, cfg).items())), []).append(g)
        log.info("Submitting %d shared-stage jobs first (hydra.launcher.shared_stages=dependency)", len(groups))
        jobs: List[Any] = [None] * len(groups)
        for request, members in batches.items():
            array = self._executor(shared=True, request=dict(request)).map_array(
                self, *zip(*[params[g] for g in members]))
            for g, job in zip(members, array):
                jobs[g] = job
        for group, job in zip(groups, jobs):
            needed = ", ".join(f"#{todo[pos][0]}" for pos in group.jobs)
            log.info("\tshared stages %s (needed by %s) -> shared Slurm job %s, log %s", " + ".join(group.labels),
                     needed, job.job_id, job.paths.stderr)
        return groups, jobs

    def _submit(self, todo: List[Tuple[int, List[str], Any]], after: List[List[Any]]) -> List[Any]:
        """The experiments' jobs: one array per distinct set of shared-stage jobs they wait for."""
        from w2sg.run.resources import describe

        batches: Dict[Tuple[Any, ...], List[int]] = {}  # one array per distinct (inputs' jobs, request)
        for pos, deps in enumerate(after):
            idx, overrides, cfg = todo[pos]
            request = tuple(sorted(self._request(idx, overrides, cfg).items()))
            batches.setdefault((tuple(sorted(j.job_id for j in deps)), request), []).append(pos)
        jobs: List[Any] = [None] * len(todo)
        state = hydra_compat.singleton_state()  # a deep copy of Hydra's config store: once, not per job
        for (_, request), positions in batches.items():
            params = [(todo[pos][1], "hydra.sweep.dir", todo[pos][0], f"job_id_for_{todo[pos][0]}", state)
                      for pos in positions]
            executor = self._executor(after[positions[0]], request=dict(request))
            for pos, job in zip(positions, executor.map_array(self, *zip(*params))):
                jobs[pos] = job
        for (idx, overrides, _), job, deps in zip(todo, jobs, after):
            waits = f" after {', '.join(j.job_id for j in deps)}" if deps else ""
            log.info("\t#%d : %s  -> Slurm job %s%s (%s), log %s", idx, " ".join(filter_overrides(overrides)),
                     job.job_id, waits, describe(self.requests[idx]), job.paths.stderr)
        return jobs

    @staticmethod
    def _failure(job: Any) -> Tuple[Optional[JobReturn], Optional[str], bool]:
        """Wait for a job: (its JobReturn or None, None if it succeeded else the line saying what went wrong,
        whether it was stopped by a signal after saving a checkpoint: cancelled or preempted, not failed)."""
        from w2sg.core.errors import Preempted

        try:
            ret = job.results()[0]
        except Exception as e:  # submitit raises for a job that crashed, was killed or cancelled
            return None, _error_line(str(e)), False
        error = hydra_compat.job_error(ret)  # the job's own exception, caught by Hydra (None: it succeeded)
        if error is not None:
            if isinstance(error, Preempted):
                return ret, _stopped_line(error), True
            return ret, _error_line(str(error)), False
        return ret, None, False

    def _collect(self, todo: List[Tuple[int, List[str], Any]], jobs: List[Any], after: List[List[Any]],
                 groups: List[SharedGroup], shared_jobs: List[Any], total: int) -> Dict[int, JobReturn]:
        """Wait for every job; the JobReturn of each job that returned one. Raises one W2SGError naming every job
        that failed or was cancelled/preempted (Slurm id, stage, step, checkpoint, log, how to resume)."""
        results: Dict[int, JobReturn] = {}
        failures, failed = [], {}  # failed: Slurm id of a failed shared-stage job -> (its labels, its log)
        stopped = 0  # jobs cancelled or preempted after saving a checkpoint
        for group, job in zip(groups, shared_jobs):
            _, error, _ = self._failure(job)
            if error is not None:
                failed[job.job_id] = (" + ".join(group.labels), job.paths.stderr)
                failures.append(f"  shared stages {failed[job.job_id][0]}, Slurm id {job.job_id}: {error}"
                                f"\n    log: {job.paths.stderr}")
        n_shared = len(failures)
        for (idx, overrides, _), job, deps in zip(todo, jobs, after):
            what = f"  job #{idx} ({' '.join(filter_overrides(overrides))}), Slurm id {job.job_id}"
            lost = [d.job_id for d in deps if d.job_id in failed]
            if lost:  # Slurm cancels it (kill-on-invalid-dep); cancel it here too, whatever the cluster
                job.cancel(check=False)
                failures.append(f"{what}: not run: its shared-stage job {lost[0]} "
                                f"({failed[lost[0]][0]}) failed\n    log: {failed[lost[0]][1]}")
                continue
            ret, error, was_stopped = self._failure(job)
            stopped += was_stopped
            if ret is not None:
                results[idx] = ret
            if error is not None:
                failures.append(f"{what}: {error}\n    log: {job.paths.stderr}")
        if failures:
            raise W2SGError(_summary(len(failures) - n_shared - stopped, stopped, total, n_shared, len(shared_jobs))
                            + "\n" + "\n".join(failures))
        return results

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from w2sg.core.graph import memoized_specs

        with memoized_specs():  # every job's plan reads each model's and data file's fingerprint once
            return self._launch(job_overrides, initial_job_idx)

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        results: Dict[int, JobReturn] = {}
        todo: List[Tuple[int, List[str], Any]] = []  # (job index, overrides, composed config or None)
        plan_each = self.skip_done or self.shared_stages == "dependency"
        stores: Dict[str, Any] = {}
        keep = self.shared_stages == "dependency"  # the configs are planned again, together (shared_stage_groups)
        for pos, overrides in enumerate(job_overrides):
            idx = initial_job_idx + pos
            cfg = self._sweep_config(overrides, idx, shared=not keep) if plan_each else None
            if self.skip_done and self._all_done(cfg, stores):
                log.info("\t#%d : %s  (all stages stored: collected here, not submitted)", idx,
                         " ".join(filter_overrides(overrides)))
                results[idx] = hydra_compat.run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                       config=self._sweep_config(overrides, idx), job_dir_key="hydra.sweep.dir",
                                       job_subdir_key="hydra.sweep.subdir")
            else:
                self._request(idx, overrides, cfg)  # its resources, from the config composed here already
                todo.append((idx, list(overrides), cfg if keep else None))
        if todo:
            groups: List[SharedGroup] = []
            shared_jobs: List[Any] = []
            if self.shared_stages == "dependency":
                groups, shared_jobs = self._submit_shared(todo)
            after: List[List[Any]] = [[] for _ in todo]
            for group, job in zip(groups, shared_jobs):
                for pos in group.jobs:
                    after[pos].append(job)
            log.info("Submitting %d of %d jobs to Slurm; sweep dir %s", len(todo), len(job_overrides),
                     self.config.hydra.sweep.dir)
            jobs = self._submit(todo, after)
            if not self.wait:
                log.info("Not waiting (hydra.launcher.wait=false): follow with `w2sg status -m <same overrides>`; "
                         "rerun the same command to collect finished jobs and resubmit missing ones")
                for (idx, _, _), job in zip(todo, jobs):
                    results[idx] = hydra_compat.completed_job(None)
            else:
                results.update(self._collect(todo, jobs, after, groups, shared_jobs, len(job_overrides)))
        return [results[initial_job_idx + pos] for pos in range(len(job_overrides))]
