"""Data-parallel (DDP) and sharded (FSDP2) training over torch.distributed: the small layer the training loop uses.

Every rank sees the same global batch order (the same seed), takes its contiguous slice of each global batch
(:func:`shard`) and scales its loss so that the averaged gradient equals one process's mean over the whole global
batch (:func:`loss_weight`); gradient accumulation (``minibatch_size``) splits each rank's slice into the same
number of forward passes on every rank (:func:`microbatches`), so DDP's gradient synchronisation (on the last
one) meets on every rank. Logged numbers are all-reduced, so every rank records the same. Dropout draws its masks
per rank (each rank's RNG advances with its own slice), so with dropout the run is a valid but not a bitwise copy
of the single-process one; without dropout (the tiny_random test models) losses agree to float rounding.

``train.processes=N`` with no distributed environment: the train body starts N local processes (:func:`launch`,
spawn; gloo on the CPU, nccl on GPUs, MASTER_ADDR=127.0.0.1 and a free port); rank 0 returns the trained state
to the parent, which predicts and writes the stage as after single-process training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

STRATEGIES = ("auto", "single", "ddp", "fsdp")  # train.strategy (w2sg.core.options.STRATEGIES)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's rank, world size and local rank: from the initialised process group, else the environment
    (RANK / WORLD_SIZE / LOCAL_RANK, as torchrun and submitit's TorchDistributedEnvironment export), else one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
    return World()


def backend(device: str) -> str:
    return "nccl" if device == "cuda" else "gloo"


def init(device: str) -> World:
    """Join the process group of the environment (MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE); on GPUs each
    rank takes the GPU of its local rank."""
    import torch.distributed as dist

    w = world()
    if device == "cuda":
        torch.cuda.set_device(w.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend(device), rank=w.rank, world_size=w.size)
    return world()


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def blocks(model: torch.nn.Module) -> List[torch.nn.Module]:
    """A model's transformer blocks: the children of its longest ModuleList (BERT's encoder.layer, GPT-2's h,
    Llama's / Qwen's layers)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def wrap(model: torch.nn.Module, strategy: str, policy: Any) -> torch.nn.Module:
    """The model as this strategy trains it: DistributedDataParallel, or FSDP2 (``fully_shard`` on each
    transformer block and on the root; on GPUs bf16 parameters with fp32 gradient reductions)."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.cuda.current_device()] if policy.device == "cuda" else None
        # find_unused_parameters: a backbone's parts the pooling never reads (BERT's pooler under mean pooling)
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:
            from w2sg.core.errors import W2SGError

            raise W2SGError(f"train.strategy=fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                            f"torch {torch.__version__} has none: use train.strategy=ddp or a newer torch") from None

        mp = MixedPrecisionPolicy()
        if policy.device == "cuda" and policy.precision != "fp32":
            mp = MixedPrecisionPolicy(param_dtype=policy.dtype, reduce_dtype=torch.float32)
        for block in blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    raise ValueError(f"no distributed wrapping for strategy {strategy!r}")


def inner(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP wrapper (FSDP2 shards in place: the model itself)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def shard(idx: Sequence[int], rank: int, size: int) -> List[int]:
    """This rank's contiguous slice of a global batch (sizes differ by at most one; a batch smaller than the world
    leaves some ranks none)."""
    n = len(idx)
    start, stop = rank * n // size, (rank + 1) * n // size
    return list(idx[start:stop])


def microbatches(part: Sequence[int], global_size: int, size: int, mb: int) -> List[List[int]]:
    """A rank's slice in the same number of forward passes on every rank (each at most ``mb`` examples; some may
    be empty when the global batch is short)."""
    per_rank = -(-global_size // size)
    count = max(1, -(-per_rank // mb))
    n = len(part)
    return [list(part[k * n // count:(k + 1) * n // count]) for k in range(count)]


def loss_weight(part: int, global_size: int, size: int) -> float:
    """The factor of a microbatch's mean loss so that the gradient averaged over ranks (DDP and FSDP divide the sum
    by the world size) is the mean over the whole global batch: part / global * size."""
    return part / global_size * size


def all_sum(values: Sequence[float], device: str) -> List[float]:
    """Sums over ranks of a few numbers (float64), the same on every rank."""
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device if device == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def gather_state(model: torch.nn.Module, trainable_only: bool = True) -> Dict[str, torch.Tensor]:
    """The full (unsharded) state of the trained model on the CPU: on every rank for DDP (replicated weights), on
    rank 0 for FSDP2 (collective: every rank calls it; other ranks get an empty dict)."""
    base = inner(model)
    frozen = {n for n, p in base.named_parameters() if not p.requires_grad} if trainable_only else set()
    if any(type(p).__name__ == "DTensor" for p in base.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(base, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().to("cpu", copy=True) for k, v in base.state_dict().items()}
    return {k: v for k, v in state.items() if k not in frozen}


def sharded(model: torch.nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in inner(model).parameters())


def optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Dict[str, Any]:
    """The optimizer's full state (FSDP2: gathered to rank 0, collective; otherwise the replicated state)."""
    if not sharded(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_state(model: torch.nn.Module, weights: Dict[str, torch.Tensor],
               opt: Optional[torch.optim.Optimizer] = None, opt_state: Optional[Dict[str, Any]] = None) -> None:
    """Load full (unsharded) trainable weights, and the optimizer's full state, into a wrapped model on every
    rank (each rank reads the same checkpoint)."""
    if not sharded(model):
        from w2sg.ml.train import load_trainable_state

        load_trainable_state(inner(model), weights)
        if opt is not None:
            opt.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    if opt is not None:
        set_optimizer_state_dict(model, opt, opt_state, options=options)


# --- a Slurm job of several tasks: task 0 runs the experiment, the others are its training ranks -------------------

@dataclass
class Served:
    """The process group of a Slurm job's tasks, while task 0 runs the experiment: ``world`` (this task's rank),
    ``control`` (a gloo group with a long timeout, on which task 0 sends each training job to the others)."""
    world: World
    control: Any


_SERVED: Optional[Served] = None
# the serving tasks wait for task 0's next training job for as long as the experiment's other stages take
CONTROL_TIMEOUT_HOURS = 24 * 14
_STOP = "stop"


def served() -> Optional[Served]:
    """The job's tasks serving as training ranks (serve_tasks), else None."""
    return _SERVED


def serve_tasks(body: Callable[[], Any]) -> Any:
    """Run a Slurm job's body. A job of one task: ``body()``. A job of several tasks (``tasks_per_node`` > 1 or
    several nodes; one task per GPU): the tasks join one process group (submitit's TorchDistributedEnvironment:
    the first node's address, a port from the job id, the task's rank); task 0 runs ``body()`` and each of its
    full-finetuning stages trains on every task (train_processes: task 0 is rank 0 and alone writes the store and
    logs), while the other tasks wait for these training jobs and return None when task 0 is done."""
    global _SERVED
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return body()
    import datetime

    import torch.distributed as dist

    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)  # MASTER_PORT kept
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=env.global_rank,
                            world_size=env.num_tasks)
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=CONTROL_TIMEOUT_HOURS))
    _SERVED = Served(world(), control)
    try:
        if env.global_rank == 0:
            try:
                return body()
            finally:
                dist.broadcast_object_list([_STOP], src=0, group=control)
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0, group=control)
            if message[0] == _STOP:
                return None
            _train_worker(*message[0])
    finally:
        _SERVED = None
        teardown()


