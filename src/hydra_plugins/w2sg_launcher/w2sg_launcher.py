"""w2sg's Slurm launcher for sweeps (Hydra's submitit launcher, plus what sweeps over a stage store need): the
launcher (submission and collection), its conf and the ConfigStore registrations. Beside it in this package:
sweep_configs (each job's config; the w2sg_basic sweeper), failures (the failure report), packing (packs of jobs);
the shared stages a sweep's jobs need are planned in w2sg.core.plan (shared_stage_groups).

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
- ``experiments_per_job`` (k): with k > 1 the jobs to submit are packed, in sweep order, k to a Slurm job among jobs
  of the same request (pack_jobs); a pack (Pack) runs its experiments concurrently, each in its own spawned process
  through the launcher's per-experiment body, sharing the job's GPU and CPUs (cpus_per_task // k threads each), and
  returns one JobReturn per experiment, which the collecting side reads as it reads one job's (PackMember).
"""


import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf, open_dict

from hydra_plugins.w2sg_launcher import failures
from hydra_plugins.w2sg_launcher.packing import Pack, PackMember, pack_jobs
from hydra_plugins.w2sg_launcher.sweep_configs import SweepConfigs, W2sgBasicSweeperConf
from w2sg.app import hydra_compat, run_id
from w2sg.app.hydra_compat import filter_overrides
from w2sg.core.errors import W2SGError

if TYPE_CHECKING:  # pragma: no cover
    from w2sg.core.plan import SharedGroup

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
    # k > 1: run k experiments (jobs of the sweep with the same request) concurrently in one Slurm job, each in its
    # own process, sharing the job's GPU and CPUs: small models on big GPUs. The pack asks for k times the host
    # memory and a GPU that holds its k experiments' largest stages (benchmarks/slurm_packing.py, local 2-CPU Slurm,
    # 2026-12-06: the 2x2 tiny grid in 4/2/1 Slurm jobs, 80/92/93 s with k=1/2/4: fewer jobs, the CPUs the limit)
    experiments_per_job: int = 1


SHARED_STAGES = ("lock", "dependency")
SHARED_JOB = "shared_stages_"  # job_id prefix that marks a shared-stage job (it must fail loudly, see __call__)


# Hydra imports this module when it scans hydra_plugins, which registers the launcher's and sweeper's configs.
ConfigStore.instance().store(group="hydra/launcher", name="w2sg_slurm", node=W2sgSlurmConf, provider="w2sg")
ConfigStore.instance().store(group="hydra/sweeper", name="w2sg_basic", node=W2sgBasicSweeperConf, provider="w2sg")


