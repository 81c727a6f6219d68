"""Calibrates the activation constants of the GPU memory estimate (w2sg.ml.device.ACTIVATION_FACTORS).

For every model of the catalogue (conf/model/*.yaml: the ``arch`` fields, and MiniLM's own config for bert) a
random-initialised transformers model of the real hidden, intermediate and head shapes but 1 and 2 layers runs a
forward pass in training mode under the project's precision policy (bf16 autocast over fp32 master weights, as
w2sg.ml.device.Policy; torch.autocast("cpu") here). Every tensor saved for the backward pass is recorded with
torch.autograd.graph.saved_tensors_hooks, each storage once, parameters left out. Differencing 2 layers against 1
removes the embeddings, the final norm and the shared rotary tables; differencing 128 tokens against 64 removes the
token-independent part (the bf16 copies of the weights that autocast caches, reported per parameter). What is left
is the bytes one layer saves per token; it is printed as a multiple of hidden and set against the estimate's
``ACTIVATION_FACTORS[family]`` (a x hidden + b x intermediate). Per family the constants are fitted at the smallest
model: ``b`` from a second run with the intermediate size doubled, ``a`` from the rest.

    python benchmarks/activation_memory.py            # every catalogue model (7B shapes: ~5 GB, ~15 min on 2 cores)
    python benchmarks/activation_memory.py --quick    # the smallest model of each family (~2 min)
    python benchmarks/activation_memory.py --fp32     # also without autocast (fp32 must stay within 2x bf16)
    python benchmarks/activation_memory.py --family qwen2   # one family

Exits non-zero when a measurement drifts more than 10% from the stored constants. Attention is what transformers
picks on the CPU (SDPA, fused kernel); attention-probability dropout (GPT-2, BERT) is set to 0 so that SDPA keeps its
fused kernel, as it does on a GPU, where the fused kernels apply dropout themselves (the CPU falls back to the math
kernel and saves T x T probabilities). Hidden dropout stays (its masks are saved). flash-attention 2 on a GPU saves
somewhat less than SDPA (not measured here), so there the constants err on the safe side.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TOLERANCE = 0.10
TOKENS = (64, 128)
VOCAB = 1024  # the embeddings cancel out in the difference of layers: a small vocabulary keeps the model small
ATTENTION_DROPOUT = ("attn_pdrop", "attention_probs_dropout_prob", "attention_dropout")


@dataclass
class Measured:
    model: str
    family: str
    hidden: int
    intermediate: int
    per_token_layer: float  # bytes saved per token and layer
    copies_per_param: float  # bytes per parameter of a layer that do not grow with tokens (autocast weight copies)

    @property
    def factor(self) -> float:
        return self.per_token_layer / self.hidden


def catalogue() -> Dict[str, List[Tuple[str, Any]]]:
    """family -> [(model name, transformers config)], smallest first: every catalogue model whose architecture is
    known offline (``arch`` fields, or a config shipped in a package), random-init test models left out."""
    from omegaconf import OmegaConf

    from w2sg.core.config import ModelConfig
    from w2sg.ml.models import arch_config, model_config

    out: Dict[str, List[Tuple[str, Any]]] = {}
    seen = set()
    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        raw = OmegaConf.load(path)
        if raw.get("random_init") is not None:
            continue
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                  {k: v for k, v in raw.items() if k != "defaults"}))
        hf = arch_config(cfg.arch) if cfg.arch else model_config(cfg)[1]
        shape = (hf.model_type, hidden(hf), intermediate(hf), hf.num_attention_heads)
        if shape not in seen:  # MiniLM's 1-6 layer models share one shape
            seen.add(shape)
            out.setdefault(hf.model_type, []).append((cfg.name, hf))
    return {f: sorted(ms, key=lambda m: hidden(m[1]) * intermediate(m[1])) for f, ms in out.items()}


def hidden(hf: Any) -> int:
    from w2sg.ml.models import hidden_size

    return hidden_size(hf)


def intermediate(hf: Any) -> int:
    from w2sg.ml.device import intermediate_size

    return intermediate_size(hf)


def _layers(model: Any, count: int):
    """The model's list of transformer blocks."""
    import torch

    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count)


def _build(hf: Any, intermediate_size: int = 0):
    """A random model of ``hf``'s shapes with 2 layers, a small vocabulary and attention dropout 0, in train mode."""
    import copy

    import torch
    from transformers import AutoModel

    hf = copy.deepcopy(hf)
    hf.vocab_size = VOCAB
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(hf, key, None) is not None:
            setattr(hf, key, 0)
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(hf, key):
            setattr(hf, key, 2)
    for key in ATTENTION_DROPOUT:
        if hasattr(hf, key):
            setattr(hf, key, 0.0)
    if intermediate_size:
        setattr(hf, "n_inner" if hf.model_type == "gpt2" else "intermediate_size", intermediate_size)
    hf.use_cache = False
    torch.manual_seed(0)
    model = AutoModel.from_config(hf)
    model.train()
    return model


