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
- ``experiments_per_job`` (k): with k > 1 the jobs to submit are packed, in sweep order, k to a Slurm job among jobs
  of the same request (pack_jobs); a pack (Pack) runs its experiments concurrently, each in its own spawned process
  through the launcher's per-experiment body, sharing the job's GPU and CPUs (cpus_per_task // k threads each), and
  returns one JobReturn per experiment, which the collecting side reads as it reads one job's (PackMember).
"""


import logging
import os
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
    # k > 1: run k experiments (jobs of the sweep with the same request) concurrently in one Slurm job, each in its
    # own process, sharing the job's GPU and CPUs: small models on big GPUs. The pack asks for k times the host
    # memory and a GPU that holds its k experiments' largest stages (benchmarks/slurm_packing.py, local 2-CPU Slurm,
    # 2026-12-06: the 2x2 tiny grid in 4/2/1 Slurm jobs, 80/92/93 s with k=1/2/4: fewer jobs, the CPUs the limit)
    experiments_per_job: int = 1


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


def pack_jobs(requests: Sequence[Dict[str, Any]], k: int) -> List[List[int]]:
    """Packs of at most ``k`` jobs (positions in ``requests``, each job's Slurm request), in sweep order: each job
    joins the last pack of its request until that holds k; jobs of different requests are never packed together.
    The packs are ordered by their first job."""
    packs: List[List[int]] = []
    last: Dict[Tuple[Any, ...], List[int]] = {}  # request -> its pack being filled
    for pos, request in enumerate(requests):
        key = tuple(sorted(request.items()))
        if key not in last or len(last[key]) >= k:
            last[key] = []
            packs.append(last[key])
        last[key].append(pos)
    return packs


class PackMember:
    """One experiment of a pack, read as the launcher reads a submitted job: the pack's Slurm job (its id, log,
    cancel) and, as its result, the pack's result at ``slot``. ``after``: the shared-stage jobs the pack waits for
    (its members' together)."""

    def __init__(self, job: Any, slot: int, idxs: Sequence[int], after: Sequence[Any] = ()) -> None:
        self.job, self.slot, self.idxs, self.after = job, slot, list(idxs), list(after)
        self.job_id, self.paths = job.job_id, job.paths

    def results(self) -> List[JobReturn]:
        return [self.job.results()[0][self.slot]]

    def cancel(self, check: bool = True) -> None:
        self.job.cancel(check=check)

    def describe(self) -> str:
        return f"pack of {len(self.idxs)}: {', '.join(f'#{i}' for i in self.idxs)}"


_PACKED: Dict[str, Any] = {}  # in a pack's experiment process: the launcher and Hydra's state (_pack_start)


def _pack_start(payload: bytes, threads: int) -> None:
    """Start of an experiment's process in a pack: its share of the job's CPUs (before torch is imported), the
    launcher and Hydra's state. SIGTERM/SIGUSR1/SIGUSR2 are bypassed as submitit bypasses them in a job's process
    (a training stage still catches them to save a checkpoint and stop); the pack's process requeues the job."""
    import signal

    import cloudpickle

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), lambda signum, frame: log.warning(
            "experiment process %d: bypassing signal %s (the pack's job requeues or ends)", os.getpid(), signum))
    _PACKED["launcher"], _PACKED["state"] = cloudpickle.loads(payload)