class W2sgSlurmLauncher(SlurmLauncher):
    def __init__(self, wait: bool = True, skip_done: bool = True, shared_stages: str = "lock",
                 gpu_constraints: Any = None, experiments_per_job: int = 1, **params: Any) -> None:
        if shared_stages not in SHARED_STAGES:
            raise W2SGError(f"hydra.launcher.shared_stages: unknown value {shared_stages!r}; "
                            f"valid: {', '.join(SHARED_STAGES)}")
        if isinstance(experiments_per_job, bool) or not isinstance(experiments_per_job, int) \
                or experiments_per_job < 1:
            raise W2SGError(f"hydra.launcher.experiments_per_job: {experiments_per_job!r} is not a number of "
                            "experiments per Slurm job; give an integer >= 1 (1: one experiment per job)")
        super().__init__(**params)
        self.requests: Dict[int, Dict[str, Any]] = {}  # job index -> its own Slurm request (w2sg.run.resources)
        # job index -> (GPU bytes its largest stage needs, GB -> constraint) where its constraint comes from the
        # profile's gpu_constraints: a pack of several such jobs needs a GPU for their sum (_pack_request)
        self.gpu_needs: Dict[int, Tuple[float, Dict[Any, str]]] = {}
        self.experiments_per_job = experiments_per_job
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
        state["gpu_needs"] = {}
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
            if self.experiments_per_job > 1:
                self._gpu_need(idx, composed)
        return self.requests[idx]

    def _gpu_need(self, idx: int, composed: Any) -> None:
        """Where job ``idx``'s GPU constraint comes from the profile's ``gpu_constraints`` (none set by hand): the
        GPU memory its largest stage needs per GPU (w2sg.run.resources.job_memory), kept for its pack's request."""
        from w2sg.app.config import resolve
        from w2sg.run.resources import per_gpu_bytes

        launcher = composed.hydra.launcher
        mapping, gpus = OmegaConf.select(launcher, "gpu_constraints"), self.requests[idx].get("gpus_per_node")
        if not mapping or OmegaConf.select(launcher, "constraint") is not None or not gpus:
            return
        self.gpu_needs[idx] = (per_gpu_bytes(resolve(composed), int(gpus)), OmegaConf.to_container(mapping))

    def _pack_request(self, idxs: Sequence[int]) -> Dict[str, Any]:
        """The Slurm request of a pack of jobs (of one request, pack_jobs): its GPUs, CPUs and time limit, ``k``
        times its host memory, and where the constraint comes from ``gpu_constraints``, the smallest GPU that holds
        the k experiments' largest stages together (they run at once on it)."""
        from w2sg.run.resources import GB, smallest_gpu

        request = dict(self.requests[idxs[0]])
        if len(idxs) == 1:
            return request
        jobs = ", ".join(f"#{i}" for i in idxs)
        if int(request.get("tasks_per_node") or 1) > 1:
            raise W2SGError(f"jobs {jobs}: hydra.launcher.experiments_per_job={self.experiments_per_job} packs "
                            f"experiments into one task; they ask for {request['tasks_per_node']} tasks per node: "
                            "set hydra.launcher.experiments_per_job=1 for jobs of several tasks")
        if request.get("mem_gb") is not None:
            request["mem_gb"] = request["mem_gb"] * len(idxs)
        needs = [self.gpu_needs[i] for i in idxs if i in self.gpu_needs]
        if needs:
            total = sum(need for need, _ in needs)
            constraint = smallest_gpu(needs[0][1], total)
            if constraint is None:
                raise W2SGError(f"jobs {jobs}: packed into one Slurm job (hydra.launcher.experiments_per_job="
                                f"{self.experiments_per_job}) they need about {total / GB:.1f} GB on one GPU, more "
                                "than the largest GPU of hydra.launcher.gpu_constraints; pack fewer experiments")
            request["constraint"] = constraint
        return request

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

    def _submit_shared(self, todo: List[Tuple[int, List[str], Any]]) -> Tuple[List["SharedGroup"], List[Any]]:
        """One job per missing shared stage group (w2sg.core.plan.shared_stage_groups of the jobs' typed configs),
        as one array; returns the groups and their Slurm jobs."""
        from w2sg.app.config import resolve
        from w2sg.core.plan import shared_stage_groups

        groups = shared_stage_groups([resolve(cfg) for _, _, cfg in todo])
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
        """The experiments' jobs: packs of ``experiments_per_job`` jobs of one request (pack_jobs; one job each
        with k = 1), one array per distinct (shared-stage jobs waited for, request); a pack waits for every
        shared-stage job its members need. Returns each experiment's Slurm job (k > 1: its PackMember)."""
        from w2sg.run.resources import describe

        packs = pack_jobs([self.requests[idx] for idx, _, _ in todo], self.experiments_per_job)
        if self.experiments_per_job > 1:
            log.info("Packing %d jobs into %d Slurm jobs (hydra.launcher.experiments_per_job=%d)", len(todo),
                     len(packs), self.experiments_per_job)
        waits = [list({j.job_id: j for pos in pack for j in after[pos]}.values()) for pack in packs]
        requests = [self._pack_request([todo[pos][0] for pos in pack]) for pack in packs]
        batches: Dict[Tuple[Any, ...], List[int]] = {}  # one array per distinct (inputs' jobs, request)
        for p, (deps, request) in enumerate(zip(waits, requests)):
            batches.setdefault((tuple(sorted(j.job_id for j in deps)), tuple(sorted(request.items()))), []).append(p)
        jobs: List[Any] = [None] * len(todo)
        state = hydra_compat.singleton_state()  # a deep copy of Hydra's config store: once, not per job
        for (_, request), numbers in batches.items():
            executor = self._executor(waits[numbers[0]], request=dict(request))
            if self.experiments_per_job == 1:
                params = [(todo[pos][1], "hydra.sweep.dir", todo[pos][0], f"job_id_for_{todo[pos][0]}", state)
                          for p in numbers for pos in packs[p]]
                submitted = executor.map_array(self, *zip(*params))
            else:
                submitted = executor.map_array(Pack(self), [[(todo[pos][1], todo[pos][0]) for pos in packs[p]]
                                                            for p in numbers], [state] * len(numbers))
            for p, job in zip(numbers, submitted):
                for slot, pos in enumerate(packs[p]):
                    jobs[pos] = job if self.experiments_per_job == 1 else PackMember(
                        job, slot, [todo[i][0] for i in packs[p]], waits[p])
        for p, pack in enumerate(packs):
            for pos in pack:
                idx, overrides, _ = todo[pos]
                job, deps = jobs[pos], waits[p]
                after_ = f" after {', '.join(j.job_id for j in deps)}" if deps else ""
                packed = f", {job.describe()}" if hasattr(job, "idxs") else ""  # a PackMember
                log.info("\t#%d : %s  -> Slurm job %s%s (%s%s), log %s", idx, " ".join(filter_overrides(overrides)),
                         job.job_id, after_, describe(requests[p]), packed, job.paths.stderr)
        return jobs

    def _collect(self, todo: List[Tuple[int, List[str], Any]], jobs: List[Any], after: List[List[Any]],
                 groups: List["SharedGroup"], shared_jobs: List[Any], total: int) -> Dict[int, JobReturn]:
        """Wait for every job; the JobReturn of each job that returned one. Raises one W2SGError naming every job
        that failed or was cancelled/preempted (Slurm id, stage, step, checkpoint, log, how to resume)."""
        results: Dict[int, JobReturn] = {}
        lines, failed = [], {}  # failed: Slurm id of a failed shared-stage job -> (its labels, its log)
        stopped = 0  # jobs cancelled or preempted after saving a checkpoint
        for group, job in zip(groups, shared_jobs):
            _, error, _ = failures.job_failure(job)
            if error is not None:
                failed[job.job_id] = (" + ".join(group.labels), job.paths.stderr)
                lines.append(failures.shared_failure(failed[job.job_id][0], job, error))
        n_shared = len(lines)
        for (idx, overrides, _), job, deps in zip(todo, jobs, after):
            what = failures.job_title(idx, overrides, job)
            lost = [d.job_id for d in getattr(job, "after", deps) if d.job_id in failed]
            if lost:  # Slurm cancels it (kill-on-invalid-dep); cancel it here too, whatever the cluster
                job.cancel(check=False)
                whose = "its" if lost[0] in {d.job_id for d in deps} else "its pack's"
                lines.append(failures.not_run(what, whose, lost[0], *failed[lost[0]]))
                continue
            ret, error, was_stopped = failures.job_failure(job)
            stopped += was_stopped
            if ret is not None:
                results[idx] = ret
            if error is not None:
                lines.append(failures.job_failed(what, error, job))
        if lines:
            raise W2SGError(failures.summary(len(lines) - n_shared - stopped, stopped, total, n_shared,
                                             len(shared_jobs)) + "\n" + "\n".join(lines))
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
            groups: List["SharedGroup"] = []
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
