"""Bytes of a training checkpoint per catalogue model and mode, against the format before checkpoints kept only
what training changes.

Every model of the catalogue (conf/model/*.yaml, random-init test models left out) is built on the meta device
(nothing allocated) with a 2-class head:

    full   now: fp32 weights + AdamW state (two fp32 moments a parameter)
           before: the same + a second copy of the weights for keep_best
    lora   now: the trainable adapters (rank 8 on the family's w2sg.ml.models.LORA_TARGETS) and head in fp32 +
           their AdamW state
           before: the whole model's state dict (the frozen base in the compute dtype, bf16 on a GPU) + the
           adapters' AdamW state + a second copy of the whole state dict for keep_best

The best weights of keep_best now go to a file of their own (``<checkpoint>.best``): the trainable weights only,
printed as "+ best", and the ratio with it in parentheses (full finetuning with keep_best writes as many bytes as
before, in two files). Seconds, no download:

    python benchmarks/checkpoint_bytes.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RANK = 8
CLASSES = 2
FROZEN_BYTES = 2  # the frozen base of LoRA in the compute dtype (bf16)
ADAMW = 8  # bytes a trainable parameter: two fp32 moments


def models() -> Iterator[Tuple[str, Any]]:
    """(name, transformers config) of every catalogue model."""
    from omegaconf import OmegaConf

    from w2sg.core.config import ModelConfig
    from w2sg.run.device import hf_config_of

    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        raw = OmegaConf.load(path)
        if raw.get("random_init") is None:
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                      {k: v for k, v in raw.items() if k != "defaults"}))
            yield cfg.name, hf_config_of(cfg)


def counts(hf: Any) -> Dict[str, int]:
    """Parameters of the backbone and head (all), and of LoRA's adapters and head (trainable)."""
    import torch
    from transformers import AutoModel

    from w2sg.ml.models import LORA_TARGETS, hidden_size
    from w2sg.run.device import lora_params

    with torch.device("meta"):
        backbone = AutoModel.from_config(hf)
    head = hidden_size(hf) * CLASSES + CLASSES
    total = sum(p.numel() for p in backbone.parameters()) + head
    return {"all": total, "lora": lora_params(hf, LORA_TARGETS[hf.model_type], RANK) + head}


def checkpoint_bytes(n: Dict[str, int]) -> Dict[str, Dict[str, int]]:
    """mode -> {now, best (the separate keep_best file), before}."""
    full, lora = n["all"], n["lora"]
    state_dict = FROZEN_BYTES * full + 4 * lora  # a LoRA model's whole state dict: the base and its adapters
    return {"full": {"now": 4 * full + ADAMW * full, "best": 4 * full, "before": 2 * 4 * full + ADAMW * full},
            "lora": {"now": 4 * lora + ADAMW * lora, "best": 4 * lora, "before": 2 * state_dict + ADAMW * lora}}


def size(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b / 1e3:.1f} kB"


def cell(r: Dict[str, int]) -> str:
    return (f"{size(r['now']):>8s} (+{size(r['best']):>8s}) {size(r['before']):>8s} {r['now'] / r['before']:5.3f} "
            f"({(r['now'] + r['best']) / r['before']:5.3f})")


def main() -> int:
    print(f"{'model':14s} {'params':>7s} | full: now (+ best)     before  ratio (with best) | lora rank {RANK}: now "
          "(+ best)     before  ratio (with best)")
    for name, hf in models():
        n = counts(hf)
        row = checkpoint_bytes(n)
        print(f"{name:14s} {n['all'] / 1e9:6.2f}B | {cell(row['full'])} | {cell(row['lora'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
