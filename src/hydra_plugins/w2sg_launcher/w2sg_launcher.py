"""w2sg's Slurm launcher for sweeps (Hydra's submitit launcher, plus what sweeps over a stage store need).

- Jobs whose stages are all in the store are not submitted: they run here in seconds (reading the store) and
  write their metrics.json, so rerunning a sweep submits only what is missing.
- ``wait: false`` submits and returns at once ("submit and walk away"); ``w2sg status -m ...`` follows the
  sweep, and rerunning the same command later collects what finished and resubmits what is missing.
- With ``wait: true`` every job is awaited; the jobs that failed are then reported together, each with its
  Slurm id and log file, instead of stopping at the first failure.
- Preemption and time limits: submitit's checkpoint signal reaches the training loop, which saves a checkpoint
  and lets submitit requeue the job (``max_num_timeout`` times); the requeued job resumes from it.
"""


import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf, open_dict

from w2sg.errors import W2SGError

log = logging.getLogger("w2sg.launcher")


@dataclass
class W2sgSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.w2sg_launcher.w2sg_launcher.W2sgSlurmLauncher"
    wait: bool = True  # false: submit and return at once
    skip_done: bool = True  # run jobs whose stages are all stored here instead of submitting them


# Hydra imports this module when it scans hydra_plugins, which registers the launcher's config.
ConfigStore.instance().store(group="hydra/launcher", name="w2sg_slurm", node=W2sgSlurmConf, provider="w2sg")


class W2sgSlurmLauncher(SlurmLauncher):
    def __init__(self, wait: bool = True, skip_done: bool = True, **params: Any) -> None:
        super().__init__(**params)
        self.wait = wait
        self.skip_done = skip_done

    def _sweep_config(self, overrides: Sequence[str], idx: int):
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = f"{cfg.hydra.job.name}_{idx}"
            cfg.hydra.job.num = idx
        return cfg

    def _all_done(self, cfg) -> bool:
        from w2sg.experiment import plan
        from w2sg.store import Store

        store = Store(cfg.store_dir)
        return all(store.status(s.key) == "done" for s in plan(cfg).values())

    def _executor(self):
        import submitit

        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        return executor

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        results: Dict[int, JobReturn] = {}
        todo: List[Tuple[int, List[str]]] = []
        for pos, overrides in enumerate(job_overrides):
            idx = initial_job_idx + pos
            cfg = self._sweep_config(overrides, idx) if self.skip_done else None
            if cfg is not None and self._all_done(cfg):
                log.info("\t#%d : %s  (all stages stored: collected here, not submitted)", idx,
                         " ".join(filter_overrides(overrides)))
                results[idx] = run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                       config=cfg, job_dir_key="hydra.sweep.dir",
                                       job_subdir_key="hydra.sweep.subdir")
            else:
                todo.append((idx, list(overrides)))
        if todo:
            log.info("Submitting %d of %d jobs to Slurm; sweep dir %s", len(todo), len(job_overrides),
                     self.config.hydra.sweep.dir)
            params = [(o, "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()) for idx, o in todo]
            jobs = self._executor().map_array(self, *zip(*params))
            for (idx, overrides), job in zip(todo, jobs):
                log.info("\t#%d : %s  -> Slurm job %s, log %s", idx, " ".join(filter_overrides(overrides)),
                         job.job_id, job.paths.stderr)
            if not self.wait:
                log.info("Not waiting (hydra.launcher.wait=false): follow with `w2sg status -m <same overrides>`; "
                         "rerun the same command to collect finished jobs and resubmit missing ones")
                for (idx, _), job in zip(todo, jobs):
                    ret = JobReturn()
                    ret.status = JobStatus.COMPLETED
                    ret._return_value = None
                    results[idx] = ret
            else:
                failures = []
                for (idx, overrides), job in zip(todo, jobs):
                    try:
                        ret = job.results()[0]
                        results[idx] = ret
                        if ret.status != JobStatus.FAILED:
                            continue
                        error = str(ret._return_value)  # the job's own exception, caught by Hydra in the job
                    except Exception as e:  # submitit raises for a job that crashed or was killed
                        error = str(e)
                    first = next((ln for ln in error.splitlines() if ln.strip()), "failed")
                    failures.append(f"  job #{idx} ({' '.join(filter_overrides(overrides))}), Slurm id "
                                    f"{job.job_id}: {first}\n    log: {job.paths.stderr}")
                if failures:
                    raise W2SGError(f"{len(failures)} of {len(job_overrides)} jobs failed; the others finished "
                                    "and their stages are stored (rerun to retry only what is missing):\n"
                                    + "\n".join(failures))
        return [results[initial_job_idx + pos] for pos in range(len(job_overrides))]