def saved_bytes(model: Any, tokens: int, autocast: bool) -> int:
    """Bytes of the distinct storages a forward pass saves for backward, parameters left out."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: Dict[int, Any] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage  # held: a freed storage's address cannot be reused meanwhile
        return t

    ids = torch.randint(1, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        model(input_ids=ids)
    return sum(s.nbytes() for s in seen.values())


def measure(name: str, hf: Any, autocast: bool = True, intermediate_size: int = 0) -> Measured:
    """Bytes one layer saves per token (1 vs 2 layers, 64 vs 128 tokens), and the per-layer token-independent
    bytes per parameter of a layer."""
    model = _build(hf, intermediate_size)
    blocks = _layers(model, 2)
    layer_params = sum(p.numel() for p in blocks[0].parameters())
    full = list(blocks)
    b = {}
    for n in (1, 2):
        blocks._modules = {str(i): m for i, m in enumerate(full[:n])}  # the same weights, 1 then 2 blocks
        for key in ("num_hidden_layers", "n_layer"):
            if hasattr(model.config, key):
                setattr(model.config, key, n)
        for t in TOKENS:
            b[n, t] = saved_bytes(model, t, autocast)
    span = TOKENS[1] - TOKENS[0]
    per_token = ((b[2, TOKENS[1]] - b[1, TOKENS[1]]) - (b[2, TOKENS[0]] - b[1, TOKENS[0]])) / span
    fixed = (b[2, TOKENS[0]] - b[1, TOKENS[0]]) - TOKENS[0] * per_token
    return Measured(name, hf.model_type, hidden(hf), intermediate_size or intermediate(hf), per_token,
                    fixed / layer_params)


def fit(name: str, hf: Any) -> Tuple[float, float, Measured]:
    """(a, b) of a x hidden + b x intermediate for ``hf``'s family, from ``hf`` and ``hf`` with twice the
    intermediate size; and the measurement at the real shape."""
    at = measure(name, hf)
    doubled = measure(name, hf, intermediate_size=2 * at.intermediate)
    b = (doubled.per_token_layer - at.per_token_layer) / at.intermediate
    a = (at.per_token_layer - b * at.intermediate) / at.hidden
    return a, b, at


def drift(m: Measured) -> float:
    """Relative difference of the stored constants' bytes from the measured ones."""
    from w2sg.ml.device import activation_bytes

    return activation_bytes(m.family, m.hidden, m.intermediate) / m.per_token_layer - 1


def report(m: Measured, fp32: float = 0.0) -> str:
    from w2sg.ml.device import activation_bytes

    stored = activation_bytes(m.family, m.hidden, m.intermediate) / m.hidden
    line = (f"  {m.model:14s} h {m.hidden:5d} i {m.intermediate:5d}  measured {m.factor:5.1f} x hidden  stored "
            f"{stored:5.1f} ({drift(m):+.1%})  weight copies {m.copies_per_param:.2f} B/param")
    return line + (f"  fp32 {fp32 / m.per_token_layer:.2f}x" if fp32 else "")


def main(argv: List[str] = None) -> int:
    from w2sg.ml.device import ACTIVATION_FACTORS, WIDE_ATTENTION

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the smallest model of each family")
    parser.add_argument("--fp32", action="store_true", help="also measure without autocast (fp32)")
    parser.add_argument("--family", action="append", help="only this family (model_type; repeatable)")
    args = parser.parse_args(argv)
    failed = []
    for family, models in catalogue().items():
        if args.family and family not in args.family:
            continue
        a, b, first = fit(*models[0])
        stored = ACTIVATION_FACTORS.get(family)
        print(f"{family}: measured {a:.1f} x hidden + {b:.1f} x intermediate; stored {stored}", flush=True)
        for name, hf in models[: 1 if args.quick else None]:
            m = first if name == first.model else measure(name, hf)
            fp32 = measure(name, hf, autocast=False).per_token_layer if args.fp32 else 0.0
            print(report(m, fp32), flush=True)
            gc.collect()  # the 2-layer models of 7B shapes take a few GB each
            over_is_known = family in WIDE_ATTENTION and drift(m) > 0  # the safe side, documented with the constants
            if (abs(drift(m)) > TOLERANCE and not over_is_known) or (fp32 and fp32 > 2 * m.per_token_layer):
                failed.append(m.model)
    if failed:
        print(f"drifted more than {TOLERANCE:.0%} from w2sg.ml.device.ACTIVATION_FACTORS (or fp32 above 2x): "
              f"{', '.join(failed)}; update the constants from the measured a and b above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
