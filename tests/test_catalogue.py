"""The hub catalogue (GPT-2, Pythia, Qwen2.5, Qwen3, Llama 3): none of these weights can be downloaded here, so each
model is checked through its architecture: the parameter count of the full-size model (on the meta device, nothing
allocated), and a forward/backward step (full and LoRA) of a random model of the same architecture shrunk.

An architecture newer than the installed transformers (qwen3 needs 4.51; the lowest supported version, .ci/lowest.txt,
is 4.44) cannot be built: its models' tests are skipped there, saying so."""

import math
import re

import pytest
import torch
from helpers import CONF, TINY, compose, model_params

from w2sg.ml.models import add_lora, arch_config, build_model, count_params, hidden_size
from w2sg.run.device import ACTIVATION_FACTORS, GIB, stage_estimate

CATALOGUE = sorted(p.stem for p in (CONF / "model").glob("*.yaml")
                   if "arch:" in p.read_text() and "random_init" not in p.read_text())
FAMILIES = {"gpt2": 4, "pythia": 7, "qwen2_5": 4, "qwen3": 4, "llama3": 3}
# the transformers release that added an architecture of the catalogue later than the lowest supported one (4.44)
ADDED_IN = {"qwen3": "4.51"}
# the sizes of a shrunk stand-in (the real config class and fields, smaller numbers)
SHRINK = {"hidden_size": 64, "n_embd": 64, "intermediate_size": 128, "num_hidden_layers": 2, "n_layer": 2,
          "num_attention_heads": 4, "n_head": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}


def model(name):
    return compose([f"weak={name}"]).weak


def arch_missing(name: str) -> str:
    """Why conf/model/<name>.yaml's architecture cannot be built with the installed transformers ("": it can)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    found = re.search(r"model_type: ([A-Za-z0-9_-]+)", (CONF / "model" / f"{name}.yaml").read_text())
    if not found or found.group(1) in CONFIG_MAPPING:
        return ""
    family = found.group(1)
    since = f" (added in transformers {ADDED_IN[family]})" if family in ADDED_IN else ""
    return f"model {name}: transformers {transformers.__version__} has no {family} architecture{since}"


def catalogue_params(names):
    """model_params (skipped without the model's weights package), also skipped without its architecture."""
    return [pytest.param(*p.values, marks=[*p.marks, pytest.mark.skipif(bool(arch_missing(p.values[0])),
                                                                        reason=arch_missing(p.values[0]))])
            for p in model_params(names)]


def test_the_catalogue_has_every_family_and_size():
    for family, n in FAMILIES.items():
        assert len([m for m in CATALOGUE if m.startswith(family)]) == n, family


@pytest.mark.parametrize("name", catalogue_params(CATALOGUE))
def test_params_match_the_full_size_architecture(name):
    cfg = model(name)
    with torch.device("meta"):
        from transformers import AutoModel

        backbone = AutoModel.from_config(arch_config(cfg.arch))
    hidden = hidden_size(backbone.config)
    assert count_params(backbone) + hidden * 2 + 2 == cfg.params  # the backbone and a 2-class head


@pytest.mark.parametrize("name", catalogue_params(CATALOGUE))
def test_memory_estimate_is_the_formula(name):
    """memory_gb: w2sg.run.device.stage_estimate in bf16 at minibatch 8 x length 512 (LoRA: rank 8 on the family's
    targets), with the activation constants calibrated for the model's family."""
    cfg = model(name)
    assert cfg.arch["model_type"] in ACTIVATION_FACTORS
    assert set(cfg.memory_gb) == {"inference", "lora", "full"}
    for mode, gb in cfg.memory_gb.items():
        parts = stage_estimate(cfg, mode, 8, 512, "bf16")
        assert math.isclose(sum(parts.values()) / GIB, gb, abs_tol=0.051), (mode, gb)


@pytest.mark.parametrize("name", catalogue_params(CATALOGUE))
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


QWEN3_PUBLISHED = {  # (all parameters with the LM head, non-embedding), billions: the model cards (Qwen/Qwen3-*-Base)
    "qwen3_0_6b": (0.6, 0.44), "qwen3_1_7b": (1.7, 1.4), "qwen3_4b": (4.0, 3.6), "qwen3_8b": (8.2, 6.95)}


@pytest.mark.parametrize("name", catalogue_params(sorted(QWEN3_PUBLISHED)))
def test_qwen3_sizes_match_the_published_counts(name):
    """The arch fields give Qwen3's published sizes: queries and keys RMS-normed per head (q_norm, k_norm), no
    biases, and the LM head tied to the embeddings up to 4B."""
    cfg = model(name)
    hf = arch_config(cfg.arch)
    with torch.device("meta"):
        from transformers import AutoModel

        backbone = AutoModel.from_config(hf)
    names = [n for n, _ in backbone.named_parameters()]
    assert {"layers.0.self_attn.q_norm.weight", "layers.0.self_attn.k_norm.weight"} <= set(names)
    assert not any(n.endswith(".bias") for n in names)
    embeddings = hf.vocab_size * hf.hidden_size
    total = count_params(backbone) + (0 if hf.tie_word_embeddings else embeddings)
    assert hf.tie_word_embeddings == (name != "qwen3_8b")
    published_total, published_non_embedding = QWEN3_PUBLISHED[name]
    assert total / 1e9 == pytest.approx(published_total, abs=0.05)
    assert (count_params(backbone) - embeddings) / 1e9 == pytest.approx(published_non_embedding, abs=0.05)


TINY_DECODERS = ["tiny_random_qwen2", "tiny_random_qwen3"]


@pytest.mark.parametrize("name", catalogue_params(TINY_DECODERS))
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_tiny_random_decoder_trains_a_few_steps_on_cpu(name, precision):
    """Each family's tiny random decoder (built offline from its arch) learns a toy task in a few steps, fully and
    under bf16 autocast over fp32 master weights."""
    from w2sg.ml.losses import make_loss
    from w2sg.ml.train import Encoded, predict, train_model
    from w2sg.run.device import Policy

    cfg = model(name)
    clf = build_model(cfg, 2, 0, policy=Policy("cpu", precision), trainable=True)
    assert type(clf.backbone).__name__.lower().startswith(cfg.arch["model_type"])
    assert count_params(clf) == cfg.params
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (32, 6), generator=g)
    y = (ids[:, 0] > 100).long()
    ids[:, 0] = torch.where(y.bool(), 300, 301)  # the label is in the first token
    data, targets = Encoded([r.tolist() for r in ids]), torch.eye(2)[y].numpy()
    result = train_model(clf, data, targets, make_loss({"name": "xent"}), epochs=4, batch_size=8, lr=3e-3, pad_id=0,
                         seed=0, progress=False, policy=Policy("cpu", precision))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert all(p.dtype == torch.float32 for p in clf.parameters())
    probs = predict(clf, data, batch_size=16, pad_id=0, progress=False, policy=Policy("cpu", precision))
    assert probs.shape == (32, 2) and abs(probs.sum(1) - 1).max() < 1e-4


