"""The hub catalogue (GPT-2, Pythia, Qwen2.5, Llama 3): none of these weights can be downloaded here, so each model
is checked through its architecture: the parameter count of the full-size model (on the meta device, nothing
allocated), and a forward/backward step (full and LoRA) of a random model of the same architecture shrunk."""

import math

import pytest
import torch
from helpers import CONF, compose, model_params

from w2sg.ml.models import add_lora, arch_config, build_model, count_params, hidden_size
from w2sg.run.device import ACTIVATION_FACTORS, GIB, stage_estimate

CATALOGUE = sorted(p.stem for p in (CONF / "model").glob("*.yaml")
                   if "arch:" in p.read_text() and "random_init" not in p.read_text())
FAMILIES = {"gpt2": 4, "pythia": 7, "qwen2_5": 4, "llama3": 3}
# the sizes of a shrunk stand-in (the real config class and fields, smaller numbers)
SHRINK = {"hidden_size": 64, "n_embd": 64, "intermediate_size": 128, "num_hidden_layers": 2, "n_layer": 2,
          "num_attention_heads": 4, "n_head": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}


def model(name):
    return compose([f"weak={name}"]).weak


def test_the_catalogue_has_every_family_and_size():
    for family, n in FAMILIES.items():
        assert len([m for m in CATALOGUE if m.startswith(family)]) == n, family


@pytest.mark.parametrize("name", model_params(CATALOGUE))
def test_params_match_the_full_size_architecture(name):
    cfg = model(name)
    with torch.device("meta"):
        from transformers import AutoModel

        backbone = AutoModel.from_config(arch_config(cfg.arch))
    hidden = hidden_size(backbone.config)
    assert count_params(backbone) + hidden * 2 + 2 == cfg.params  # the backbone and a 2-class head


@pytest.mark.parametrize("name", model_params(CATALOGUE))
def test_memory_estimate_is_the_formula(name):
    """memory_gb: w2sg.run.device.stage_estimate in bf16 at minibatch 8 x length 512 (LoRA: rank 8 on the family's
    targets), with the activation constants calibrated for the model's family."""
    cfg = model(name)
    assert cfg.arch["model_type"] in ACTIVATION_FACTORS
    assert set(cfg.memory_gb) == {"inference", "lora", "full"}
    for mode, gb in cfg.memory_gb.items():
        parts = stage_estimate(cfg, mode, 8, 512, "bf16")
        assert math.isclose(sum(parts.values()) / GIB, gb, abs_tol=0.051), (mode, gb)


@pytest.mark.parametrize("name", model_params(CATALOGUE))
def test_a_shrunk_random_model_of_each_architecture_trains(name):
    """Forward and backward through the classifier, fully and with the model's LoRA targets."""
    cfg = model(name)
    cfg.random_init = {k: v for k, v in SHRINK.items() if k in cfg.arch}
    for lora in (False, True):
        clf = build_model(cfg, 2, 0)
        assert type(clf.backbone).__name__.lower().startswith(cfg.arch["model_type"].replace("_", ""))
        assert hidden_size(clf.backbone.config) == 64
        if lora:
            add_lora(clf, 4, 8.0, 0.0, cfg.lora_targets)  # null: the family's (LORA_TARGETS)
        ids = torch.randint(1, 512, (2, 7))
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0
        logits = clf(ids, mask)
        assert logits.shape == (2, 2) and torch.isfinite(logits).all()
        logits.logsumexp(-1).sum().backward()
        trained = [p for p in clf.parameters() if p.requires_grad]
        assert all(p.grad is not None for p in trained)
        if lora:
            assert count_params(clf) > sum(p.numel() for p in trained)


def test_shrunk_architecture_uses_the_real_config_class():
    cfg = model("llama3_1_8b")
    assert type(arch_config(cfg.arch)).__name__ == "LlamaConfig"
    assert type(arch_config(model("pythia_70m").arch)).__name__ == "GPTNeoXConfig"


def test_gpu_launcher_takes_resources_from_the_strong_model():
    from w2sg.app.status import compose as w2sg_compose

    cfg = w2sg_compose(["sweep=qwen_grid", "launcher=slurm_gpu"], with_hydra=True, conf_dir=CONF)
    assert (cfg.strong.name, cfg.train.mode) == ("qwen2_5_7b", "lora")  # the grid's largest model sizes the jobs
    r = cfg.strong.resources
    assert (cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.mem_gb, cfg.hydra.launcher.timeout_min) == \
        (r.gpus, r.mem_gb, r.timeout_min) == (1, 128, 720)
    cfg = w2sg_compose(["launcher=slurm_gpu", "hydra.launcher.timeout_min=60", "strong.resources.mem_gb=7"],
                       with_hydra=True, conf_dir=CONF)
    assert (cfg.hydra.launcher.timeout_min, cfg.hydra.launcher.mem_gb, cfg.train.device) == (60, 7, "cuda")


def test_pythia_revisions_are_distinct_stages():
    from w2sg.core.plan import plan

    a = plan(compose(["sweep=pythia_checkpoints"]))
    b = plan(compose(["sweep=pythia_checkpoints", "strong.revision=step1000"]))
    assert a["weak"].key == b["weak"].key and a["ceiling"].key != b["ceiling"].key
    assert b["ceiling"].spec["model"]["revision"] == "step1000"