# --- local launch: N processes on this machine ------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, size: int, port: int, fn: Callable[..., Any], job: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size))
    fn(job, out)


def launch(fn: Callable[[str, str], None], size: int, job: str, out: str) -> None:
    """Run ``fn(job, out)`` in ``size`` spawned local processes of one process group (rank and world in the
    environment); raises when one of them fails. ``fn`` must be importable (spawn pickles it by name)."""
    import torch.multiprocessing as mp

    # the CPU's threads shared between the ranks, as one process would use them
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // size))
    try:
        mp.start_processes(_entry, args=(size, free_port(), fn, job, out), nprocs=size, join=True,
                           start_method="spawn")
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads


def _train_worker(job: str, out: str) -> None:
    """One rank of a local launch: join the group, train its slices, and (rank 0) write the result and the log."""
    from w2sg.core.errors import Preempted
    from w2sg.ml.losses import make_loss
    from w2sg.ml.train import Checkpointer, train_model

    # mapped, not read: the ranks of a node share one copy of the model in the page cache
    spec = torch.load(job, weights_only=False, map_location="cpu", mmap=True)
    kwargs, policy = spec["kwargs"], spec["kwargs"]["policy"]
    w = init(policy.device)  # a served job's tasks (serve_tasks) are in their process group already
    logs: List[Dict[str, float]] = []
    try:
        torch.manual_seed(spec["seed"])  # one RNG start per rank (dropout masks differ by their slices)
        model = policy.place(spec["model"])
        try:
            with Checkpointer(*spec["checkpoint"]) as ckpt:
                result = train_model(model, spec["data"], spec["labels"], make_loss(spec["loss"]),
                                     checkpointer=ckpt, on_log=logs.append if w.rank == 0 else None,
                                     strategy=spec["strategy"], **kwargs)
        except Preempted as e:  # checkpoint saved by rank 0: the parent raises it
            if w.rank == 0:
                torch.save({"preempted": e, "logs": logs}, out)
            return
        if w.rank == 0:
            torch.save({"result": result, "logs": logs}, out)
    finally:
        if _SERVED is None:  # a served job's group lives as long as the job
            teardown()