@pytest.mark.slow  # keeps the default suite under 5 minutes; CI runs -m slow too
@pytest.mark.parametrize("name", catalogue_params(["tiny_random_qwen3"]))
def test_a_weak_to_strong_run_with_tiny_random_qwen3_and_lora(name, tmp_path):
    """Every stage of an experiment (weak, labels, ceiling, w2s) with the qwen3 family's LoRA targets."""
    from w2sg.core.store import Store
    from w2sg.run import experiment
    from w2sg.run.runner import Runner

    cfg = compose(TINY + ["train=lora", "logger=none", f"store_dir={tmp_path}", f"weak={name}", f"strong={name}"])
    metrics = experiment.run(cfg, Runner(cfg, Store(cfg.store_dir)))
    for stage in ("weak", "ceiling", "w2s"):
        assert 0 <= metrics["acc"][stage] <= 1


def test_shrunk_architecture_uses_the_real_config_class():
    cfg = model("llama3_1_8b")
    assert type(arch_config(cfg.arch)).__name__ == "LlamaConfig"
    assert type(arch_config(model("pythia_70m").arch)).__name__ == "GPTNeoXConfig"


def test_gpu_launcher_takes_resources_from_the_strong_model():
    from w2sg.app.config import compose as w2sg_compose

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


@pytest.mark.slow  # builds every catalogue architecture on the meta device: 15 s (CI runs -m slow)
def test_the_catalogues_derived_fields_are_generated():
    """params, lora_lr and memory_gb of every catalogue model are what tools/catalogue.py generates from its arch."""
    import subprocess
    import sys

    from helpers import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "catalogue.py"), "--check"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
