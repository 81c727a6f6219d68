"""Generative finetuning: adapt a model to the task's unlabelled text with its own language-model objective.

The paper finetunes the strong model generatively on task text before the supervised stages, so that the task's
concepts are salient to it. This stage does that for any model: masked LM for encoders (BERT-style; 15% of
tokens masked), causal LM for decoders, over the texts of both training halves (never the test set, and never
their labels). It has no labels, so it has its own short loop (an optimizer and schedule as in w2sg.ml.train);
its result is the backbone's weights, which the supervised stages of that model start from. Like any stage it
is keyed by what it uses and stored once.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import torch
from tqdm.auto import tqdm

from w2sg.core.errors import W2SGError

OBJECTIVES = ("auto", "mlm", "clm")


def resolve_objective(objective: str, hf_config: Any) -> str:
    """auto: causal LM for decoder-only model types, masked LM otherwise."""
    if objective not in OBJECTIVES:
        raise W2SGError(f"unknown generative.objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if objective != "auto":
        return objective
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if hf_config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(hf_config, "is_decoder", False):
        return "mlm"
    if hf_config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "clm"
    raise W2SGError(f"no language-model head for model type {hf_config.model_type!r}; set generative.objective")


def build_lm(cfg: Any, objective: str, seed: int, policy: Any = None):
    """The model with a language-model head, truncated and initialised like the classifier's backbone, in fp32
    (every weight trains) on the policy's device."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from w2sg.ml.models import init_device, load_kwargs, model_config
    from w2sg.ml.device import CPU

    policy = policy or CPU
    torch.manual_seed(seed)
    path, hf_config = model_config(cfg)
    objective = resolve_objective(objective, hf_config)
    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    random = cfg.random_init is not None
    kwargs = load_kwargs(cfg, policy, trainable=True, pretrained=not random)
    if random:
        with init_device(policy):
            lm = auto.from_config(hf_config, **kwargs)
    else:
        lm = auto.from_pretrained(path, config=hf_config, **kwargs)
    return (lm if policy.device_map else policy.place(lm)), objective


def finetune_lm(cfg: Any, tokenizer: Any, texts: Sequence[str], *, objective: str, epochs: int, batch_size: int,
                lr: float, max_length: int, mlm_probability: float, seed: int, progress: bool = True,
                desc: str = "lm", policy: Any = None) -> Dict[str, Any]:
    """Train the LM objective on ``texts``; return the backbone's state dict and a per-epoch loss history."""
    from transformers import DataCollatorForLanguageModeling, get_scheduler

    from w2sg.ml.models import enable_gradient_checkpointing
    from w2sg.ml.device import CPU

    policy = policy or CPU
    lm, objective = build_lm(cfg, objective, seed, policy)
    if policy.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    if objective == "mlm" and tokenizer.mask_token is None:
        raise W2SGError(f"model {cfg.name!r}: its tokenizer has no mask token; use generative.objective=clm")
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=objective == "mlm", mlm_probability=mlm_probability)
    ids: List[List[int]] = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    steps_per_epoch = math.ceil(len(ids) / batch_size)
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW(lm.parameters(), lr=lr)
    scaler = policy.grad_scaler()
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=total)
    history = []
    lm.train()
    torch.manual_seed(seed)  # masking draws from torch's RNG
    with tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for epoch in range(epochs):
            order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
            total_loss = 0.0
            for start in range(0, len(order), batch_size):
                batch = policy.to(collate([{"input_ids": ids[i]} for i in order[start : start + batch_size]]))
                with policy.autocast():
                    loss = lm(**batch).loss.float()
                if not torch.isfinite(loss):
                    raise W2SGError(f"{desc}: loss became {loss.item()} in epoch {epoch}; try a lower generative.lr")
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                sched.step()
                total_loss += loss.item()
                bar.update(1)
            history.append({"epoch": epoch + 1, "loss": total_loss / steps_per_epoch})
    backbone = getattr(lm, lm.base_model_prefix)
    return {"state": {k: v.detach().to("cpu", copy=True) for k, v in backbone.state_dict().items()}, "history": history,
            "objective": objective}