def train_processes(processes: int, strategy: str, folder: str, model: torch.nn.Module, data: Any, labels: Any,
                    loss: Dict[str, Any], checkpoint: Sequence[Any], on_log: Optional[Callable[[Dict[str, float]], None]],
                    **kwargs: Any) -> Any:
    """w2sg.ml.train.train_model in ``processes`` local ranks (``strategy`` ddp or fsdp), for a parent that is no
    rank itself: the job goes to the ranks through a file in ``folder``, rank 0's result (with the full trained
    weights, loaded into ``model`` here) comes back through another, and its log entries are passed to ``on_log``
    in order. ``loss``: the loss's config (w2sg.ml.losses.make_loss); ``checkpoint``: Checkpointer's arguments."""
    from w2sg.ml.train import check_finite_weights, load_trainable_state

    os.makedirs(folder, exist_ok=True)
    job, out = os.path.join(folder, "job.pt"), os.path.join(folder, "result.pt")
    if kwargs["policy"].device != "cpu":
        model = model.to("cpu")
        torch.cuda.empty_cache()  # the parent's cached blocks would hold rank 0's GPU memory
    torch.save({"model": model, "data": data,
                "labels": labels, "loss": dict(loss), "checkpoint": list(checkpoint), "strategy": strategy,
                "seed": torch.initial_seed() % 2**63, "kwargs": kwargs}, job)
    try:
        try:
            if _SERVED is not None:  # a Slurm job's tasks: this one is rank 0, the others wait for the job
                import torch.distributed as dist

                dist.broadcast_object_list([(job, out)], src=0, group=_SERVED.control)
                _train_worker(job, out)
            else:
                launch(_train_worker, processes, job, out)
        except Exception as e:  # a rank's error (e.g. a non-finite loss), with its own message
            from w2sg.core.errors import W2SGError

            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            raise W2SGError(f"{kwargs.get('desc', 'train')}: a training rank failed: "
                            f"{lines[-1] if lines else type(e).__name__}") from e
        done = torch.load(out, weights_only=False, map_location="cpu")
    finally:
        for f in (job, out):
            if os.path.exists(f):
                os.remove(f)
    model = kwargs["policy"].place(model)
    for entry in done["logs"] if on_log is not None else ():
        on_log(entry)
    if "preempted" in done:
        raise done["preempted"]
    result = done["result"]
    load_trainable_state(model, result.state)
    result.state = None
    check_finite_weights(model, kwargs.get("desc", "train"), kwargs["lr"])
    model.eval()
    return result


def resolve_processes(processes: Optional[int], device: str) -> int:
    """train.processes: null -> the job's tasks in a Slurm job of several (serve_tasks), else the job's GPUs on a
    GPU node (torch.cuda.device_count()), 1 on the CPU. In a job of several tasks every task is a rank: another
    number is refused."""
    if _SERVED is not None:
        size = _SERVED.world.size
        if processes is not None and int(processes) != size:
            from w2sg.core.errors import W2SGError

            raise W2SGError(f"train.processes={processes}, but this Slurm job has {size} tasks, each a training rank "
                            f"(hydra.launcher.tasks_per_node x nodes): set train.processes=null (or {size}), or "
                            f"ask for {processes} tasks")
        return size
    if processes is not None:
        return int(processes)
    return max(1, torch.cuda.device_count()) if device == "cuda" else 1
