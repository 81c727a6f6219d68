"""What one Slurm job of a sweep asks for: its own models' resources, and a GPU type that fits its stages.

A GPU launcher profile (launchers/slurm_gpu.yaml) writes ``gpus_per_node``, ``mem_gb`` and ``timeout_min`` as
interpolations of the run's strong model (``${strong.resources.*}``). Hydra resolves a launcher's settings once,
against the sweep's primary config, so every job would ask for the primary strong model's resources (in a grid of
3B and 7B students, the 3B jobs for the 7B's memory and time). :func:`job_request` resolves them in each job's own
config instead, so a job asks for its own strong model's resources; the launcher submits one array per distinct
request.

The GPU type: where the profile maps GPU memory to Slurm constraints (``hydra.launcher.gpu_constraints``, e.g.
``{40: a100_40g, 80: "a100_80g|h100", 141: h200}``: the GPU memory in GB each constraint guarantees) and sets no
``constraint`` itself, each job gets the constraint of the smallest GPU that holds its largest stage, by the same
memory estimate a stage checks before it loads (w2sg.run.device.stage_estimate). A job no GPU of the mapping holds
is an error naming the job, the bytes it needs and the ways out, before anything is submitted.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

from w2sg.core.errors import W2SGError

# the launcher settings that size a job (submitit's SlurmQueueConf fields)
RESOURCE_KEYS = ("gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min", "constraint")
GB = 1024 ** 3


def job_memory(cfg: Any) -> Dict[str, Any]:
    """The GPU memory the largest stage of a run needs per GPU: {"bytes", "stage"} (``cfg``: the resolved
    w2sg.core.config.Config of one job). Training stages count in their mode (full, lora; probes: their
    features' inference), label and feature stages as inference; a model sharded over the node's GPUs
    (train.device_map=auto) needs its share on each."""
    from w2sg.core.graph import Kind
    from w2sg.core.plan import plan
    from w2sg.run.device import stage_estimate

    precision = cfg.train.precision if cfg.train.precision not in ("auto", None) else "bf16"  # a GPU's default
    best = {"bytes": 0, "stage": ""}
    seen = set()
    stages = list(plan(cfg).values())
    while stages:
        stage = stages.pop()
        if stage.key in seen:
            continue
        seen.add(stage.key)
        stages.extend(stage.inputs.values())
        if stage.kind is Kind.TRANSFORM:
            continue
        tspec = stage.spec.get("train") or {}
        mode = tspec.get("mode") if stage.kind is Kind.TRAIN else "inference"
        if mode == "probe":
            mode = "inference"  # the frozen model's features; the head itself is negligible
        batch = int(tspec.get("minibatch_size") or tspec.get("batch_size") or cfg.train.batch_size) \
            if mode != "inference" else int(cfg.train.eval_batch_size)
        length = int(stage.spec.get("max_length") or cfg.train.max_length)
        rank = int((tspec.get("lora") or {}).get("rank", 8))
        parts = stage_estimate(stage.model, mode, batch, length, precision,
                               gradient_checkpointing=bool(cfg.train.gradient_checkpointing),
                               optimizer=cfg.train.optimizer, lora_rank=rank)
        need = sum(parts.values())
        if need > best["bytes"]:
            best = {"bytes": need, "stage": f"{stage.label} ({mode})"}
    return best


def job_request(composed: Any, label: str = "") -> Dict[str, Any]:
    """The Slurm request of one job (``composed``: its composed config, Hydra's node included): the launcher's
    RESOURCE_KEYS resolved in that job's config, and ``constraint`` from ``gpu_constraints`` where the profile maps
    GPU memory to constraints and sets none itself. ``label``: how errors name the job."""
    from omegaconf import OmegaConf

    launcher = composed.hydra.launcher
    request = {k: OmegaConf.select(launcher, k) for k in RESOURCE_KEYS if k in launcher}
    mapping = OmegaConf.select(launcher, "gpu_constraints")
    if mapping and request.get("constraint") is None and request.get("gpus_per_node"):
        from w2sg.app.config import resolve

        request["constraint"] = gpu_constraint(
            OmegaConf.to_container(mapping), resolve(composed), int(request["gpus_per_node"]), label)
    return request


def gpu_constraint(mapping: Mapping[Any, str], cfg: Any, gpus: int, label: str = "") -> str:
    """The constraint of the smallest GPU in ``mapping`` (GPU memory in GB -> Slurm constraint) that holds the
    run's largest stage (per GPU: sharded over ``gpus`` with train.device_map=auto)."""
    need = job_memory(cfg)
    per_gpu = per_gpu_bytes(cfg, gpus, need)
    constraint = smallest_gpu(mapping, per_gpu)
    if constraint is None:
        raise W2SGError(f"job {label or '?'}: its largest stage, {need['stage']}, needs about {per_gpu / GB:.1f} GB "
                        f"on one GPU, more than the largest GPU of hydra.launcher.gpu_constraints "
                        f"({largest_gpu_gb(mapping):g} GB); use train.mode=lora, train.gradient_checkpointing=true or "
                        "a smaller train.minibatch_size, or add a larger GPU to the mapping")
    return constraint


def per_gpu_bytes(cfg: Any, gpus: int, need: Optional[Dict[str, Any]] = None) -> float:
    """The GPU memory the run's largest stage (``need``: job_memory(cfg), computed when not given) needs on each
    GPU: all of it on one, or sharded over ``gpus`` with train.device_map=auto."""
    need = job_memory(cfg) if need is None else need
    return need["bytes"] / (gpus if cfg.train.device_map == "auto" and gpus > 1 else 1)


def gpu_sizes(mapping: Mapping[Any, str]) -> List[Tuple[float, str]]:
    """``hydra.launcher.gpu_constraints`` (GPU memory in GB -> Slurm constraint) as (GB, constraint), smallest
    first; a key that is not a number is an error naming the expected form."""
    sizes = []
    for gb, constraint in mapping.items():
        try:
            sizes.append((float(gb), str(constraint)))
        except (TypeError, ValueError):
            raise W2SGError(f"hydra.launcher.gpu_constraints: {gb!r} is not a GPU memory in GB; give GPU memory -> "
                            "constraint, e.g. {40: a100_40g, 80: a100_80g}") from None
    return sorted(sizes)


def smallest_gpu(mapping: Mapping[Any, str], need_bytes: float) -> Optional[str]:
    """The constraint of the smallest GPU of ``mapping`` with at least ``need_bytes``; None where none has."""
    return next((c for gb, c in gpu_sizes(mapping) if gb * GB >= need_bytes), None)


def largest_gpu_gb(mapping: Mapping[Any, str]) -> float:
    sizes = gpu_sizes(mapping)
    return sizes[-1][0] if sizes else 0.0


def describe(request: Mapping[str, Any]) -> str:
    """A request in a few words for the submission log: '1 GPU, 96 GB, 600 min, constraint a100'."""
    gpus = request.get("gpus_per_node")
    parts = [f"{gpus} GPU{'s' if gpus != 1 else ''}" if gpus else "no GPU"]
    if request.get("mem_gb") is not None:
        parts.append(f"{request['mem_gb']} GB")
    if request.get("timeout_min") is not None:
        parts.append(f"{request['timeout_min']} min")
    if request.get("constraint"):
        parts.append(f"constraint {request['constraint']}")
    return ", ".join(parts)