def _pack_run(overrides: List[str], idx: int) -> bytes:
    """One experiment of a pack, in its own process: the launcher's per-experiment body, as a job of one runs it;
    its JobReturn pickled as submitit pickles a job's result (an exception of any class survives)."""
    import cloudpickle

    return cloudpickle.dumps(_PACKED["launcher"](overrides, "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                                                 _PACKED["state"]))


class Pack:
    """The body of one Slurm job that runs several experiments of a sweep at once (``experiments_per_job`` > 1):
    each in its own spawned process (one pool each: a member that dies takes no other with it) through the
    launcher's per-experiment body, with ``cpus // k`` CPU threads; returns their JobReturns in order.

    Preemption and time limits: Slurm signals every process of the job; the members still training save their
    checkpoints and stop, and submitit's handler here calls ``checkpoint``, which waits for them (up to half of
    ``signal_delay_s``) and requeues the whole pack: members that had finished then read their stages from the
    store, the others resume their checkpoints."""

    def __init__(self, launcher: Any) -> None:
        self.launcher = launcher
        self._futures: List[Any] = []

    def __getstate__(self) -> Dict[str, Any]:
        return {"launcher": self.launcher}  # not the running processes

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.launcher, self._futures = state["launcher"], []

    def __call__(self, members: Sequence[Tuple[List[str], int]], singleton_state: Dict[type, Any]) -> List[JobReturn]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        import cloudpickle

        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or len(os.sched_getaffinity(0)))
        threads = max(1, cpus // len(members))
        print(f"w2sg: a pack of {len(members)} experiments ({', '.join(f'#{idx}' for _, idx in members)}), each in "
              f"its own process with {threads} CPU thread(s)", flush=True)  # the job's log: no logging set up here
        payload = cloudpickle.dumps((self.launcher, singleton_state))
        spawn = multiprocessing.get_context("spawn")
        pools = [ProcessPoolExecutor(1, mp_context=spawn, initializer=_pack_start, initargs=(payload, threads))
                 for _ in members]
        try:
            self._futures = [pool.submit(_pack_run, list(overrides), idx)
                             for pool, (overrides, idx) in zip(pools, members)]
            results = [self._result(future, idx) for future, (_, idx) in zip(self._futures, members)]
        except BaseException:  # requeued (submitit exits) or killed: the experiments' processes go with the job
            for proc in multiprocessing.active_children():
                proc.terminate()
            for pool in pools:
                pool.shutdown(wait=False, cancel_futures=True)
            raise
        for pool in pools:
            pool.shutdown()
        return results

    @staticmethod
    def _result(future: Any, idx: int) -> JobReturn:
        """An experiment's JobReturn; a FAILED one saying so where its process died (killed, out of memory)."""
        import cloudpickle

        try:
            return cloudpickle.loads(future.result())
        except Exception as e:
            ret = JobReturn(status=JobStatus.FAILED)
            ret.return_value = W2SGError(f"job #{idx}: its process in the pack ended abruptly ({type(e).__name__}: "
                                         f"{e}); out of memory? see the pack's log")
            return ret

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's checkpoint signal reached the pack: let its experiments save their checkpoints (the signal is
        passed on in case the cluster signalled this process alone), then requeue the pack as it was submitted."""
        import multiprocessing
        import signal
        from concurrent.futures import wait

        import submitit

        for proc in multiprocessing.active_children():
            try:
                os.kill(proc.pid, signal.SIGUSR2)
            except ProcessLookupError:  # ended meanwhile
                pass
        wait(self._futures, timeout=float(self.launcher.params.get("signal_delay_s") or 60) / 2)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


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
        from w2sg.run.resources import job_memory

        launcher = composed.hydra.launcher
        mapping, gpus = OmegaConf.select(launcher, "gpu_constraints"), self.requests[idx].get("gpus_per_node")
        if not mapping or OmegaConf.select(launcher, "constraint") is not None or not gpus:
            return
        cfg = resolve(composed)
        sharded = cfg.train.device_map == "auto" and int(gpus) > 1
        self.gpu_needs[idx] = (job_memory(cfg)["bytes"] / (int(gpus) if sharded else 1),
                               OmegaConf.to_container(mapping))

    def _pack_request(self, idxs: Sequence[int]) -> Dict[str, Any]:
        """The Slurm request of a pack of jobs (of one request, pack_jobs): its GPUs, CPUs and time limit, ``k``
        times its host memory, and where the constraint comes from ``gpu_constraints``, the smallest GPU that holds
        the k experiments' largest stages together (they run at once on it)."""
        from w2sg.run.resources import GB

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
            fits = sorted((float(gb), str(c)) for gb, c in needs[0][1].items() if float(gb) * GB >= total)
            if not fits:
                raise W2SGError(f"jobs {jobs}: packed into one Slurm job (hydra.launcher.experiments_per_job="
                                f"{self.experiments_per_job}) they need about {total / GB:.1f} GB on one GPU, more "
                                "than the largest GPU of hydra.launcher.gpu_constraints; pack fewer experiments")
            request["constraint"] = fits[0][1]
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

    @staticmethod
    def _failure(job: Any) -> Tuple[Optional[JobReturn], Optional[str], bool]:
        """Wait for a job (or one experiment of a pack, PackMember): (its JobReturn or None, None if it succeeded
        else the line saying what went wrong, whether it was stopped by a signal after saving a checkpoint:
        cancelled or preempted, not failed)."""
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
            if hasattr(job, "idxs"):  # a PackMember (by duck type: Hydra's plugin scan may import this module anew)
                what += f" ({job.describe()})"
            lost = [d.job_id for d in getattr(job, "after", deps) if d.job_id in failed]
            if lost:  # Slurm cancels it (kill-on-invalid-dep); cancel it here too, whatever the cluster
                job.cancel(check=False)
                whose = "its" if lost[0] in {d.job_id for d in deps} else "its pack's"
                failures.append(f"{what}: not run: {whose} shared-stage job {lost[0]} "
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
