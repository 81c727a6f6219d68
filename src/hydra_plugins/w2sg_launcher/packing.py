"""Packing several experiments of a sweep into one Slurm job (``experiments_per_job`` > 1): which jobs share one
(``pack_jobs``), the pack's body that runs them each in its own process (``Pack``), and one experiment of a
submitted pack as the launcher reads a job (``PackMember``). Slurm jobs unpickle ``Pack`` from this module."""

import logging
import os
from typing import Any, Dict, List, Sequence, Tuple

from hydra.core.utils import JobReturn, JobStatus

from w2sg.core.errors import W2SGError

log = logging.getLogger("w2sg.launcher")


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

